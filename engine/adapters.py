"""Low-rank weight-space directions applied as adapters, without touching the weights.

A low-rank direction is tau_k = B_k A0 per weight matrix, with A0 shared by the directions trained with the
same seed and rank. A mix sum_k alpha_k tau_k is then (sum_k alpha_k B_k) A0, and a linear layer computes

    W x + (sum_k alpha_k B_k) (A0 x)

so applying a new point only recomputes the small sum of B's: one matrix product of the weights [rows, K]
with every direction's B's stacked and flattened [K, total]. Each batch row carries its own mixed B, so
columns at different points of the plane run as one batch (per-row adapters, as in S-LoRA / punica).

Directions whose A0 differ (another seed or rank) go in separate groups, each its own branch. With every
weight of a group at zero its hooks are removed: the base model runs with no hook at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from engine.directions import Direction, DirectionError


@dataclass
class _Group:
    """Directions sharing A0 on every weight they have in common."""

    A: dict[str, torch.Tensor] = field(default_factory=dict)  # weight name -> A0 [r, in], the model's dtype and device
    members: list[str] = field(default_factory=list)  # direction names, one row of ``stack`` each
    bound: list[float] = field(default_factory=list)  # per member: its largest |B| entry
    offsets: dict[str, tuple[int, int, int]] = field(default_factory=dict)  # weight -> (start, out, r) in a row
    stack: Optional[torch.Tensor] = None  # [K, total] float32: member k's B's, transposed and flattened one after another
    buffers: dict[int, tuple[torch.Tensor, dict[str, torch.Tensor]]] = field(default_factory=dict)  # rows -> (mixed, views)

    def accepts(self, d: Direction) -> bool:
        return all(torch.equal(self.A[w].float().cpu(), d.low_rank(w)[1].float()) for w in d.weight_names() if w in self.A)

    def add(self, name: str, d: Direction, like: torch.Tensor, blocks: dict[str, Direction]) -> None:
        for w in d.weight_names():
            self.A.setdefault(w, d.low_rank(w)[1].to(device=like.device, dtype=like.dtype))
        self.members.append(name)
        self.bound.append(max(float(d.low_rank(w)[0].abs().max()) for w in d.weight_names()))
        start, self.offsets = 0, {}
        for w, A in self.A.items():
            out = next(blocks[m].low_rank(w)[0].shape[0] for m in self.members if blocks[m].changes(w))
            self.offsets[w] = (start, out, A.shape[0])
            start += out * A.shape[0]
        stack = torch.zeros(len(self.members), start, dtype=torch.float32, device=like.device)
        for k, m in enumerate(self.members):
            for w in blocks[m].weight_names():
                s, out, r = self.offsets[w]
                # B transposed [r, out]: the branch's second product then reads it contiguously
                stack[k, s:s + out * r] = blocks[m].low_rank(w)[0].float().T.reshape(-1).to(like.device)
        self.stack, self.buffers = stack, {}

    def mixed(self, alpha: torch.Tensor, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weight -> its mixed B, transposed, per row [rows, r, out], for the weights ``alpha`` [rows, K]: one matrix
        product into a buffer whose per-weight views are made once per row count."""
        rows = alpha.shape[0]
        if rows not in self.buffers:
            buf = torch.empty(rows, self.stack.shape[1], dtype=like.dtype, device=like.device)
            self.buffers[rows] = (buf, {w: buf[:, s:s + out * r].view(rows, r, out) for w, (s, out, r) in self.offsets.items()})
        buf, views = self.buffers[rows]
        alpha = alpha.to(self.stack.device)
        if buf.dtype == torch.float32:
            torch.matmul(alpha, self.stack, out=buf)
        else:  # summed in float32, then rounded once to the model's dtype
            buf.copy_(alpha @ self.stack)
        return views


class LowRankAdapters:
    """Forward hooks on the linear layers that low-rank directions change, adding (A0 x) times the mixed B."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.like = next(model.parameters())
        self.groups: list[_Group] = []
        self.directions: dict[str, Direction] = {}
        self._branches: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # module -> [(A0, B^T [rows, r, out])]
        self._layouts: dict[tuple, dict] = {}  # (rows, groups in use) -> the branches (views into the groups' buffers)
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def fits(self, d: Direction) -> bool:
        """A weight-space direction with B @ A0 factors on every weight it changes, each the weight of a linear
        layer (anything else is merged into the weights instead)."""
        names = d.weight_names()
        return bool(names) and all(d.low_rank(w) is not None and w.endswith(".weight")
                                   and isinstance(self.modules.get(w[: -len(".weight")]), torch.nn.Linear) for w in names)

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
        """Apply one weight dict per batch row (only the low-rank directions' weights are read)."""
        used, views = [], {}
        for i, g in enumerate(self.groups):
            alpha = torch.tensor([[float(r.get(m, 0.0)) for m in g.members] for r in rows], dtype=torch.float32)
            if alpha.any():
                used.append(i)
                views[i] = g.mixed(alpha, self.like)  # [rows, r, out] per weight: every mixed B at once
        key = (len(rows), tuple(used))
        if key not in self._layouts:
            layout: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
            for i in used:
                for w, B in views[i].items():
                    layout.setdefault(w[: -len(".weight")], []).append((self.groups[i].A[w], B))
            self._layouts[key] = layout
        branches = self._layouts[key]
        for module in [m for m in self._hooks if m not in branches]:
            self._hooks.pop(module).remove()
        self._branches = branches
        for module in branches:
            if module not in self._hooks:
                self._hooks[module] = self.modules[module].register_forward_hook(self._hook(module))

    def clear(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks, self._branches = {}, {}

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def _hook(self, module: str):
        def hook(mod, args, out):
            x = args[0]
            for A, Bt in self._branches.get(module, ()):
                h = x @ A.T  # [..., r]
                if x.dim() == 3 and x.shape[0] == Bt.shape[0]:
                    out = out + torch.bmm(h, Bt)  # a mix per row (bmm is also the fastest for one row)
                elif Bt.shape[0] == 1:
                    out = out + h @ Bt[0]
                else:
                    raise DirectionError(f"The mix has {Bt.shape[0]} rows of weights but the batch has {x.shape[0]}.")
            return out

        return hook

