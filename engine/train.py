"""Training a direction: TS-DPO (linearized) or the scalarized-DPO baseline (ordinary), on Accelerate.

The same code runs in one process by default and under ``accelerate launch`` / ``torchrun`` on several
processes or GPUs (DDP syncs tau only; bf16 on GPU). Each optimizer step takes ``batch_size`` pairs in
total, split evenly over processes and gradient-accumulation micro-batches, so the result does not depend
on how many processes ran it. Batches are a pure function of (seed, step), so a resumed run sees the
same data as an uninterrupted one. Checkpoints are safetensors + JSON: nothing is ever unpickled.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

import torch
from safetensors.torch import load_file, save

from engine.data import Pair, PairSet
from engine.directions import DirectionError
from engine.dpo import LOSSES, encode_pairs
from engine.errors import Cancelled
from engine.keep import MAX_REMOVED_SHARE, KeptMargins, first_order_share, require_lowrank
from engine.models import LoadedModel, runs_at_base
from engine.paths import atomic_write_bytes, atomic_write_text
from engine.progress import Phase, Progress, ProgressFn, abort_on_cancel
from engine.tangent import DirectionModel, coverage, linear_weights
from engine.weight_delta import LEGACY_METHODS, METHODS, PARAMS, WeightDelta


OPTIMIZERS = ("adamw", "sgd")


@dataclass
class TrainConfig:
    method: str = "tangent"  # tangent (TS-DPO) | scalarized (the scalarized-DPO baseline: ordinary DPO)
    param: str = "lowrank"  # full | lowrank
    rank: int = 8
    steps: int = 60
    batch_size: int = 4  # pairs per optimizer step, over all processes and micro-batches
    grad_accum: int = 1
    lr: float = 0.0  # 0: the default for the parameterization (see default_lr)
    warmup_ratio: float = 0.1
    beta: float = 0.1
    loss: str = "sigmoid"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | sgd (plain gradient steps: one full-batch step is the first-order direction)
    seed: int = 0
    layers: Optional[list[int]] = None
    modules: Optional[list[str]] = None
    max_prompt_tokens: int = 128
    max_response_tokens: int = 128
    val_fraction: float = 0.1
    checkpoint_every: int = 0
    mixture: dict = field(default_factory=dict)  # scalarized: objective -> weight

    def validate(self) -> "TrainConfig":
        self.method = LEGACY_METHODS.get(self.method, self.method)  # a checkpoint written by an earlier version
        if self.method not in METHODS:
            raise DirectionError(f"method must be one of {METHODS}.")
        if self.param not in PARAMS:
            raise DirectionError(f"param must be one of {PARAMS}.")
        if self.loss not in LOSSES:
            raise DirectionError(f"loss must be one of {LOSSES}.")
        if self.optimizer not in OPTIMIZERS:
            raise DirectionError(f"optimizer must be one of {OPTIMIZERS}, not {self.optimizer!r}.")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1 or self.rank < 1:
            raise DirectionError("steps, batch size, gradient accumulation and rank must be at least 1.")
        return self

    def default_lr(self) -> float:
        # The low-rank B factors see inputs projected by A0 (rows of norm ~1), hence a larger step.
        return self.lr or (1e-4 if self.param == "full" else 2e-3)


def cosine_with_warmup(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(warmup, 1)
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class BatchPlan:
    """Which pairs form global batch ``step``: a pure function of the seed and the step."""

    def __init__(self, sources: list[tuple[list[Pair], float]], batch_size: int, seed: int):
        self.sources = [(list(p), w) for p, w in sources if p and w > 0]
        if not self.sources:
            raise DirectionError("No training pairs: every data source is empty or has weight 0.")
        self.batch_size, self.seed = batch_size, seed
        self.orders = []
        for i, (pairs, _) in enumerate(self.sources):
            order = list(range(len(pairs)))
            random.Random(f"{seed}/{i}").shuffle(order)
            self.orders.append(order)
        total = sum(w for _, w in self.sources)
        self.probs = [w / total for _, w in self.sources]

    def counts(self, step: int) -> list[int]:
        """How many pairs of each source batch ``step`` takes: drawn with the sources' weights."""
        if len(self.sources) == 1:
            return [self.batch_size]
        rng = random.Random(f"{self.seed}/mix/{step}")
        picks = rng.choices(range(len(self.sources)), self.probs, k=self.batch_size)
        return [picks.count(k) for k in range(len(self.sources))]

    def batch(self, step: int) -> list[Pair]:
        used = self._used(step)
        out = []
        for k, n in enumerate(self.counts(step)):
            pairs, order = self.sources[k][0], self.orders[k]
            out += [pairs[order[(used[k] + j) % len(pairs)]] for j in range(n)]
        return out

    def _used(self, step: int) -> list[int]:
        """How many pairs of each source the steps before ``step`` took: kept as a running total, so walking
        the steps in order costs one ``counts`` per step (a pure function of the step all the same)."""
        if not hasattr(self, "_walk") or self._walk[0] > step:
            self._walk = (0, [0] * len(self.sources))
        s, used = self._walk
        while s < step:
            used = [u + c for u, c in zip(used, self.counts(s))]
            s += 1
        self._walk = (s, used)
        return list(used)


