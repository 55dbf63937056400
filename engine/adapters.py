"""Low-rank weight-space directions applied as adapters, without touching the weights.

A low-rank direction is tau_k = B_k A0 per weight matrix, with A0 shared by the directions trained with the
same seed and rank. A mix sum_k alpha_k tau_k is then (sum_k alpha_k B_k) A0, and a linear layer computes

    W x + (sum_k alpha_k B_k) (A0 x)

Applying a new point only replaces a [rows, K] tensor of weights: nothing of the size of a weight is computed
then. Each layer sums its B's for the rows on its first pass after the apply (one small product: [rows, K] times
the K B's), and every pass pays A0 x at rank r and one batched product with the rows' summed B's. Each batch row
carries its own weights, so columns at different points of the plane run as one batch (per-row adapters, as in
S-LoRA / punica).

Directions whose A0 differ (another seed or rank) go in separate groups, each its own branch. With every
weight of a group at zero its hooks are removed: the base model runs with no hook at all.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from engine.directions import Direction, DirectionError
from engine.hooks import linear_layer


@dataclass
class _Group:
    """Directions sharing A0 on every weight they have in common."""

    A: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> A0 [r, in], the model's dtype and device
    members: list[str] = field(default_factory=list)  # direction names, in the order of their blocks
    bound: list[float] = field(default_factory=list)  # per member: its largest |B| entry
    Bt: dict[str, torch.Tensor] = field(default_factory=dict)  # weight -> [K r, out]: member k's B^T in block k (zeros
    #                                                             where it does not change the weight)

    def accepts(self, d: Direction) -> bool:
        return all(torch.equal(self.A[w].float().cpu(), d.low_rank(w)[1].float()) for w in d.weight_names() if w in self.A)

    def add(self, name: str, d: Direction, like: torch.Tensor, blocks: dict[str, Direction]) -> None:
        for w in d.weight_names():
            self.A.setdefault(w, d.low_rank(w)[1].to(device=like.device, dtype=like.dtype))
        self.members.append(name)
        self.bound.append(max(float(d.low_rank(w)[0].abs().max()) for w in d.weight_names()))
        for w, A in self.A.items():
            out = next(blocks[m].low_rank(w)[0].shape[0] for m in self.members if blocks[m].changes(w))
            parts = [blocks[m].low_rank(w)[0].T if blocks[m].changes(w) else torch.zeros(A.shape[0], out)
                     for m in self.members]
            self.Bt[w] = torch.cat(parts).to(device=like.device, dtype=like.dtype).contiguous()

    def scale(self, rows: Sequence[dict[str, float]], like: torch.Tensor) -> Optional[torch.Tensor]:
        """[rows, K]: each row's weight of each member; None when every weight is 0."""
        weights = [[float(r.get(m, 0.0)) for m in self.members] for r in rows]
        if not any(w for row in weights for w in row):
            return None
        # one torch call, made from Python numbers: every call that releases the GIL may then wait for the GUI
        # thread to hand it back (up to the interpreter's switch interval)
        return torch.tensor(weights, dtype=like.dtype, device=like.device)


class _Branch:
    """One group's adapter on one linear layer, with the rows' summed B's of the apply now in force."""

    __slots__ = ("A0", "Bt", "group", "folded", "epoch", "wide", "batch")

    def __init__(self, A0: torch.Tensor, Bt: torch.Tensor, group: int):
        self.A0, self.Bt, self.group = A0, Bt, group  # A0^T [in, r] (a view), the members' B^T stacked [K r, out]
        self.folded: Optional[torch.Tensor] = None  # [rows, r, out]: sum_k alpha_k B_k^T per row, for apply ``epoch``
        self.epoch = -1
        self.wide, self.batch = None, 0  # one mix's folded B^T seen as a batch of ``batch`` rows (a view)

    def fold(self, alphas: torch.Tensor, epoch: int, tracked: bool) -> torch.Tensor:
        """The rows' summed B's; ``tracked``: for a pass autograd may record, which cannot use what an
        inference-mode pass (generation) made."""
        if self.epoch != epoch or (tracked and self.folded.is_inference() and not torch.is_inference_mode_enabled()):
            rows, K = alphas.shape
            self.folded = torch.mm(alphas, self.Bt.view(K, -1)).view(rows, self.A0.shape[1], -1)
            self.epoch, self.batch = epoch, 0
        return self.folded

    def for_batch(self, batch: int) -> torch.Tensor:
        if batch != self.batch:
            self.wide, self.batch = self.folded.expand(batch, -1, -1), batch
        return self.wide


