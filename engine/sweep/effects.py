"""What each direction does on its own, along its axis: for every direction and every weight in a short list, the
held-out implicit-reward margin (and accuracy) of every objective against the base model. Per direction and
objective: Kendall's tau of the mean margin over the weights (does it move monotonically?), the least-squares
slope (how much per unit weight), both with bootstrap 95% intervals over the held-out pairs, and the
cross-effect: the slope on another objective as a share of the slope on the direction's own objective.

A held-out pair whose prompt the direction was trained on (``seen``: each objective's training prompts; another
objective's file can share prompts with it, as UltraFeedback-derived sets do) is left out of that direction's
figures: its margin there would read what the direction learned of that very prompt, not its effect along the axis.

Cheaper than a grid sweep (one point per direction and weight, not per plane point) and not limited to two
objectives, so a set of shipped directions is checked against every objective it might disturb."""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import torch

from engine.data import PairSet
from engine.dpo import encode_pairs
from engine.errors import Cancelled
from engine.mixer import Mixer
from engine.models import LoadedModel
from engine.progress import Phase, ProgressFn, abort_on_cancel
from engine.sweep.metrics import monotonicity
from engine.sweep.runner import SweepError, _won, implicit_margins, response_logps
from engine.tangent import linearization_gap

RESAMPLES = 1000


@dataclass
class EffectsConfig:
    weights: list[float] = field(default_factory=lambda: [-1.0, -0.5, 0.0, 0.5, 1.0])
    pairs: int = 64  # held-out pairs per objective
    beta: float = 0.1
    max_prompt_tokens: int = 128
    max_response_tokens: int = 128
    batch_size: int = 4
    linearization_gap: bool = True
    resamples: int = RESAMPLES
    seed: int = 0

    def check(self) -> None:
        w = self.weights
        if len(w) < 3 or sorted(w) != w or len(set(w)) != len(w) or 0.0 not in w:
            raise SweepError(f"--weights must be at least 3 distinct increasing weights including 0 (got {w}).")
        if not all(math.isfinite(v) for v in w):
            raise SweepError(f"--weights must be finite numbers (got {w}).")
        if self.pairs < 2:
            raise SweepError(f"--pairs must be at least 2 (got {self.pairs}).")


def _slope(weights: list[float], values: list[float]) -> float:
    mw, mv = sum(weights) / len(weights), sum(values) / len(values)
    num = sum((w - mw) * (v - mv) for w, v in zip(weights, values))
    den = sum((w - mw) ** 2 for w in weights)
    return num / den


def _interval(values: torch.Tensor) -> list[float]:
    v = values[torch.isfinite(values)]
    if v.numel() == 0:
        return [float("nan"), float("nan")]
    return [float(torch.quantile(v, 0.025)), float(torch.quantile(v, 0.975))]


