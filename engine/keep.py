"""Train a direction that leaves another objective where it is.

To first order in tau, every pair's DPO margin is m_j(tau) = m_j(0) + <g_j, tau>, with g_j its margin gradient at
theta0 with respect to the low-rank B factors (``engine.signal.pair_gradients``). A direction that stays in the
orthogonal complement of the g_j of a set of pairs leaves each of their margins unchanged to first order, which
is what "train helpfulness, keep verbosity" means for a model the direction is trained on linearized.

``KeptMargins`` holds an orthonormal basis Q of span{g_j} for the *training split* of the pairs to keep (their
held-out split stays unseen, for ``tsdpo effects`` to score), and ``project`` sets tau <- tau - Q^T (Q tau) after
every optimizer step: tau starts at 0, so it never leaves the complement, whatever the optimizer does in between
(a projected gradient alone would not do: Adam rescales each coordinate). Low-rank directions only: a full-rank
basis would hold a copy of the model's weights per kept pair.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch

from engine.data import PairSet
from engine.directions import DirectionError
from engine.errors import Cancelled
from engine.hooks import in_out, linear_layer
from engine.models import LoadedModel
from engine.progress import Phase, ProgressFn

# Gradients whose share of the Gram matrix's largest eigenvalue is below this add no direction of their own
# (duplicated pairs, a pair cut to nothing): they are dropped from the basis instead of amplifying rounding.
RELATIVE_EIGENVALUE_FLOOR = 1e-8
# Above this mean share of every step taken out, what is left is rounding, not a direction: refused, loudly.
MAX_REMOVED_SHARE = 0.99


def require_lowrank(param: str) -> None:
    """Keeping pairs unchanged is for low-rank directions (module docstring): said before any work starts."""
    if param != "lowrank":
        raise DirectionError("Keeping another objective unchanged needs a low-rank direction (--param lowrank): a "
                             "full-rank one would hold a copy of the model's weights per kept pair.")


class KeptMargins:
    """An orthonormal basis ``Q`` [k, D] of the kept pairs' margin gradients over the B factors of ``names`` (each
    B [out, rank] row-major, in ``names`` order), and what it was made from (``describe``)."""

    def __init__(self, names: list[str], sizes: list[int], Q: torch.Tensor, info: dict):
        self.names, self.sizes, self.Q, self.info = list(names), list(sizes), Q, dict(info)

    @classmethod
    def build(cls, lm: LoadedModel, pairs: PairSet, names: list[str], rank: int, seed: int, val_fraction: float,
              beta: float, max_prompt_tokens: int, max_response_tokens: int, batch_size: int = 4,
              progress: Optional[ProgressFn] = None, should_stop: Callable[[], bool] = lambda: False) -> "KeptMargins":
        """The basis for the training split of ``pairs`` (``val_fraction``, ``seed``: the split training uses), from
        their margin gradients at the model as it is (the caller runs this at the base)."""
        from engine.signal import SignalConfig, pair_gradients
        from engine.tangent import shared_factors

        train, _ = pairs.split(val_fraction, seed)
        if len(train) < 1:
            raise DirectionError(f"The pairs to keep unchanged ({pairs.objective}, {pairs.source}) leave no training "
                                 f"pair at a validation fraction of {val_fraction:g}; give more pairs.")
        A = shared_factors(lm, names, rank, seed)
        cfg = SignalConfig(rank=rank, seed=seed, beta=beta, max_prompt_tokens=max_prompt_tokens,
                           max_response_tokens=max_response_tokens)
        t0 = time.perf_counter()
        n_batches = math.ceil(len(train) / batch_size)
        phase = Phase(progress, f"gradients of the {pairs.objective} pairs to keep", n_batches)
        rows = []
        for b, i in enumerate(range(0, len(train), batch_size)):
            if should_stop():
                raise Cancelled(f"the kept pairs' gradients ({b} of {n_batches} batches)")
            rows.append(pair_gradients(lm, train.pairs[i:i + batch_size], names, A, cfg))
            phase.update(b + 1)
        G = torch.cat(rows)
        del rows
        if not torch.isfinite(G).all():
            raise DirectionError(f"The margin gradients of the {pairs.objective} pairs to keep are not finite: the model "
                                 "gives some of their replies a probability of 0 (check the data and the model's dtype).")
        Q, dropped = orthonormal_rows(G)
        modules = dict(lm.model.named_modules())
        sizes = [in_out(linear_layer(modules, n))[1] * rank for n in names]
        info = {"objective": pairs.objective, "source": pairs.source, "data_hash": pairs.data_hash(),
                "pairs": len(train), "basis": int(Q.shape[0]), "dropped": dropped,
                "seconds": round(time.perf_counter() - t0, 1)}
        return cls(names, sizes, Q, info)

    def _chunks(self, tau: dict[str, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if list(tau) != self.names:
            raise DirectionError("The direction's weights differ from the ones the kept pairs' basis was made for.")
        out, start = [], 0
        for n, size in zip(self.names, self.sizes):
            out.append((tau[n], self.Q[:, start:start + size]))
            start += size
        return out

    def coefficients(self, tau: dict[str, torch.Tensor]) -> torch.Tensor:
        """Q tau [k]: tau's components along the kept gradients' span (zero when it leaves them unchanged)."""
        total = None
        for B, Qn in self._chunks(tau):
            c = Qn @ B.detach().reshape(-1).to(Qn)
            total = c if total is None else total + c
        return total

    @torch.no_grad()
    def project(self, tau: dict[str, torch.Tensor], before: dict[str, torch.Tensor]) -> float:
        """tau <- tau - Q^T Q tau, in place, after an optimizer step from ``before`` (itself in the complement);
        returns the share of that step's norm that was taken out (1: all of it lay in the kept pairs' span)."""
        c = self.coefficients(tau)
        step = math.sqrt(sum(float((tau[n].detach() - before[n]).float().pow(2).sum()) for n in self.names))
        for B, Qn in self._chunks(tau):
            B.sub_((c @ Qn).reshape(B.shape).to(B))
        return min(float(c.norm()) / step, 1.0) if step > 0 else 0.0

    def describe(self) -> dict:
        return dict(self.info)


def orthonormal_rows(G: torch.Tensor, chunk: int = 1 << 18) -> tuple[torch.Tensor, int]:
    """Rows spanning the same space as the rows of ``G`` [m, D], orthonormal, float32, and how many rows added
    nothing of their own. The m x m Gram matrix is summed in float64 a slice of columns at a time (m is small, D is
    not: no float64 copy of G), and Q = (U diag(1/sqrt(lambda)))^T G."""
    m = G.shape[0]
    gram = torch.zeros(m, m, dtype=torch.float64)
    for part in G.split(chunk, dim=1):
        part = part.double()
        gram += part @ part.T
    evals, evecs = torch.linalg.eigh(gram)
    keep = evals > RELATIVE_EIGENVALUE_FLOOR * evals.max().clamp_min(1e-300)
    coeff = (evecs[:, keep] / evals[keep].sqrt()).T
    Q = torch.cat([(coeff @ part.double()).float() for part in G.split(chunk, dim=1)], dim=1)
    return Q, int((~keep).sum())


def first_order_share(kept: KeptMargins, tau: dict[str, torch.Tensor]) -> float:
    """|Q tau| / |tau|: the share of the direction that lies in the kept pairs' span (0: their margins stay, to
    first order)."""
    norm = math.sqrt(sum(float(B.detach().float().pow(2).sum()) for B in tau.values()))
    return float(kept.coefficients(tau).norm()) / norm if norm > 0 else 0.0