class LowRankAdapters:
    """Forward hooks on the linear layers that low-rank directions change, adding [B_1 ... B_K] (alpha (x) A0 x)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.like = next(model.parameters())
        self.groups: list[_Group] = []
        self.directions: dict[str, Direction] = {}
        self._branches: dict[str, list[_Branch]] = {}  # module -> its branches in the applied layout
        self._scales: dict[int, torch.Tensor] = {}  # group -> the rows' weights of its members [rows, K]
        self._layouts: dict[tuple, dict] = {}  # the groups in use -> the branches
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._epoch = 0  # counts the applies: a branch's folded B's belong to one
        # What the branches cost, measured inside the hooks: batch rows -> [seconds, forward passes]
        self._spent: dict[int, list] = {}
        self._account: list = [0.0, 0]  # the entry of ``_spent`` for the rows now applied
        self._first: Optional[str] = None  # the module whose hook counts the forward passes

    def cost_per_forward(self, rows: int) -> Optional[float]:
        """Seconds the branches added to one forward pass at this batch size, averaged over what ran so far
        (None before any). Timed on the host: on a GPU it is the launch cost, not the kernels'."""
        spent = self._spent.get(rows)
        return spent[0] / spent[1] if spent and spent[1] else None

    def fits(self, d: Direction) -> bool:
        """A weight-space direction with B @ A0 factors on every weight it changes, each the weight of a linear
        layer (anything else is merged into the weights instead)."""
        names = d.weight_names()
        return bool(names) and all(d.low_rank(w) is not None and linear_layer(self.modules, w) is not None for w in names)

    def add(self, name: str, d: Direction) -> None:
        """Run ``d`` as an adapter (``fits(d)`` must hold)."""
        self.directions[name] = d
        group = next((g for g in self.groups if g.accepts(d)), None)
        if group is None:
            group = _Group()
            self.groups.append(group)
        group.add(name, d, self.like, self.directions)
        self._layouts = {}

    def bound(self, rows: Sequence[dict[str, float]]) -> float:
        """An upper bound on any entry of the mixed B's: what must stay finite in the model's dtype."""
        return max((sum(abs(r.get(m, 0.0)) * b for m, b in zip(g.members, g.bound)) for g in self.groups for r in rows),
                   default=0.0)

    @torch.no_grad()
    def set(self, rows: Sequence[dict[str, float]]) -> None:
        """Apply one weight dict per batch row (only the low-rank directions' weights are read): a [rows, K r]
        tensor per group, nothing more, so the apply costs the same whatever the model's size."""
        scales = {}
        for i, g in enumerate(self.groups):
            scale = g.scale(rows, self.like)
            if scale is not None:
                scales[i] = scale
        key = tuple(scales)
        if key not in self._layouts:
            layout: dict[str, list[_Branch]] = {}
            for i in key:
                g = self.groups[i]
                for w in g.A:
                    layout.setdefault(w[: -len(".weight")], []).append(_Branch(g.A[w].T, g.Bt[w], i))
            self._layouts[key] = layout
        branches = self._layouts[key]
        for module in [m for m in self._hooks if m not in branches]:
            self._hooks.pop(module).remove()
        self._branches = branches
        self._scales = scales
        self._epoch += 1  # every branch's folded B's are now stale: summed again on first use
        self._account = self._spent.setdefault(len(rows), [0.0, 0])
        self._first = next(iter(branches), None)
        for module in branches:
            if module not in self._hooks:
                self._hooks[module] = self.modules[module].register_forward_hook(self._hook(module))

    def clear(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks, self._branches, self._scales = {}, {}, {}

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def _hook(self, module: str):
        # The hot path of every pass: two torch calls a branch and as little Python as will do (on a
        # small model at decode time the interpreter, not the arithmetic, is most of what the adapter costs).
        matmul, perf_counter, grad_enabled = torch.matmul, time.perf_counter, torch.is_grad_enabled

        def hook(mod, args, out):
            t0 = perf_counter()
            x = args[0]
            scales = self._scales
            in_place = out.is_contiguous() and not grad_enabled()
            for br in self._branches.get(module, ()):
                Bt = br.fold(scales[br.group], self._epoch, not in_place)  # [rows, r, out]
                rows = Bt.shape[0]
                if rows > 1 and (x.dim() != 3 or x.shape[0] != rows):
                    raise DirectionError(f"The mix has {rows} rows of weights but the batch has {x.shape[0]}.")
                h = matmul(x, br.A0)  # A0 x [..., r]
                if in_place and out.dim() == 3:  # the layer's own fresh output, added to in place: one call
                    out.baddbmm_(h, Bt if out.shape[0] == rows else br.for_batch(out.shape[0]))
                elif in_place and out.dim() == 2 and rows == 1:
                    out.addmm_(h, Bt[0])
                else:
                    out = out + matmul(h, Bt if rows > 1 else Bt[0])
            account = self._account
            account[0] += perf_counter() - t0
            if module == self._first:
                account[1] += 1
            return out

        return hook
