"""Low-rank weight-space directions applied as adapters, without touching the weights.

A low-rank direction is tau_k = B_k A0 per weight matrix, with A0 shared by the directions trained with the
same seed and rank. A mix sum_k alpha_k tau_k is then (sum_k alpha_k B_k) A0, and a linear layer computes

    W x + sum_k alpha_k B_k (A0 x) = W x + [B_1 ... B_K] (alpha (x) A0 x)

with the K directions' B's side by side, [out, K r], and the rank-r activations h = A0 x repeated K times,
block k scaled by alpha_k. Applying a new point only replaces the [rows, K] weights: nothing of the size of a
weight is computed, and each batch row carries its own weights, so columns at different points of the plane
run as one batch (per-row adapters, as in S-LoRA / punica). The forward pays a second product of inner size
K r instead of r.

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
    A_rep: dict[str, torch.Tensor] = field(default_factory=dict)  # weight -> [in, K r]: A0^T side by side K times
    A0T: dict[str, torch.Tensor] = field(default_factory=dict)  # weight -> A0^T [in, r]

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
            self.A_rep[w] = A.repeat(len(self.members), 1).T.contiguous()  # [in, K r]: x @ A_rep is h repeated K times
            self.A0T[w] = A.T.contiguous()

    def scale(self, rows: Sequence[dict[str, float]], like: torch.Tensor) -> Optional[torch.Tensor]:
        """[rows, K r]: block k of each row holds that row's weight of member k; None when every weight is 0."""
        weights = [[float(r.get(m, 0.0)) for m in self.members] for r in rows]
        if not any(w for row in weights for w in row):
            return None
        rank = next(iter(self.A.values())).shape[0]
        # one torch call, made from Python numbers: every call that releases the GIL may then wait for the GUI
        # thread to hand it back (up to the interpreter's switch interval)
        return torch.tensor([[w for w in row for _ in range(rank)] for row in weights], dtype=like.dtype, device=like.device)


class _Branch:
    """One group's adapter on one linear layer, with what its hook reuses from pass to pass."""

    __slots__ = ("A", "A0", "Bt", "group", "folded", "epoch", "Bt_batch", "batch")

    def __init__(self, A: torch.Tensor, A0: torch.Tensor, Bt: torch.Tensor, group: int):
        self.A, self.A0, self.Bt, self.group = A, A0, Bt, group  # A_rep [in, K r], A0^T [in, r], B^T [K r, out]
        # One mix: sum_k alpha_k B_k^T [r, out], for the apply ``epoch`` (half the bytes a pass reads for K = 2)
        self.folded: Optional[torch.Tensor] = None
        self.epoch = -1
        self.Bt_batch, self.batch = Bt[None], 1  # B^T seen as a batch of ``batch`` (a view), for ``baddbmm_``

    def Bt_for(self, batch: int) -> torch.Tensor:
        if batch != self.batch:
            self.Bt_batch, self.batch = self.Bt.expand(batch, -1, -1), batch
        return self.Bt_batch

    def fold(self, alphas: torch.Tensor, epoch: int) -> torch.Tensor:
        """B^T of the one mix [r, out], from the members' weights [1, K]; [1, r, out] for ``baddbmm_``."""
        if self.epoch != epoch:
            K, r = alphas.shape[1], self.A0.shape[1]
            self.folded, self.epoch = torch.mm(alphas, self.Bt.view(K, -1)).view(1, r, -1), epoch
        return self.folded


class LowRankAdapters:
    """Forward hooks on the linear layers that low-rank directions change, adding [B_1 ... B_K] (alpha (x) A0 x)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.like = next(model.parameters())
        self.groups: list[_Group] = []
        self.directions: dict[str, Direction] = {}
        self._branches: dict[str, list[_Branch]] = {}  # module -> its branches in the applied layout
        self._scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # group -> ([rows, 1, K r], [K r])
        self._layouts: dict[tuple, dict] = {}  # the groups in use -> the branches
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._epoch = 0  # counts the applies: a branch's folded A_rep belongs to one
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
                    layout.setdefault(w[: -len(".weight")], []).append(_Branch(g.A_rep[w], g.A0T[w], g.Bt[w], i))
            self._layouts[key] = layout
        branches = self._layouts[key]
        for module in [m for m in self._hooks if m not in branches]:
            self._hooks.pop(module).remove()
        # the shapes the hook multiplies by, made here once: a [rows, 1, K r] per-row scale and, for one mix, the
        # members' weights [1, K]
        self._branches = branches
        self._scales = {i: (sc[:, None, :], sc[:1, ::next(iter(self.groups[i].A.values())).shape[0]])
                        for i, sc in scales.items()}
        self._epoch += 1  # every branch's folded A_rep is now stale: made again on first use
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
        # The hot path of every pass: two or three torch calls a branch and as little Python as will do (on a
        # small model at decode time the interpreter, not the arithmetic, is most of what the adapter costs).
        matmul, perf_counter, grad_enabled = torch.matmul, time.perf_counter, torch.is_grad_enabled

        def hook(mod, args, out):
            t0 = perf_counter()
            x = args[0]
            scales = self._scales
            in_place = out.is_contiguous() and not grad_enabled()
            for br in self._branches.get(module, ()):
                per_row, alphas = scales[br.group]
                if per_row.shape[0] == 1:  # one mix: A0 x, then its B's summed once per apply, on first use
                    Bt = br.fold(alphas, self._epoch)
                    h = matmul(x, br.A0)
                    if out.dim() == 3 and in_place and out.shape[0] == 1:
                        out.baddbmm_(h, Bt)  # the layer's own fresh output, added to in place: one call
                    else:
                        out = out + matmul(h, Bt[0]) if not in_place else out.add_(matmul(h, Bt[0]))
                    continue
                if x.dim() != 3 or x.shape[0] != per_row.shape[0]:
                    raise DirectionError(f"The mix has {per_row.shape[0]} rows of weights but the batch has {x.shape[0]}.")
                h = matmul(x, br.A).mul_(per_row)  # A0 x once per member, scaled per row
                if in_place:
                    out.baddbmm_(h, br.Bt_for(out.shape[0]))
                else:
                    out = out + matmul(h, br.Bt)
            account = self._account
            account[0] += perf_counter() - t0
            if module == self._first:
                account[1] += 1
            return out

        return hook
