"""Heatmap layers for the preference plane: what a sweep measured, and the first-order prediction, mapped to the
plane's coordinates, with the wording the studio shows next to them."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from engine.sweep import predicted_maps


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