def _tau_rows(means: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """Kendall's tau of each row of ``means`` [resamples, weights] against the (increasing) weights."""
    n = means.shape[1]
    s = torch.zeros(means.shape[0], dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            s += torch.sign(means[:, j] - means[:, i])
    return s / (n * (n - 1) / 2)


def summarize_objective(weights: list[float], per_pair: torch.Tensor, accuracy: list[float], resamples: int,
                        generator: torch.Generator) -> dict:
    """``per_pair`` [weights, pairs]: every held-out pair's margin at each weight (0 at weight 0)."""
    means = per_pair.mean(1).tolist()
    mono = monotonicity(means, weights)
    idx = torch.randint(per_pair.shape[1], (resamples, per_pair.shape[1]), generator=generator)
    boot = per_pair[:, idx].mean(-1).T  # [resamples, weights]
    w = torch.tensor(weights, dtype=torch.float64)
    wc = w - w.mean()
    slopes = (boot - boot.mean(1, keepdim=True)) @ wc / (wc @ wc)
    return {"margin": means, "accuracy": accuracy, "kendall_tau": mono["kendall_tau"],
            "tau_interval": _interval(_tau_rows(boot, weights)), "tv_ratio": mono["tv_ratio"],
            "slope": _slope(weights, means), "slope_interval": _interval(slopes)}


def training_prompts(train: PairSet) -> set[str]:
    """The prompts of a training split, as ``axis_effects`` takes them in ``seen``."""
    return {p.prompt_key() for p in train.pairs}


def axis_effects(lm: LoadedModel, directions: list, data: dict[str, PairSet], cfg: EffectsConfig,
                 progress: Optional[ProgressFn] = None, should_stop: Callable[[], bool] = lambda: False,
                 seen: Optional[dict[str, set[str]]] = None) -> dict:
    """Measure every direction alone at every weight of ``cfg.weights`` on the first ``cfg.pairs`` held-out pairs of
    every objective in ``data``, starting from the exact base model whatever a caller left applied (put back
    afterwards). ``seen[o]``: the prompts directions of objective ``o`` were trained on; their held-out pairs with
    one of those prompts are left out of those directions' figures (module docstring)."""
    cfg.check()
    own = {d.name: d.objective for d in directions}
    missing = sorted({o for o in own.values() if o not in data})
    if missing:
        raise SweepError(f"No held-out data for objective(s) {', '.join(missing)}; pass --data OBJECTIVE=FILE for each.")
    pairs = {o: ps.pairs[: cfg.pairs] for o, ps in data.items()}
    for o, p in pairs.items():
        if len(p) < 2:
            raise SweepError(f"The held-out data for {o} has {len(p)} pair(s); effects need at least 2.")
    keep = {}  # direction name -> objective -> indices of the pairs its figures use
    for d in directions:
        known = (seen or {}).get(d.objective, set())
        keep[d.name] = {o: [i for i, pr in enumerate(p) if pr.prompt_key() not in known] for o, p in pairs.items()}
        for o, idx in keep[d.name].items():
            if len(idx) < 2:
                raise SweepError(f"Only {len(idx)} of the {len(pairs[o])} held-out {o} pairs have a prompt the "
                                 f"{d.name} direction was not trained on; effects need at least 2. Give more {o} "
                                 "pairs (--pairs) or data that shares fewer prompts.")
    batches = {o: [encode_pairs(lm, p[i:i + cfg.batch_size], cfg.max_prompt_tokens, cfg.max_response_tokens).to(lm.device)
                   for i in range(0, len(p), cfg.batch_size)] for o, p in pairs.items()}
    mixer = Mixer(lm)
    try:
        names = [mixer.add(d, name=f"effects:{i}:{d.name}") for i, d in enumerate(directions)]
        tangent = any(d.space == "weight" for d in directions) and cfg.linearization_gap
        kernels = lm.forward_ad_kernels() if tangent else nullcontext()
        nonzero = [w for w in cfg.weights if w != 0]
        total = 1 + len(directions) * len(nonzero)
        t0 = time.perf_counter()
        with lm.at_base(), kernels, abort_on_cancel(lm, should_stop, "the effects run"):
            phase = Phase(progress, "effects", total)
            phase.update(0, point="base model")
            base = response_logps(lm, batches)
            done = 1
            raw: dict[str, dict[float, dict]] = {}
            for d, name in zip(directions, names):
                raw[d.name] = {}
                for w in nonzero:
                    if should_stop():
                        raise Cancelled(f"the effects run ({done} of {total} measured)")
                    phase.update(done, point=f"{d.name} at {w:+g}")
                    mixer.set_weights({name: w})
                    try:
                        lp = response_logps(lm, batches)
                    finally:
                        mixer.clear()
                    rec = {"margins": {o: implicit_margins(lp[o], base[o], cfg.beta) for o in batches}}
                    if d.space == "weight" and cfg.linearization_gap:
                        mix = mixer.mix({name: w}).weight_space
                        rec["lin_gap"] = linearization_gap(lm, batches[d.objective][0], mix, average=True)["gap_mean"]
                    raw[d.name][w] = rec
                    done += 1
            phase.update(total, point="done")
    finally:
        lm.mixers.discard(mixer)
    return _summary(directions, raw, {o: len(p) for o, p in pairs.items()}, cfg, time.perf_counter() - t0, keep)


def _summary(directions: list, raw: dict, n_pairs: dict[str, int], cfg: EffectsConfig, seconds: float,
             keep: dict[str, dict[str, list[int]]]) -> dict:
    g = torch.Generator().manual_seed(cfg.seed)
    out = {"config": asdict(cfg), "pairs": n_pairs, "seconds": round(seconds, 1), "directions": {}}
    for d in directions:
        per_w = raw[d.name]
        entry = {"kind": d.label, "objective": d.objective, "weights": cfg.weights, "objectives": {},
                 "left_out": {o: n_pairs[o] - len(idx) for o, idx in keep[d.name].items()}}
        for o in n_pairs:
            idx = keep[d.name][o]
            rows = [[0.0] * len(idx) if w == 0 else [per_w[w]["margins"][o][i] for i in idx] for w in cfg.weights]
            acc = [0.5 if w == 0 else sum(_won(per_w[w]["margins"][o][i]) for i in idx) / len(idx) for w in cfg.weights]
            entry["objectives"][o] = {**summarize_objective(cfg.weights, torch.tensor(rows, dtype=torch.float64), acc,
                                                            cfg.resamples, g), "pairs": len(idx)}
        own = entry["objectives"][d.objective]["slope"]
        entry["cross_effect"] = {o: (abs(v["slope"]) / abs(own) if own else float("inf"))
                                 for o, v in entry["objectives"].items() if o != d.objective}
        if any("lin_gap" in per_w[w] for w in per_w):
            entry["lin_gap"] = [0.0 if w == 0 else per_w[w].get("lin_gap") for w in cfg.weights]
        out["directions"][d.name] = entry
    return out


def effects_markdown(result: dict) -> str:
    """A table per direction: along its own axis, every objective's margin, tau and slope with intervals."""
    objectives = list(result["pairs"])
    lines = [f"Held-out pairs per objective: {', '.join(f'{o} {n}' for o, n in result['pairs'].items())}; "
             f"weights {', '.join(f'{w:+g}' for w in result['config']['weights'])}; beta {result['config']['beta']:g}; "
             f"95% bootstrap intervals over the pairs ({result['config']['resamples']} resamples).", "",
             "| direction | kind | objective measured | mean margin at each weight | Kendall tau [95%] | slope per unit weight [95%] | cross-effect |",
             "|---|---|---|---|---|---|---|"]
    for name, e in result["directions"].items():
        for o in [e["objective"]] + [o for o in objectives if o != e["objective"]]:
            v = e["objectives"][o]
            own = o == e["objective"]
            tau = "-" if v["kendall_tau"] is None else f"{v['kendall_tau']:+.2f} [{v['tau_interval'][0]:+.2f}, {v['tau_interval'][1]:+.2f}]"
            lines.append(f"| {name if own else ''} | {e['kind'] if own else ''} | {o}{' (own)' if own else ''} | "
                         f"{' / '.join(f'{m:+.3f}' for m in v['margin'])} | {tau} | "
                         f"{v['slope']:+.3f} [{v['slope_interval'][0]:+.3f}, {v['slope_interval'][1]:+.3f}] | "
                         f"{'-' if own else format(e['cross_effect'][o], '.2f') + 'x'} |")
    left = [f"{n}: " + ", ".join(f"{o} {k}" for o, k in e["left_out"].items() if k)
            for n, e in result["directions"].items() if any(e.get("left_out", {}).values())]
    if left:
        lines += ["", "Held-out pairs left out because the direction was trained on their prompt: " + "; ".join(left) + "."]
    gaps = [(n, e["lin_gap"]) for n, e in result["directions"].items() if "lin_gap" in e]
    if gaps:
        lines += ["", "Linearization gap (mean |log pi_lin - log pi| per response token, first batch of the own objective):", "",
                  "| direction | " + " | ".join(f"{w:+g}" for w in result["config"]["weights"]) + " |",
                  "|---|" + "---|" * len(result["config"]["weights"])]
        lines += [f"| {n} | " + " | ".join(f"{g:.4f}" for g in gap) + " |" for n, gap in gaps]
    return "\n".join(lines) + "\n"