@dataclass
class TrainResult:
    direction: WeightDelta
    history: list[dict]
    val_metrics: dict


def _checkpoint_paths(folder: Path) -> tuple[Path, Path]:
    return folder / "state.safetensors", folder / "state.json"


def save_checkpoint(folder: Path, module: DirectionModel, optimizer: torch.optim.Optimizer, step: int,
                    cfg: TrainConfig, data_hash: str, history: list[dict]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"tau.{k}": v.detach().cpu().contiguous() for k, v in module.tau.items()}
    index = {id(p): k for k, p in module.tau.items()}
    steps = {}
    for p, state in optimizer.state.items():
        k = index[id(p)]
        for name, value in state.items():
            if name == "step":
                steps[k] = float(value)
            elif value is not None:
                tensors[f"opt.{k}.{name}"] = value.detach().cpu().contiguous()
    st, js = _checkpoint_paths(folder)
    atomic_write_bytes(st, save(tensors))
    atomic_write_text(js, json.dumps({"step": step, "config": asdict(cfg), "data_hash": data_hash, "opt_steps": steps,
                                      "history": history}))


def load_checkpoint(folder: Path, module: DirectionModel, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    data_hash: str) -> tuple[int, list[dict]]:
    st, js = _checkpoint_paths(folder)
    if not st.is_file() or not js.is_file():
        return 0, []
    info = json.loads(js.read_text())
    saved = {"optimizer": "adamw", **{k: v for k, v in info["config"].items() if k != "checkpoint_every"}}  # older: adamw
    mine = {k: v for k, v in asdict(cfg).items() if k != "checkpoint_every"}
    if saved != mine or info["data_hash"] != data_hash:
        raise DirectionError(f"The checkpoint in {folder} was made with other settings or data; "
                             "resume with the same ones, or use another --checkpoint-dir.")
    tensors = load_file(str(st))
    with torch.no_grad():
        for k, p in module.tau.items():
            p.copy_(tensors[f"tau.{k}"].to(p.device))
    for k, p in module.tau.items():
        if k in info["opt_steps"]:
            optimizer.state[p] = {"step": torch.tensor(info["opt_steps"][k]),
                                  "exp_avg": tensors[f"opt.{k}.exp_avg"].to(p.device),
                                  "exp_avg_sq": tensors[f"opt.{k}.exp_avg_sq"].to(p.device)}
    return int(info["step"]), list(info["history"])


@torch.no_grad()
def evaluate(module: DirectionModel, lm: LoadedModel, pairs: list[Pair], cfg: TrainConfig, batch_size: int = 4,
             scales: tuple[float, ...] = (1.0,)) -> list[dict]:
    """Held-out DPO metrics (loss, implicit reward accuracy, margin) of the policy against the base model, one dict
    per scale of the trained tau (``DirectionModel.scaled_losses``: one pass per batch serves every scale)."""
    if not pairs:
        return [{} for _ in scales]
    sums: list[dict[str, float]] = [{} for _ in scales]
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = encode_pairs(lm, chunk, cfg.max_prompt_tokens, cfg.max_response_tokens).to(lm.device)
        for total, (_, metrics) in zip(sums, module.scaled_losses(batch, list(scales), cfg.beta, cfg.loss)):
            for k, v in metrics.items():
                total[k] = total.get(k, 0.0) + float(v) * len(chunk)
    return [{k: v / len(pairs) for k, v in total.items()} for total in sums]


