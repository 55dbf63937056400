"""Does a preference set carry a signal this model can learn? Measured at theta0, before any training.

Every pair i has a margin gradient g_i = beta * d/dB [log p(y_w | x) - log p(y_l | x)] with respect to the low-rank
B factors a TS-DPO direction trains (B = 0, A0 fixed by its seed: the same factors ``tsdpo train --param lowrank``
starts from). The first step of DPO moves B along the training pairs' mean gradient, and in the linearized model
TS-DPO trains, that step changes a held-out pair j's margin by <g_j, mean g_train>, to first order. If the held-out
pairs' gradients do not line up with the training pairs', training on those pairs fits them and leaves the held-out
ones where they were: it memorizes. Two readings per held-out pair:

- ``effect``: the change of its margin along a unit step in the training pairs' mean gradient (the first step);
- ``alignment``: the cosine of its gradient with the training pairs' mean unit gradient (scale-free).

Means over the held-out pairs with bootstrap 95% intervals; the verdict (``verdict_of``) is whether the effect's
interval excludes 0, and if not, whether most held-out pairs are still raised.
The cost is one forward and backward per batch of pairs: each pair's gradient comes from one pass (each sequence
carries its own B, so the gradients stay apart), a fraction of a training run.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable, Iterator, Optional

import torch

from engine.data import Pair, PairSet
from engine.dpo import encode_pairs
from engine.errors import Cancelled, TsdpoError
from engine.hooks import completion_rows, in_out, linear_layer
from engine.models import LoadedModel, runs_at_base
from engine.progress import Phase, ProgressFn
from engine.tangent import _forward_kwargs, _sequence_logps, linear_weights, shared_factors

RESAMPLES = 1000


class SignalError(TsdpoError):
    """The data cannot be measured as asked (too few pairs for a split)."""


@dataclass
class SignalConfig:
    rank: int = 8
    seed: int = 0  # A0's seed (as in training) and the split's
    val_fraction: float = 0.35
    heldout: int = 64  # held-out pairs measured (at most; as `tsdpo effects --pairs`)
    beta: float = 0.1
    batch_size: int = 4
    max_prompt_tokens: int = 128
    max_response_tokens: int = 128
    resamples: int = RESAMPLES


@contextmanager
def _per_sequence_branches(model: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Each selected linear layer adds (x A0^T) B_s^T for sequence s of the batch, B [S, out, r] (zeros: the
    outputs are the base model's, and d/dB_s is sequence s's gradient alone)."""
    modules = dict(model.named_modules())
    handles = []
    for w, (B, A) in factors.items():
        module = modules[w[: -len(".weight")]]
        handles.append(module.register_forward_hook(
            lambda mod, args, out, B=B, A=A: out + torch.einsum("str,sor->sto", args[0] @ A.T, B)))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def pair_gradients(lm: LoadedModel, pairs: list[Pair], names: list[str], A: dict[str, torch.Tensor],
                   cfg: SignalConfig) -> torch.Tensor:
    """[pairs, D] float32: each pair's margin gradient with respect to the B factors of ``names`` at B = 0 (D: their
    sizes summed, in ``names`` order, each B [out, r] row-major, as ``DirectionModel`` holds them)."""
    batch = encode_pairs(lm, pairs, cfg.max_prompt_tokens, cfg.max_response_tokens).to(lm.device)
    rows = batch.input_ids.shape[0]
    modules = dict(lm.model.named_modules())
    B = {n: torch.zeros(rows, in_out(linear_layer(modules, n))[1], cfg.rank, device=lm.device, dtype=lm.dtype,
                        requires_grad=True) for n in names}
    mask = batch.target_mask.bool()
    with torch.enable_grad(), completion_rows(lm.model, mask), \
            _per_sequence_branches(lm.model, {n: (B[n], A[n]) for n in names}):
        logps = _sequence_logps(batch, mask, lm.model(**_forward_kwargs(batch)).logits[0])
        n = len(pairs)
        sign = torch.cat([torch.ones(n), -torch.ones(n)]).to(logps)  # chosen rows, then rejected
        grads = torch.autograd.grad((logps * sign).sum(), [B[k] for k in names])
    per_row = torch.cat([g.float().reshape(rows, -1) for g in grads], dim=1)
    return cfg.beta * (per_row[:n] + per_row[n:])


