"""The first-order prediction of the plane: at theta0 the margin of a pair under weights alpha is, to first
order, sum_j alpha_j g_j with g_j one JVP along each direction, so a whole map costs one JVP per direction per
pair instead of a sweep."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import hashlib
import json

import torch

from engine.directions import Direction
from engine.dpo import encode_pairs
from engine.errors import Cancelled
from engine.models import LoadedModel, runs_at_base
from engine.progress import Phase, ProgressFn
from engine.sweep.runner import SweepError
from engine.tangent import completion_logits, completion_logp_derivative, mix_tau, per_token_logps


PROJECT = Path(__file__).resolve().parents[2]


def heldout_pairs_of(direction: Direction, limit: Optional[int] = None) -> dict[str, list]:
    """The held-out pairs a tangent direction was validated on, rebuilt from what its file records: the data
    source, objective and pair count, and the split's fraction and seed."""
    from engine.data import load_pairs

    hp = direction.meta.get("hyperparameters", {})
    out = {}
    for src in direction.meta.get("objective_sources", []):
        path = src.get("source")
        if path and not Path(path).exists() and not Path(path).is_absolute() and (PROJECT / path).exists():
            path = str(PROJECT / path)  # shipped data named from the project's root, as `make demo-directions` does
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


# The linearization gap as a share of the change from the base: beyond this the plane marks the mix as outside the
# region where the linearized model the directions were trained on describes the model it mixes.
TRUSTED_RELATIVE_GAP = 0.25


@runs_at_base
@torch.no_grad()
def linearization_gap_map(lm: LoadedModel, pairs: list, directions: dict[str, Direction],
                          weights_at: Callable[[float, float], dict[str, float]], xs: list[float], ys: list[float],
                          max_tokens: int = 64, progress: Optional[ProgressFn] = None,
                          should_stop: Callable[[], bool] = lambda: False) -> dict:
    """Where the plane's weight arithmetic theta0 + sum alpha tau departs from the linearized model
    f(theta0) + J (sum alpha tau) the tangent directions were trained on, over a grid (rows = y).

    The linearized logits are linear in the weights, so one JVP per direction gives them at every point; each point
    then costs one ordinary forward. Per point: ``gap``, the mean over sequences of |log pi_lin - log pi| per response
    token (the sweep's measure), and ``relative``, that gap over the mean |log pi - log pi0| per token (how far off
    the linear picture is, as a share of what the mix changes)."""
    from engine.directions import Mix

    names = list(directions)
    if not names:
        raise SweepError("The linearization gap needs a TS-DPO tangent direction on the plane.")
    batch = encode_pairs(lm, pairs, max_tokens, max_tokens).to(lm.device)
    total = len(names) + len(xs) * len(ys)
    phase, done = Phase(progress, "linearization gap", total), 0
    dlogits = {}
    base = None
    for name in names:
        if should_stop():
            raise Cancelled("the linearization gap map")
        pol, ref = completion_logits(lm, batch, mix_tau(lm, Mix.of(directions, {name: 1.0})), "tangent")
        dlogits[name] = (pol - ref).detach()
        base = ref.detach()
        done += 1
        phase.update(done)
    base_lp = per_token_logps(batch, base)
    gap, relative = [], []
    for y in ys:
        grow, rrow = [], []
        for x in xs:
            if should_stop():
                raise Cancelled("the linearization gap map")
            alpha = {n: float(weights_at(x, y).get(n, 0.0)) for n in names}
            if not any(alpha.values()):
                grow.append(0.0)
                rrow.append(0.0)
            else:
                lin = base + sum(a * dlogits[n] for n, a in alpha.items() if a)
                ordinary, _ = completion_logits(lm, batch, mix_tau(lm, Mix.of(directions, alpha)), "scalarized")
                lin_lp, ord_lp = per_token_logps(batch, lin), per_token_logps(batch, ordinary)
                g = float((lin_lp - ord_lp).abs().mean())
                effect = float((ord_lp - base_lp).abs().mean())
                grow.append(g)
                rrow.append(g / effect if effect > 0 else 0.0)
            done += 1
            phase.update(done)
        gap.append(grow)
        relative.append(rrow)
    return {"names": names, "xs": list(xs), "ys": list(ys), "gap": gap, "relative": relative,
            "pairs": len(pairs), "max_tokens": max_tokens, "trusted_relative_gap": TRUSTED_RELATIVE_GAP}


def gap_grid(plane, grid: int) -> tuple[list[float], list[float]]:
    """The plane points a gap map measures: ``grid`` per axis over where the point can go."""
    if grid < 3 or grid % 2 == 0:
        raise SweepError(f"The gap map's grid must be odd and at least 3 (got {grid}), so it passes through the origin.")

    def axis(a) -> list[float]:
        return [round(a.low + (a.high - a.low) * i / (grid - 1), 6) for i in range(grid)]

    return axis(plane.x), axis(plane.y)


def gap_map_key(fingerprint: str, plane, shas: dict[str, str]) -> str:
    """Which plane a gap map is for: the model and the plane's layout, with each tangent direction named by its
    file's sha256 (names are the user's). The same in the CLI and the studio, so a map made by one is drawn by the
    other whenever the same directions sit on the same layout (the grid and pairs it used are in the map)."""
    def axis(a) -> list:
        return [shas.get(a.direction), float(a.scale), float(a.low), float(a.high)]

    desc = {"model": fingerprint, "x": axis(plane.x), "y": axis(plane.y), "power": float(plane.power),
            "anchors": sorted([shas[n], [float(v) for v in p]] for n, p in plane.anchors.items() if n in shas)}
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:16]


def plane_gap_map(lm: LoadedModel, plane, directions: dict[str, Direction], grid: int = 7, n_pairs: int = 4,
                  max_tokens: int = 64, progress: Optional[ProgressFn] = None,
                  should_stop: Callable[[], bool] = lambda: False) -> dict:
    """``linearization_gap_map`` over the plane's range for the tangent directions its layout uses, on the first
    ``n_pairs`` held-out pairs of the first of them; the result carries its ``gap_map_key``."""
    from engine.directions import file_sha256

    used = {n for n in (plane.x.direction, plane.y.direction, *plane.anchors) if n}
    tangent = {n: d for n, d in directions.items() if n in used and d.space == "weight"}
    if not tangent:
        raise SweepError("No TS-DPO tangent direction is on the plane: the linearization gap is a property of the "
                         "weight-space mix (steering vectors have no linearized model).")
    first = tangent[sorted(tangent)[0]]
    pairs = next(iter(heldout_pairs_of(first, limit=n_pairs).values()))
    xs, ys = gap_grid(plane, grid)
    # A direction from a file is known by the file's content; one never saved (a test's) by its name.
    shas = {n: file_sha256(d.meta["_path"]) if d.meta.get("_path") else d.name for n, d in tangent.items()}
    out = linearization_gap_map(lm, pairs, tangent, plane.weights, xs, ys, max_tokens=max_tokens, progress=progress,
                                should_stop=should_stop)
    out["key"] = gap_map_key(lm.fingerprint, plane, shas)
    out["pair_keys"] = hashlib.sha256("\n".join(p.key() for p in pairs).encode()).hexdigest()[:16]
    out["directions"] = {n: shas[n] for n in tangent}
    out["plane"] = plane.to_json()
    out["model"] = lm.fingerprint
    return out