def train_direction(lm: LoadedModel, data: PairSet | list[tuple[PairSet, float]], cfg: TrainConfig,
                    progress: Optional[ProgressFn] = None,
                    should_stop: Optional[Callable[[], bool]] = None,
                    checkpoint_dir: Optional[str | Path] = None, objective: Optional[str] = None,
                    keep: Optional[PairSet | KeptMargins] = None) -> TrainResult:
    """Train one direction. ``data`` is one PairSet, or (PairSet, weight) sources for the scalarized baseline.

    It trains at the exact base model whatever mix a caller left applied (that mix is applied again
    afterwards), on the eager kernels forward-mode AD needs. ``progress`` gets one ``Progress`` per step, its
    metrics the step's record; a cancel takes effect within one decoder block. ``keep``: pairs of another
    objective whose margins the direction must leave unchanged, to first order (``engine.keep``; low-rank only)."""
    return _train_at_base(lm, data, cfg, progress, should_stop, checkpoint_dir, objective, keep, (1.0,))[0]


@runs_at_base
def _train_at_base(lm, data, cfg, progress, should_stop, checkpoint_dir, objective, keep, multiples) -> list[TrainResult]:
    cfg.validate()
    applied = lm.applied()  # [] here: at_base set the caller's mix aside; recorded as provenance
    kept = kept_margins(lm, keep, cfg, progress, should_stop) if isinstance(keep, PairSet) else keep
    kernels = lm.forward_ad_kernels() if cfg.method == "tangent" else nullcontext()
    with kernels, abort_on_cancel(lm, should_stop, "training"):
        return _train(lm, data, cfg, progress, should_stop, checkpoint_dir, objective, applied, kept, multiples)


def is_one_plain_step(cfg: TrainConfig) -> bool:
    """Whether the run is one plain gradient step from tau = 0, which is the learning rate times one vector
    whatever the rate: clipping acts on the gradient, weight decay on tau = 0 (adding nothing) and keeping another
    objective unchanged is a linear projection."""
    return cfg.optimizer == "sgd" and cfg.steps == 1


@runs_at_base
def kept_margins(lm: LoadedModel, keep: PairSet, cfg: TrainConfig, progress: Optional[ProgressFn] = None,
                 should_stop: Optional[Callable[[], bool]] = None) -> KeptMargins:
    """The basis a training run with ``cfg`` projects onto the complement of: the margin gradients of the training
    split of ``keep`` (split as ``cfg`` splits), over the factors that run trains. Call it at the base model."""
    cfg.validate()
    require_lowrank(cfg.param)
    with abort_on_cancel(lm, should_stop, "the kept pairs' gradients"):
        return KeptMargins.build(lm, keep, linear_weights(lm, cfg.layers, cfg.modules), cfg.rank, cfg.seed,
                                 cfg.val_fraction, cfg.beta, cfg.max_prompt_tokens, cfg.max_response_tokens,
                                 progress=progress, should_stop=should_stop or (lambda: False))


def train_with_lr_search(lm: LoadedModel, data: PairSet | list[tuple[PairSet, float]], cfg: TrainConfig,
                         grid: list[float], progress: Optional[ProgressFn] = None,
                         should_stop: Optional[Callable[[], bool]] = None,
                         checkpoint_dir: Optional[str | Path] = None, objective: Optional[str] = None,
                         keep: Optional[PairSet] = None) -> TrainResult:
    """Train once per learning rate in ``grid`` (everything else as ``cfg`` says: steps, batch, data plan, beta,
    seed) and keep the direction with the lowest held-out DPO loss; every run's held-out metrics go into its
    meta (``lr_search``). The same care for TS-DPO and the scalarized baseline, so a comparison is fair."""
    if len(grid) < 2 or any(not (lr > 0 and math.isfinite(lr)) for lr in grid):
        raise DirectionError(f"A learning-rate grid takes two or more positive rates, not {grid}.")
    if not cfg.val_fraction > 0:
        raise DirectionError("Picking the learning rate needs held-out pairs: set a validation fraction above 0.")
    if keep is not None:  # one basis for every rate: it depends on the base model and the split only
        keep = kept_margins(lm, keep, cfg, progress, should_stop)
    if is_one_plain_step(cfg):  # one run at the first rate; every rate's direction is a multiple of it
        report = (lambda p: progress(replace(p, phase=f"one step for {len(grid)} learning rates"))) if progress else None
        folder = Path(checkpoint_dir) / f"lr-{grid[0]:g}" if checkpoint_dir else None
        results = _train_at_base(lm, data, replace(cfg, lr=grid[0]), report, should_stop, folder, objective, keep,
                                 tuple(lr / grid[0] for lr in grid))
    else:
        results = None
    runs, best, best_loss = [], None, math.inf
    for i, lr in enumerate(grid):
        label = f"{'scored' if results is not None else 'training'} at lr {lr:g} ({i + 1} of {len(grid)})"
        if results is not None:
            result = results[i]
        else:
            report = (lambda p, label=label: progress(replace(p, phase=label))) if progress else None
            folder = Path(checkpoint_dir) / f"lr-{lr:g}" if checkpoint_dir else None
            result = train_direction(lm, data, replace(cfg, lr=lr), progress=report, should_stop=should_stop,
                                     checkpoint_dir=folder, objective=objective, keep=keep)
        val = result.val_metrics
        loss = float(val.get("loss", math.nan))
        runs.append({"lr": lr, "val_loss": loss, "val_accuracy": val.get("rewards/accuracies"),
                     "val_margin": val.get("rewards/margins")})
        if progress is not None:
            progress(Progress(label, 1, 1, None, {"val_loss": loss}))
        if math.isfinite(loss) and loss < best_loss:
            best, best_loss = result, loss
    if best is None:
        raise DirectionError(f"No learning rate in {grid} gave a finite held-out loss; try smaller rates.")
    best.direction.meta["lr_search"] = {"grid": list(grid), "runs": runs, "chosen": best.direction.meta["hyperparameters"]["lr"],
                                        "by": "lowest held-out DPO loss"}
    return best


