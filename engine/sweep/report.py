"""What a sweep leaves for people: sweep.json, PNG plots (Pareto fronts, heatmaps over the plane) and a
Markdown report."""

from __future__ import annotations

import json
import math
from pathlib import Path

from engine.paths import atomic_write_text
from engine.sweep.metrics import pareto_front
from engine.sweep.runner import RESULT


def write_outputs(result: dict, out: str | Path) -> list[Path]:
    """sweep.json, PNG plots (Pareto fronts, heatmaps over the plane) and report.md."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [out / RESULT]
    atomic_write_text(out / RESULT, json.dumps(result, indent=2))
    ox, oy = result["objectives"]
    metric = result["reference"]["metric"]
    colours = {"tangent": "tab:blue", "steering": "tab:orange", "scalarized": "tab:green"}

    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    for name, info in result["methods"].items():
        xs = [e[f"{ox}/{metric}"] for e in info["points"]]
        ys = [e[f"{oy}/{metric}"] for e in info["points"]]
        c = colours.get(info["kind"], None)
        ax.scatter(xs, ys, s=18, alpha=0.45, color=c)
        p = [(a, b) for a, b in zip(xs, ys)]
        front = pareto_front(p)
        ax.plot([p[i][0] for i in front], [p[i][1] for i in front], "-o", color=c, ms=5,
                label=f"{name} (hypervolume {info['hypervolume']:.3g})")
    ref = result["reference"]["point"]
    ax.scatter([0], [0], marker="*", s=120, color="black", label="base model", zorder=5)
    ax.scatter([ref[0]], [ref[1]], marker="x", s=60, color="grey", label="hypervolume reference", zorder=5)
    ax.set_xlabel(f"{ox}: held-out {metric}")
    ax.set_ylabel(f"{oy}: held-out {metric}")
    ax.set_title("Pareto fronts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    files.append(out / "pareto.png")

    coords = result["coords"]
    for name, info in result["methods"].items():
        if info["kind"] == "scalarized":
            continue
        keys = [k for k in info["points"][0] if k not in ("x", "y", "seconds") and isinstance(info["points"][0][k], (int, float))]
        n = len(keys)
        cols = min(3, n)
        rows = math.ceil(n / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
        grid = {(e["x"], e["y"]): e for e in info["points"]}
        for ax, key in zip(axes.flat, keys):
            z = [[(grid.get((x, y)) or {}).get(key, float("nan")) for x in coords] for y in coords]
            z = [[float("nan") if v is None else v for v in row] for row in z]
            step = (coords[-1] - coords[0]) / (len(coords) - 1) / 2
            im = ax.imshow(z, origin="lower", extent=(coords[0] - step, coords[-1] + step, coords[0] - step, coords[-1] + step),
                           cmap="viridis", aspect="auto")
            fig.colorbar(im, ax=ax, fraction=0.046)
            ax.set_title(key, fontsize=9)
            ax.set_xlabel(info["directions"][0] if info["directions"] else "x", fontsize=8)
            ax.set_ylabel(info["directions"][1] if len(info["directions"]) > 1 else "y", fontsize=8)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"{name}: metrics over the plane")
        fig.tight_layout()
        path = out / f"heatmaps-{_slug(name)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        files.append(path)
    atomic_write_text(out / "report.md", report(result))
    files.append(out / "report.md")
    return files


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}g}" if isinstance(v, float) else str(v)


def report(result: dict) -> str:
    ox, oy = result["objectives"]
    cfg = result["config"]
    ref = result["reference"]
    lines = [f"# Sweep report: {result['model']['model_name']}", "",
             f"Objectives: **{ox}** (x) and **{oy}** (y). Grid {cfg['grid']}x{cfg['grid']} over "
             f"[{cfg['low']}, {cfg['high']}]; {cfg['pairs']} held-out pairs per objective, beta {cfg['beta']}; "
             f"{len(cfg['prompts'])} prompts, up to {cfg['max_new_tokens']} new tokens, greedy.", "",
             f"Hypervolume of each method's Pareto front in ({ox} {ref['metric']}, {oy} {ref['metric']}), against "
             f"the reference point ({ref['point'][0]:.4g}, {ref['point'][1]:.4g}): {ref['how']}.", "",
             "| method | points | hypervolume | Pareto points | smoothness x: Kendall tau / TV ratio | smoothness y | "
             "mean linearization gap | max disentanglement error |",
             "|---|---|---|---|---|---|---|---|"]
    for name, info in result["methods"].items():
        sm = info["smoothness"]
        s = [f"{_f(sm[o].get('kendall_tau'))} / {_f(sm[o].get('tv_ratio'))}" if o in sm else "-" for o in (ox, oy)]
        gaps = [e["lin_gap"] for e in info["points"] if e.get("lin_gap") is not None]
        dis = [e["disentanglement"] for e in info["points"] if e.get("disentanglement") is not None]
        lines.append(f"| {name} ({info['kind']}) | {len(info['points'])} | {_f(info['hypervolume'])} | {len(info['pareto'])} | "
                     f"{s[0]} | {s[1]} | {_f(sum(gaps) / len(gaps)) if gaps else '-'} | {_f(max(dis)) if dis else '-'} |")
    boot = result.get("bootstrap")
    if boot:
        lines += ["", f"Bootstrap 95% intervals ({boot['resamples']} resamples of the held-out pairs, "
                  f"{', '.join(f'{n} {o}' for o, n in boot['pairs'].items())} pairs; every point resampled alike):", "",
                  "| | value | 95% interval |", "|---|---|---|"]
        for name, (lo, hi) in boot["hypervolume"].items():
            lines.append(f"| hypervolume, {name} | {_f(result['methods'][name]['hypervolume'])} | {_f(lo)} to {_f(hi)} |")
        for pair, r in boot["ratios"].items():
            lo, hi = r["interval"]
            lines.append(f"| hypervolume ratio {pair} | {_f(r['value'])} | {_f(lo)} to {_f(hi)} |")
    if result.get("cca"):
        lines += ["", "Canonical correlations between the last-layer representation changes caused by the two "
                  "directions alone (each at the top of its axis; lower = more disentangled):", ""]
        for name, c in result["cca"].items():
            lines.append(f"- {name}: mean {_f(c['mean'])}, largest {_f(c['top'])} over {c['tokens']} response tokens")
    lines += ["", "Smoothness: Kendall's tau between an axis coordinate and its own objective's margin along every grid "
              "line (1 = the margin always rises), and |end - start| / sum |steps| (1 = no back-and-forth). "
              "Linearization gap: mean |log p_linearized - log p| per response token. Disentanglement error: mean "
              "|log p_mix - log p_alone| per response token on each objective's data, summed over both objectives.", "",
              "![Pareto fronts](pareto.png)", ""]
    for name, info in result["methods"].items():
        if info["kind"] != "scalarized":
            lines.append(f"![{name}](heatmaps-{_slug(name)}.png)")
    return "\n".join(lines) + "\n"
