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

    def scale(self, rows: Sequence[dict[str, float]], like: torch.Tensor) -> Optional[torch.Tensor]:
        """[rows, K r]: block k of each row holds that row's weight of member k; None when every weight is 0."""
        weights = [[float(r.get(m, 0.0)) for m in self.members] for r in rows]
        if not any(w for row in weights for w in row):
            return None
        rank = next(iter(self.A.values())).shape[0]
        # one torch call, made from Python numbers: every call that releases the GIL may then wait for the GUI
        # thread to hand it back (up to the interpreter's switch interval)
        return torch.tensor([[w for w in row for _ in range(rank)] for row in weights], dtype=like.dtype, device=like.device)


class LowRankAdapters:
    """Forward hooks on the linear layers that low-rank directions change, adding [B_1 ... B_K] (alpha (x) A0 x)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.modules = dict(model.named_modules())
        self.like = next(model.parameters())
        self.groups: list[_Group] = []
        self.directions: dict[str, Direction] = {}
        self._branches: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}  # module -> [(A_rep, B^T, group)]
        self._scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # group -> ([rows, 1, K r], [K r])
        self._layouts: dict[tuple, dict] = {}  # the groups in use -> the branches
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}
        self._folded: dict[tuple, torch.Tensor] = {}
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
            layout: dict[str, list[tuple[torch.Tensor, torch.Tensor, int]]] = {}
            for i in key:
                g = self.groups[i]
                for w in g.A:
                    layout.setdefault(w[: -len(".weight")], []).append((g.A_rep[w], g.Bt[w], i))
            self._layouts[key] = layout
        branches = self._layouts[key]
        for module in [m for m in self._hooks if m not in branches]:
            self._hooks.pop(module).remove()
        # the shapes the hook multiplies by, made here once: a [rows, 1, K r] per-row scale and a [K r] shared one
        self._branches = branches
        self._scales = {i: (sc[:, None, :], sc[0]) for i, sc in scales.items()}
        self._folded = {}  # (module, group) -> A_rep times the one row's weights
        self._account = self._spent.setdefault(len(rows), [0.0, 0])
        self._first = next(iter(branches), None)
        for module in branches:
            if module not in self._hooks:
                self._hooks[module] = self.modules[module].register_forward_hook(self._hook(module))

    def clear(self) -> None:
        for handle in self._hooks.values():
            handle.remove()
        self._hooks, self._branches, self._scales, self._folded = {}, {}, {}, {}

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def _hook(self, module: str):
        def hook(mod, args, out):
            t0 = time.perf_counter()
            x = args[0]
            for A_rep, Bt, group in self._branches.get(module, ()):
                per_row, shared = self._scales[group]
                if x.dim() == 3 and x.shape[0] == per_row.shape[0] and per_row.shape[0] > 1:
                    h = (x @ A_rep).mul_(per_row)  # [..., K r]: A0 x once per member, scaled per row
                elif per_row.shape[0] == 1:  # one mix: its weights folded into A0, once per apply, on first use
                    folded = self._folded.get((module, group))
                    if folded is None:
                        folded = self._folded[(module, group)] = A_rep * shared
                    h = x @ folded
                else:
                    raise DirectionError(f"The mix has {per_row.shape[0]} rows of weights but the batch has {x.shape[0]}.")
                if torch.is_grad_enabled() or not out.is_contiguous():
                    out = out + h @ Bt
                else:  # the layer's own fresh output, added to in place: one call instead of two
                    out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), Bt)
            account = self._account
            account[0] += time.perf_counter() - t0
            if module == self._first:
                account[1] += 1
            return out

        return hook
