"""Heatmap layers for the preference plane: what a sweep measured, the first-order prediction, and the
linearization gap, mapped to the plane's coordinates, with the wording the studio shows next to them."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from engine.paths import data_dir
from engine.sweep import predicted_maps

log = logging.getLogger(__name__)
SHIPPED_GAP_MAPS = Path(__file__).resolve().parents[1] / "assets" / "directions"  # *.gap.json for the demo directions


def gap_maps_dir() -> Path:
    """Where the studio keeps the gap maps it measured, one file per plane layout (named by its key)."""
    path = data_dir() / "gap-maps"
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_gap_maps(folders: Optional[list[Path]] = None) -> dict[str, dict]:
    """Every gap map found, by key (the user's own measurements win over the shipped ones). A file that cannot be
    read is skipped with a line in the log: it only costs measuring that map again."""
    maps = {}
    for folder in folders if folders is not None else [SHIPPED_GAP_MAPS, gap_maps_dir()]:
        for path in sorted(Path(folder).glob("*.json")):
            if folder == SHIPPED_GAP_MAPS and not path.name.endswith(".gap.json"):
                continue
            try:
                m = json.loads(path.read_text())
                if not {"key", "xs", "ys", "gap", "relative"} <= set(m):
                    raise ValueError("not a gap map")
            except (OSError, ValueError) as exc:
                log.warning("skipping the gap map %s: %s", path, exc)
                continue
            maps[m["key"]] = m
    return maps


def gap_layers(gap: dict) -> dict[str, dict]:
    """The gap map as two heatmap layers, and the line the plane draws where the relative gap crosses the
    trusted share (``trust_line``)."""
    xs, ys = gap["xs"], gap["ys"]
    sx, sy = (xs[-1] - xs[0]) / (len(xs) - 1) / 2, (ys[-1] - ys[0]) / (len(ys) - 1) / 2
    extent = (xs[0] - sx, xs[-1] + sx, ys[0] - sy, ys[-1] + sy)
    share = gap.get("trusted_relative_gap", 0.25)
    how = (f"measured on {gap['pairs']} held-out pairs ({gap.get('max_tokens', '?')} tokens) at {len(xs)} x {len(ys)} points: "
           "one JVP per direction and one forward per point.")
    points = [(x, y, "measured") for y in ys for x in xs]
    return {
        "linearization gap · share of the change": {
            "values": gap["relative"], "extent": extent, "points": points,
            "note": (f"|log pi_lin - log pi| / |log pi - log pi0| per token: how far the mixed model is from the linearized "
                     f"model the directions were trained on, as a share of what the mix changes. Dashed line: "
                     f"{share:.0%}; beyond it, a weight is no longer what the direction was trained to mean. " + how)},
        "linearization gap · nats per token": {
            "values": gap["gap"], "extent": extent, "points": points,
            "note": "|log pi_lin - log pi| per response token, " + how},
    }


def trust_line(gap: dict) -> dict:
    """What the plane needs to draw the dashed line of the trusted region."""
    return {"values": gap["relative"], "xs": gap["xs"], "ys": gap["ys"], "level": gap.get("trusted_relative_gap", 0.25)}


def _to_plane(info: dict, result: dict, axes: dict) -> Optional[Callable[[float, float], tuple[float, float]]]:
    """How a sweep method's weights (wx, wy) map to the studio plane's coordinates, given the objectives and
    scales bound to the plane's axes: {"x": (objective, scale), "y": (objective, scale)}; None if they differ."""
    ox, oy = result["objectives"]
    (ax_o, ax_s), (ay_o, ay_s) = axes.get("x", (None, 1.0)), axes.get("y", (None, 1.0))
    if (ax_o, ay_o) == (ox, oy):
        return lambda wx, wy: (wx / ax_s, wy / ay_s)
    if (ax_o, ay_o) == (oy, ox):
        return lambda wx, wy: (wy / ax_s, wx / ay_s)
    return None


def sweep_layers(result: dict, axes: dict) -> dict[str, dict]:
    """Heatmap layers for the studio plane: every measured metric of every grid method of a sweep."""
    layers = {}
    coords = result["coords"]
    for name, info in result["methods"].items():
        if info["kind"] == "scalarized" or not info["points"]:
            continue
        to_plane = _to_plane(info, result, axes)
        if to_plane is None:
            continue
        grid = {(e["x"], e["y"]): e for e in info["points"]}
        keys = [k for k, v in info["points"][0].items() if k not in ("x", "y", "seconds") and isinstance(v, (int, float))]
        step = (coords[-1] - coords[0]) / (len(coords) - 1) / 2
        (x0, y0), (x1, y1) = to_plane(coords[0] - step, coords[0] - step), to_plane(coords[-1] + step, coords[-1] + step)
        swapped = to_plane(1.0, 0.0)[0] == 0.0
        for key in keys:
            rows = [[(grid.get((x, y)) or {}).get(key) for x in coords] for y in coords]
            values = [[float("nan") if v is None else float(v) for v in row] for row in rows]
            if swapped:
                values = [list(col) for col in zip(*values)]
            layers[f"measured · {name} · {key}"] = {
                "values": values, "extent": (min(x0, x1), max(x0, x1), min(y0, y1), max(y0, y1)),
                "points": [(*to_plane(e["x"], e["y"]), "measured") for e in info["points"]],
                "note": f"{key}, measured by `tsdpo sweep` at the marked points ({info['kind']} directions)."}
    return layers


def predicted_layers(prediction: dict, weights_at: Callable[[float, float], dict[str, float]], xr: float, yr: float,
                     n: int = 41, sweep: Optional[dict] = None, axes: Optional[dict] = None) -> dict[str, dict]:
    """First-order predicted margin and accuracy maps over the plane [-xr, xr] x [-yr, yr], from
    ``prediction`` = {"names": [direction...], "grads": {objective: [[g per direction] per pair]}}. Measured
    tangent points of a sweep are marked: confirmed where the measured margin has the predicted sign and lies
    within a factor of 2 of it (or both are below 1e-3), contradicted otherwise."""
    xs = [xr * (2 * i / (n - 1) - 1) for i in range(n)]
    ys = [yr * (2 * i / (n - 1) - 1) for i in range(n)]
    names = prediction["names"]
    step_x, step_y = xr / (n - 1), yr / (n - 1)
    extent = (-xr - step_x, xr + step_x, -yr - step_y, yr + step_y)
    tangent = None
    if sweep is not None and axes is not None:
        tangent = next((i for i in sweep["methods"].values() if i["kind"] == "tangent"), None)
        to_plane = _to_plane(tangent, sweep, axes) if tangent else None
        tangent = tangent if to_plane else None
    layers = {}
    for objective, rows in prediction["grads"].items():
        g = torch.tensor(rows, dtype=torch.float64)
        maps = predicted_maps(g, names, weights_at, xs, ys)
        marks = []
        if tangent is not None:
            for e in tangent["points"]:
                px, py = to_plane(e["x"], e["y"])
                pred = predicted_maps(g, names, weights_at, [px], [py])["margin"][0][0]
                meas = e.get(f"{objective}/margin")
                if meas is None:
                    continue
                small = abs(pred) < 1e-3 and abs(meas) < 1e-3
                ok = small or (pred * meas > 0 and 0.5 <= meas / pred <= 2.0)
                marks.append((px, py, "confirmed" if ok else "contradicted"))
        for metric in ("margin", "accuracy"):
            layers[f"predicted · {objective} · {metric}"] = {
                "values": maps[metric], "extent": extent, "points": marks,
                "note": (f"First-order prediction of the held-out {metric} of {objective} from one JVP per direction per "
                         f"pair ({len(rows)} pairs). " + ("Green: a measured point confirms it (same sign, within 2x); "
                                                          "red: it contradicts it." if marks else
                                                          "Load a sweep (View menu) to mark measured points."))}
    return layers
