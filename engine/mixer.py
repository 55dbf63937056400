"""Applying a mix of directions to the loaded model.

Steering vectors go in through forward hooks on the steered blocks, which add
``sum_k alpha_k * delta_k,l`` to the block output: at every position, or only at generated tokens.
Changing weights swaps one small tensor per steered layer and reloads nothing. A mix may carry
one row of weights per batch row, so columns that differ only in steering coefficients run as one batch.

Low-rank weight-space directions (tau = B A0) run as adapters on the linear layers (``engine.adapters``):
applying a point replaces a [rows, K r] tensor of weights, nothing else, and each batch row can carry its own
mix. A long generation of one mix can instead merge it into the weights (``prefer_merged`` decides by the
measured cost of each).
Full-rank directions, and any mix asked for ``merge=True`` (the export), change the weights in place: each
touched weight is first copied back from an exact copy of the base, then sum_k alpha_k tau_k is added.
Restoring is a copy, not a subtraction, so the base comes back bit for bit. Rows of one batch must share
the weights of what is merged in place; ``batches`` groups rows that can run together.

With every weight at zero no hook is left and every weight is the base copy: logits are bit-identical.

Applying is transactional: weights must be finite (and so must what they add), an invalid request changes
nothing, and a failure while the weights are being edited puts the model back at its exact base before the
error is raised. The mixer registers itself with the loaded model, so engine functions that need the base
can set whatever it applied aside (``LoadedModel.at_base``).
"""

from __future__ import annotations

import itertools
import time
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch

from engine.adapters import LowRankAdapters
from engine.directions import Direction, DirectionError, Mix, check_model
from engine.hooks import block_output, with_block_output
from engine.models import LoadedModel

POSITIONS = ("all", "generated")


