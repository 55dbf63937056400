"""The first-order prediction of the plane: at theta0 the margin of a pair under weights alpha is, to first
order, sum_j alpha_j g_j with g_j one JVP along each direction, so a whole map costs one JVP per direction per
pair instead of a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from engine.directions import Direction
from engine.dpo import encode_pairs
from engine.errors import Cancelled
from engine.models import LoadedModel, runs_at_base
from engine.progress import Phase, ProgressFn
from engine.sweep.runner import SweepError
from engine.tangent import completion_logp_derivative


def heldout_pairs_of(direction: Direction, limit: Optional[int] = None) -> dict[str, list]:
    """The held-out pairs a tangent direction was validated on, rebuilt from what its file records: the data
    source, objective and pair count, and the split's fraction and seed."""
    from engine.data import load_pairs

    hp = direction.meta.get("hyperparameters", {})
    out = {}
    for src in direction.meta.get("objective_sources", []):
        path = src.get("source")
        if not path or not Path(path).exists():
            raise SweepError(f"{direction.name} was trained on {path or 'data it did not record'}, which is not there now; "
                             "the held-out pairs cannot be rebuilt. Put the file back, or run `tsdpo sweep` with --data.")
        ps = load_pairs(path, objective=src.get("objective"), limit=src.get("pairs"))
        _, val = ps.split(float(hp.get("val_fraction", 0.1)), int(hp.get("seed", 0)))
        out[val.objective] = val.pairs[:limit] if limit else val.pairs
    if not out:
        raise SweepError(f"{direction.name} records no training data, so its held-out pairs are unknown.")
    return out


@runs_at_base
def margin_gradients(lm: LoadedModel, pairs: list, directions: dict[str, Direction], beta: float = 0.1,
                     batch_size: int = 4, max_tokens: int = 128, progress: Optional[ProgressFn] = None,
                     should_stop: Callable[[], bool] = lambda: False) -> torch.Tensor:
    """g[i, j] = beta * d/de [log p(y_w) - log p(y_l)] along tau_j at theta0, for pair i: to first order the
    margin of pair i at weights alpha is sum_j alpha_j g[i, j] (the tangent model is linear in the weights up
    to the final softmax). One JVP per direction per batch."""
    names = list(directions)
    g = torch.zeros(len(pairs), len(names), dtype=torch.float64)
    batches = list(range(0, len(pairs), batch_size))
    phase, done = Phase(progress, "margin gradients", len(batches) * len(names)), 0
    for j, name in enumerate(names):
        d = directions[name]
        deltas = {n: delta.to(lm.device) for n, delta in (d * 1.0).weight_deltas()}
        for start in batches:
            if should_stop():
                raise Cancelled("the prediction")
            batch = encode_pairs(lm, pairs[start:start + batch_size], max_tokens, max_tokens).to(lm.device)
            _, jt = completion_logp_derivative(lm, batch, deltas)
            jt = jt.double().cpu()
            n = batch.n_pairs  # every chosen reply, then every rejected one
            g[start:start + n, j] = beta * (jt[:n] - jt[n:])
            done += 1
            phase.update(done)
    return g


def predicted_maps(grads: torch.Tensor, names: list[str], weights_at: Callable[[float, float], dict[str, float]],
                   xs: list[float], ys: list[float]) -> dict[str, list[list[float]]]:
    """Predicted mean margin and implicit-reward accuracy over a grid of plane points (rows = y)."""
    alpha = torch.tensor([[float(weights_at(x, y).get(n, 0.0)) for n in names] for y in ys for x in xs],
                         dtype=torch.float64)  # [points, directions]
    m = grads.to(torch.float64) @ alpha.T  # [pairs, points]
    margin = m.mean(0)
    accuracy = ((m > 0).double() + 0.5 * (m == 0).double()).mean(0)

    def grid(v: torch.Tensor) -> list[list[float]]:
        return [v[i * len(xs):(i + 1) * len(xs)].tolist() for i in range(len(ys))]

    return {"margin": grid(margin), "accuracy": grid(accuracy)}