def _interval(values: torch.Tensor, resamples: int, generator: torch.Generator) -> list[float]:
    idx = torch.randint(len(values), (resamples, len(values)), generator=generator)
    means = values[idx].mean(1)
    return [float(torch.quantile(means, 0.025)), float(torch.quantile(means, 0.975))]


def _check_finite(values: torch.Tensor) -> None:
    if not torch.isfinite(values).all():
        raise SignalError("The margin gradients are not finite: the model gives some of these replies a probability of "
                          "0 (check the data and the model's dtype).")


def split_for_signal(pairs: PairSet, cfg: SignalConfig) -> tuple[PairSet, PairSet]:
    """The training split's (train, held out), or a clear error when either has fewer than 2 pairs."""
    train, val = pairs.split(cfg.val_fraction, cfg.seed)
    if len(train) < 2 or len(val) < 2:
        raise SignalError(f"{len(pairs)} pairs give {len(train)} to train on and {len(val)} held out "
                          f"at --val-fraction {cfg.val_fraction:g}; the measurement needs at least 2 of each. Give more "
                          "pairs (or another --val-fraction).")
    return train, val


def data_signal(lm: LoadedModel, pairs: PairSet, cfg: SignalConfig = SignalConfig(),
                progress: Optional[ProgressFn] = None, should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Split ``pairs`` as training does (``val_fraction``, ``seed``), then measure how a first DPO step on the
    training pairs moves the first ``cfg.heldout`` held-out pairs (``signal_between``)."""
    train, val = split_for_signal(pairs, cfg)
    return {**signal_between(lm, train.pairs, val.pairs[: cfg.heldout], cfg, progress, should_stop),
            "objective": pairs.objective, "source": pairs.source}


@runs_at_base
def signal_between(lm: LoadedModel, train: list[Pair], heldout: list[Pair], cfg: SignalConfig = SignalConfig(),
                   progress: Optional[ProgressFn] = None, should_stop: Callable[[], bool] = lambda: False) -> dict:
    """How a unit step along the ``train`` pairs' mean margin gradient moves each ``heldout`` pair's margin, to
    first order, and how their gradients align (module docstring). Runs at the base model whatever a caller left
    applied."""
    if cfg.rank < 1 or cfg.batch_size < 1 or cfg.resamples < 1:
        raise SignalError("rank, batch size and resamples must be at least 1.")
    if len(train) < 2 or len(heldout) < 2:
        raise SignalError(f"{len(train)} training and {len(heldout)} held-out pairs: the measurement needs at least 2 "
                          "of each.")
    names = linear_weights(lm)
    A = shared_factors(lm, names, cfg.rank, cfg.seed)
    t0 = time.perf_counter()
    n_batches = math.ceil(len(train) / cfg.batch_size) + math.ceil(len(heldout) / cfg.batch_size)
    phase, done = Phase(progress, "pair gradients", n_batches), 0

    def batches(ps: list[Pair]) -> Iterator[torch.Tensor]:
        nonlocal done
        for i in range(0, len(ps), cfg.batch_size):
            if should_stop():
                raise Cancelled(f"the signal measurement ({done} of {n_batches} batches)")
            g = pair_gradients(lm, ps[i:i + cfg.batch_size], names, A, cfg).double()
            done += 1
            phase.update(done)
            yield g

    def units(g: torch.Tensor) -> torch.Tensor:
        return g / g.norm(dim=1, keepdim=True).clamp_min(1e-30)

    total = unit_total = None
    for g in batches(train):
        s, u = g.sum(0), units(g).sum(0)
        total, unit_total = (s, u) if total is None else (total + s, unit_total + u)
    _check_finite(total)
    n = len(train)
    step = total / total.norm().clamp_min(1e-30)  # a unit step along the training pairs' mean gradient
    unit_mean = unit_total / n
    effect, alignment = [], []
    for g in batches(heldout):
        effect.append(g @ step)
        alignment.append(units(g) @ unit_mean)
    effect, alignment = torch.cat(effect), torch.cat(alignment)
    _check_finite(effect)
    gen = torch.Generator().manual_seed(cfg.seed)
    effect_ci = _interval(effect, cfg.resamples, gen)
    raised = (effect > 0).double()
    # Mean cosine between two different training pairs' gradients: from the unit gradients' sum alone.
    train_alignment = (float(unit_total @ unit_total) - n) / (n * (n - 1))
    raised_ci = _interval(raised, cfg.resamples, gen)
    verdict = verdict_of(effect_ci, raised_ci)
    spread = float(effect.std()) / math.sqrt(len(effect))
    return {
        "train_pairs": n, "heldout_pairs": len(heldout),
        "effect": float(effect.mean()), "effect_interval": effect_ci,
        "effect_z": float(effect.mean()) / spread if spread > 0 else math.copysign(math.inf, float(effect.mean())),
        "raised": float(raised.mean()), "raised_interval": raised_ci,
        "alignment": float(alignment.mean()), "alignment_interval": _interval(alignment, cfg.resamples, gen),
        "train_alignment": train_alignment, "verdict": verdict, "weights": len(names),
        "seconds": round(time.perf_counter() - t0, 1), "config": asdict(cfg),
    }


def verdict_of(effect_interval: list[float], raised_interval: list[float]) -> str:
    """signal: the mean held-out effect's interval is above 0; reversed: below 0; weak: it includes 0 but more than
    half of the held-out pairs are raised (interval above 1/2), so most pairs agree and a few disagree strongly;
    none: neither."""
    if effect_interval[0] > 0:
        return "signal"
    if effect_interval[1] < 0:
        return "reversed"
    return "weak" if raised_interval[0] > 0.5 else "none"


VERDICTS = {
    "signal": "the held-out pairs move with the training pairs: training on them should generalize.",
    "none": "the held-out pairs do not move with the training pairs (the interval includes 0): training on these "
            "pairs would fit them and leave held-out pairs at chance. More pairs, or pairs with clearer labels "
            "(--min-score-gap), are what would help; another learning rate or a longer run is unlikely to.",
    "weak": "most held-out pairs move with the training pairs, but the mean change is not clearly above 0 (a few "
            "pairs move strongly against them): training may generalize a little; more pairs would tell.",
    "reversed": "a step along the training pairs lowers the held-out margins: the two splits disagree, which points "
                "at labels that contradict each other (check the data).",
}


def signal_figures(r: dict) -> str:
    """The measurement, a line per figure (fixed-width layout)."""
    ci = lambda v: f"[{v[0]:+.4f}, {v[1]:+.4f}]"  # noqa: E731
    return "\n".join([
        f"{r.get('objective', 'pairs')}: {r['train_pairs']} training pairs, {r['heldout_pairs']} held out "
        f"({r['weights']} weight matrices, rank {r['config']['rank']}; {r['seconds']:.0f} s)",
        f"  held-out margin change along the training pairs' first step  {r['effect']:+.4f} {ci(r['effect_interval'])}"
        f"  (z {r['effect_z']:+.2f})",
        f"  held-out pairs whose margin it raises                        {r['raised']:.3f} "
        f"[{r['raised_interval'][0]:.3f}, {r['raised_interval'][1]:.3f}]",
        f"  alignment of held-out with training gradients (cosine)       {r['alignment']:+.4f} {ci(r['alignment_interval'])}",
        f"  alignment among training pairs (cosine)                      {r['train_alignment']:+.4f}",
    ])


def verdict_text(r: dict) -> str:
    return f"verdict: {r['verdict']}: {VERDICTS[r['verdict']]}"


def signal_text(r: dict) -> str:
    return signal_figures(r) + "\n" + verdict_text(r)