class Mixer:
    def __init__(self, lm: LoadedModel, positions: str = "all"):
        if positions not in POSITIONS:
            raise DirectionError(f"positions must be one of {POSITIONS}, not {positions!r}.")
        self.lm = lm
        self.positions = positions
        self.directions: dict[str, Direction] = {}
        self._params = dict(lm.model.named_parameters())
        self._base: dict[str, torch.Tensor] = {}  # exact copies of the weights a weight-space direction touches
        self._modified: set[str] = set()
        self._weight_mix = Mix()  # what is merged into the weights now
        self._adapters = LowRankAdapters(lm.model)
        self.merged = False  # whether the low-rank directions of the applied mix are merged into the weights
        self.rows: list[dict[str, float]] = [{}]  # the weights now applied, one dict per batch row
        self.prompt_len: Optional[int] = None  # set by generation for "generated" positions on full sequences
        self._delta: dict[int, torch.Tensor] = {}  # layer -> [rows, hidden] in the model's dtype
        self._hooks: dict[int, torch.utils.hooks.RemovableHandle] = {}
        self._blocks = lm.decoder_layers()
        self._merge_s: Optional[float] = None  # measured: merging the low-rank directions and putting them back
        lm.mixers.add(self)

    # ------------------------------------------------------------------ directions
    def add(self, direction: Direction, name: Optional[str] = None) -> str:
        """Add a direction (refused if made for another model). Returns the name it is mixed under."""
        check_model(direction.model, self.lm)
        name = name or direction.name
        if name in self.directions:
            raise DirectionError(f"A direction named {name!r} is already loaded; give this one another name.")
        layers = direction.steered_layers()
        bad = [l for l in layers if not 0 <= l < self.lm.n_layers]
        if bad or (direction.space == "activation" and not layers):
            raise DirectionError(f"{name} steers layers {layers}, but {self.lm.name} has layers 0 to "
                                 f"{self.lm.n_layers - 1}. Rebuild the direction for this model, or choose its layers.")
        for n in direction.weight_names():
            if n not in self._params:
                raise DirectionError(f"{name}: the model has no weight {n}.")
        if self._adapters.fits(direction):
            self._adapters.add(name, direction)
            self._merge_s = None  # more weights to merge: measured again when next needed
        # Its largest entry, once: whether a mix overflows is then one comparison per apply, not a pass over
        # every touched element.
        direction.max_abs()
        self.directions[name] = direction
        return name

    def interference(self, threshold: float = 0.7) -> list[tuple[str, str, float]]:
        """Pairs of directions whose vectors point nearly the same (or opposite) way at the layers they steer:
        summing them mostly adds up one effect, or cancels it."""
        flagged = []
        for (a, da), (b, db) in itertools.combinations(self.directions.items(), 2):
            cos = da.cosine(db)  # None across spaces: a weight delta and an activation vector do not compare
            if cos is not None and abs(cos) >= threshold:
                flagged.append((a, b, round(cos, 3)))
        return flagged

    # ------------------------------------------------------------------ weights
    def set_weights(self, weights: dict[str, float]) -> None:
        self.set_row_weights([weights])

    def in_place(self, name: str, merge: bool = False) -> bool:
        """Whether a direction's weights are merged into the model when it is applied (else: hooks)."""
        d = self.directions[name]
        return d.space == "weight" and (merge or name not in self._adapters.directions)

    def _merged_part(self, mix: Mix, merge: bool) -> Mix:
        return Mix(tuple(t for t in mix.terms if self.in_place(t[0], merge)))

    def batches(self, rows: Sequence[dict[str, float]], merge: bool = False) -> list[list[int]]:
        """Row indices grouped into batches that can run together: rows that share the weights of what is merged
        in place (full-rank directions). Steering and low-rank directions can differ per row."""
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(rows):
            key = tuple(sorted((k, float(v)) for k, v in r.items() if v and k in self.directions and self.in_place(k, merge)))
            groups.setdefault(key, []).append(i)
        return list(groups.values())

    def prefer_merged(self, rows: Sequence[dict[str, float]], forwards: int) -> bool:
        """Whether ``forwards`` passes over a batch of ``rows`` run faster with their low-rank mix merged into the
        weights than as adapters: only when every row has the same low-rank weights, and by measurement, not by
        rule. The adapters' cost per pass at this batch size is what their hooks timed so far (nothing timed:
        the adapter, and this run times it); the cost of merging is the time of one merge and of putting the
        adapter back, timed once for this set of directions (here, the first time it matters)."""
        low = [{k: float(v) for k, v in r.items() if v and k in self._adapters.directions} for r in rows]
        if not low or not low[0] or any(l != low[0] for l in low[1:]):
            return False
        per_pass = self._adapters.cost_per_forward(len(rows))
        if per_pass is None:
            return False
        if self._merge_s is None:
            t0 = time.perf_counter()
            with self.applied(rows, merge=True):  # and back to what was applied, whatever happens
                pass
            self._merge_s = time.perf_counter() - t0
        return per_pass * forwards > self._merge_s

    def set_row_weights(self, rows: Sequence[dict[str, float]], merge: bool = False) -> None:
        """Apply one weight dict per batch row (a single dict applies to every row); ``merge`` puts every
        weight-space direction into the weights (one mix for all rows), as an export needs.

        A request that is not valid (an unknown direction, a weight that is not a finite number, rows that
        differ in what is merged in place) changes nothing. A failure while applying leaves the exact base model."""
        mixes = [Mix.of(self.directions, r) for r in rows] or [Mix()]
        rows = [{k: float(v) for k, v in r.items()} for r in rows] or [{}]
        weight_mix = self._merged_part(mixes[0], merge)
        if any(self._merged_part(m, merge).weights != weight_mix.weights for m in mixes[1:]):
            raise DirectionError("Rows of one batch must share the weights of their full-rank directions (merged into "
                                 "the model); steering and low-rank directions can differ per row.")
        adapter_rows = [] if merge else [{k: v for k, v in r.items() if k in self._adapters.directions} for r in rows]
        p = next(self.lm.model.parameters())
        delta: dict[int, torch.Tensor] = {}
        for i, m in enumerate(mixes):
            for layer, d in m.steering.activation_deltas().items():
                if layer not in delta:
                    delta[layer] = torch.zeros(len(rows), self.lm.hidden_size, dtype=torch.float32)
                delta[layer][i] += d
        delta = {l: d.to(device=p.device, dtype=p.dtype) for l, d in delta.items()}
        for layer, d in delta.items():
            if not torch.isfinite(d).all():
                raise DirectionError(f"The steering weights {_describe(rows)} add values too large to represent at layer "
                                     f"{layer} (they overflow to infinity). Use smaller weights; nothing was applied.")
        if weight_mix.max_abs() >= torch.finfo(p.dtype).max or self._adapters.bound(adapter_rows) >= torch.finfo(p.dtype).max:
            self._reset()
            raise DirectionError(f"The weights {_describe(rows)} make the weight deltas overflow to "
                                 "infinity; use smaller weights. The model is back at its base weights.")
        try:
            self._apply_weights(weight_mix)
            self._adapters.set(adapter_rows) if adapter_rows else self._adapters.clear()
            self.merged = merge
            self._delta = delta
            for layer in list(self._hooks):
                if layer not in self._delta:
                    self._hooks.pop(layer).remove()
            for layer in self._delta:
                if layer not in self._hooks:
                    self._hooks[layer] = self._blocks[layer].register_forward_hook(self._hook(layer))
            self.rows = rows
        except BaseException:
            self._reset()
            raise

    @torch.no_grad()
    def _restore_weights(self) -> None:
        """Every weight a direction touched, copied back from its exact base copy."""
        for n in self._modified:
            self._params[n].copy_(self._base[n])
        self._modified = set()
        self._weight_mix = Mix()

    def _reset(self) -> None:
        """The exact base model: every touched weight copied back, no hook."""
        self._restore_weights()
        self._adapters.clear()
        self.merged = False
        for handle in self._hooks.values():
            handle.remove()
        self._hooks = {}
        self._delta = {}
        self.rows = [{}]

    @torch.no_grad()
    def _apply_weights(self, mix: Mix) -> None:
        if mix.weights == self._weight_mix.weights:
            return
        self._restore_weights()  # and until every delta is in, the applied mix is unknown: a failure resets to the base
        for n, delta in mix.weight_deltas():
            w = self._params[n]
            if n not in self._base:  # first merged here: until now it was the base
                self._base[n] = w.detach().clone()
            self._modified.add(n)  # before the edit: a failure inside it is still undone
            w.add_(delta.to(device=w.device, dtype=w.dtype))
        self._weight_mix = mix

    def clear(self) -> None:
        """Back to the exact base model."""
        self.set_row_weights([{}])

    @property
    def active(self) -> bool:
        """Whether anything is applied (``LoadedModel.at_base`` sets such mixers aside)."""
        return bool(self._hooks) or bool(self._modified) or self._adapters.active

    def mix(self, weights: dict[str, float]) -> Mix:
        """The loaded directions with these weights, as one value (what the export writes)."""
        return Mix.of(self.directions, weights)

    @contextmanager
    def applied(self, rows: Sequence[dict[str, float]], merge: bool = False) -> Iterator[None]:
        """Apply ``rows`` for the duration of a block, then put back what was applied before."""
        before, merged = [dict(r) for r in self.rows], self.merged
        self.set_row_weights(rows, merge)
        try:
            yield
        finally:
            self.set_row_weights(before, merged)

    def _hook(self, layer: int):
        def hook(module, args, output):
            d = self._delta.get(layer)
            if d is None:
                return None
            h = block_output(output)
            if d.shape[0] not in (1, h.shape[0]):
                raise DirectionError(f"The mix has {d.shape[0]} rows of weights but the batch has {h.shape[0]}.")
            add = d[:, None, :]
            if self.positions == "generated" and h.shape[1] > 1:
                # A full sequence (prefill): steer only what lies beyond the prompt, if anything.
                start = self.prompt_len if self.prompt_len is not None else h.shape[1]
                if start >= h.shape[1]:
                    return None
                h = torch.cat([h[:, :start], h[:, start:] + add], dim=1)
            else:
                h = h + add
            return with_block_output(output, h)

        return hook


def _describe(rows: Sequence[dict[str, float]]) -> str:
    return "; ".join(", ".join(f"{k}={v:g}" for k, v in r.items()) for r in rows if r) or "(none)"


def batches(mixer: Optional[Mixer], rows: Sequence[dict[str, float]]) -> list[list[int]]:
    """The rows grouped into as few batches as the mix allows (one, without a mixer)."""
    return [list(range(len(rows)))] if mixer is None else mixer.batches(rows)