def _train(lm, data, cfg, progress, should_stop, checkpoint_dir, objective, applied, kept, multiples) -> list[TrainResult]:
    """Train, then return the direction at each of ``multiples`` of the trained tau (only a run that
    ``is_one_plain_step`` has more than 1: there a multiple is the direction another learning rate gives)."""
    if tuple(multiples) != (1.0,) and not is_one_plain_step(cfg):
        raise DirectionError("Only one plain gradient step scales with its learning rate.")
    from accelerate import Accelerator

    sources = [(data, 1.0)] if isinstance(data, PairSet) else list(data)
    splits = [(ps.split(cfg.val_fraction, cfg.seed), w) for ps, w in sources]
    train_sources = [(tr.pairs, w) for (tr, _), w in splits]
    val_pairs = [p for (_, va), w in splits if w > 0 for p in va.pairs]
    data_hash = "+".join(f"{ps.data_hash()[:16]}*{w:g}" for ps, w in sources)
    if kept is not None:  # a checkpoint made without (or with other) kept pairs is not resumed with these
        data_hash += f"|keep {kept.info['data_hash'][:16]}"
    name = objective or ("+".join(f"{w:g}*{ps.objective}" for ps, w in sources) if len(sources) > 1 else sources[0][0].objective)
    cuda = lm.device.type == "cuda"
    acc = Accelerator(gradient_accumulation_steps=cfg.grad_accum, cpu=not cuda,
                      mixed_precision="bf16" if cuda and lm.dtype == torch.bfloat16 else "no")
    world = acc.num_processes
    if cfg.batch_size % (world * cfg.grad_accum):
        raise DirectionError(f"batch size {cfg.batch_size} must be a multiple of processes ({world}) x "
                             f"gradient accumulation ({cfg.grad_accum}).")
    torch.manual_seed(cfg.seed)
    names = linear_weights(lm, cfg.layers, cfg.modules)
    module = DirectionModel(lm, names, cfg.param, cfg.rank, cfg.method, cfg.seed)
    lr = cfg.default_lr()
    optimizer = (torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=cfg.weight_decay) if cfg.optimizer == "adamw"
                 else torch.optim.SGD(module.parameters(), lr=lr, weight_decay=cfg.weight_decay))
    folder = Path(checkpoint_dir) if checkpoint_dir else None
    start, history = (load_checkpoint(folder, module, optimizer, cfg, data_hash) if folder else (0, []))
    # The learning rate is a pure function of the step (set before each optimizer step), so a resumed run and
    # a run on several processes follow the same schedule.
    warmup = int(cfg.warmup_ratio * cfg.steps)
    wrapped, optimizer = acc.prepare(module, optimizer)
    plan = BatchPlan(train_sources, cfg.batch_size, cfg.seed)
    per_proc = cfg.batch_size // world
    micro = per_proc // cfg.grad_accum
    t0 = time.perf_counter()
    phase = Phase(progress if acc.is_main_process else None, "training", cfg.steps)
    if start:
        phase.update(start)
    completed = start
    try:
        for step in range(start, cfg.steps):
            if should_stop is not None and should_stop():
                raise Cancelled("training")
            mine = plan.batch(step)[acc.process_index * per_proc:(acc.process_index + 1) * per_proc]
            step_lr = lr * cosine_with_warmup(step, cfg.steps, warmup)
            for group in optimizer.param_groups:
                group["lr"] = step_lr
            totals: dict[str, float] = {}
            for m in range(cfg.grad_accum):
                batch = encode_pairs(lm, mine[m * micro:(m + 1) * micro], cfg.max_prompt_tokens,
                                     cfg.max_response_tokens).to(acc.device)
                with acc.accumulate(wrapped):
                    loss, metrics = wrapped(batch, cfg.beta, cfg.loss)
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        acc.clip_grad_norm_(wrapped.parameters(), cfg.max_grad_norm)
                    if kept is not None and acc.sync_gradients:
                        before = {n: t.detach().clone() for n, t in module.factor_dict().items()}
                    optimizer.step()
                    optimizer.zero_grad()
                    if kept is not None and acc.sync_gradients:
                        removed = kept.project(module.factor_dict(), before)
                for k, v in metrics.items():
                    totals[k] = totals.get(k, 0.0) + float(v) / cfg.grad_accum
            totals = {k: float(acc.reduce(torch.tensor(v, device=acc.device), reduction="mean")) for k, v in totals.items()}
            done = step + 1
            elapsed = time.perf_counter() - t0
            if kept is not None:
                totals["kept/removed_share"] = removed  # the share of the step that lay in the kept span, taken out
            record = {"step": done, "lr": step_lr, **totals,
                      "eta_s": elapsed / (done - start) * (cfg.steps - done)}
            history.append(record)
            completed = done
            phase.update(done, **record)
            if folder and cfg.checkpoint_every and done % cfg.checkpoint_every == 0 and acc.is_main_process:
                save_checkpoint(folder, module, optimizer, done, cfg, data_hash, history)
    except Cancelled:
        # Stopped between steps or inside one: what the unfinished step computed is dropped, and the
        # checkpoint (written by the main process alone) holds the steps that completed.
        optimizer.zero_grad()
        if folder and acc.is_main_process:
            save_checkpoint(folder, module, optimizer, completed, cfg, data_hash, history)
        raise
    kept_meta = {}
    if kept is not None and history:
        removed = sum(h["kept/removed_share"] for h in history) / len(history)
        kept_meta = {"kept_unchanged": {**kept.describe(), "removed_share": removed,
                                        "share_in_span": first_order_share(kept, module.factor_dict())}}
        if removed > MAX_REMOVED_SHARE:
            raise DirectionError(
                f"Keeping the {kept.info['objective']} pairs unchanged took out {100 * removed:.2f}% of every training "
                f"step: their gradients span nearly all that training on these pairs changes, so what is left is "
                f"rounding, not a direction. On this model the two objectives cannot be told apart to first order; "
                f"keep fewer pairs, or train without keeping them.")
    vals = evaluate(module, lm, val_pairs, cfg, scales=multiples)
    shared = {"data_hash": data_hash, "objective_sources":
              [{"objective": ps.objective, "source": ps.source, "weight": w, "pairs": len(ps)} for ps, w in sources],
              "processes": world, "model": lm.identity(), "applied_while_built": applied,
              "coverage": {k: v for k, v in coverage(lm, cfg.layers, cfg.modules).items() if k != "weights"},
              **kept_meta, "seconds": round(time.perf_counter() - t0, 1),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    # the trained tau, kept aside only when other multiples of it are asked for (a full-rank tau is a model's size)
    trained = [p.detach().clone() for p in module.tau.values()] if tuple(multiples) != (1.0,) else None
    results = []
    with torch.no_grad():
        for m, val in zip(multiples, vals):
            if trained is not None:
                for p, p0 in zip(module.tau.values(), trained):
                    p.copy_(p0 if m == 1 else p0 * m)
            steps = [{**h, "lr": h["lr"] * m} for h in history]
            meta = {"hyperparameters": {**asdict(cfg), "lr": lr * m}, **shared,
                    "final_train": steps[-1] if steps else {}, "validation": val}
            direction = module.to_direction(name, meta)
            direction.method = cfg.method
            results.append(TrainResult(direction, steps, val))
    return results
