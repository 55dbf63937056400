"""`tsdpo sweep`: a grid of plane points measured for each method (Pareto fronts, smoothness, disentanglement,
linearization gap), resumable, with plots and a report."""

from __future__ import annotations

import sys

from engine.cli.common import (MODEL_AND_STORE, PhaseBars, float_list, load, open_store, parse_point, read_prompts,
                               selection, selection_options)
from engine.errors import TsdpoError
from engine.sweep import METRICS


def heldout_data(args, seen: dict | None = None) -> dict:
    """Each --data OBJECTIVE=FILE's held-out split, cut as in training (--limit, the pair selection, --val-fraction,
    --seed); ``seen``, where given, gets each objective's training prompts."""
    from engine.data import load_pairs
    from engine.sweep.effects import training_prompts

    data = {}
    for spec in args.data:
        objective, sep, path = spec.partition("=")
        if not sep:
            raise TsdpoError(f"--data takes OBJECTIVE=FILE, not {spec!r}.")
        ps = load_pairs(path, format=args.format, objective=objective, limit=args.limit, **selection(args))
        train, data[ps.objective] = ps.split(args.val_fraction, args.seed)
        if seen is not None:
            seen[ps.objective] = training_prompts(train)
        print(f"  {objective}: {len(data[ps.objective])} held-out pairs from {path}", file=sys.stderr)
    return data


def cmd_effects(args) -> int:
    import json
    from pathlib import Path

    from engine.loading import load_direction
    from engine.paths import atomic_write_text
    from engine.sweep.effects import EffectsConfig, effects_markdown, axis_effects

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise TsdpoError(f"{out} exists; choose another --out or pass --overwrite.")
    cfg = EffectsConfig(weights=float_list(args.weights, "--weights"), pairs=args.pairs, beta=args.beta,
                        max_prompt_tokens=args.max_prompt_tokens, max_response_tokens=args.max_response_tokens,
                        linearization_gap=not args.no_lin_gap)
    cfg.check()
    seen: dict = {}
    data = heldout_data(args, seen)
    lm = load(args, args.model)
    store = None if args.no_store else open_store(args)
    directions = [load_direction(ref, lm, store) for ref in args.direction]
    names = [d.name for d in directions]
    if len(set(names)) != len(names):
        raise TsdpoError(f"Two directions share a name ({', '.join(names)}); give each its own (tsdpo directions add --name).")
    bars = PhaseBars()
    with bars:
        result = axis_effects(lm, directions, data, cfg, progress=bars, seen=seen)
    result["model"] = {"name": lm.name, "fingerprint": lm.fingerprint}
    result["sources"] = {"directions": list(args.direction), "data": list(args.data), "val_fraction": args.val_fraction,
                         "seed": args.seed, "limit": args.limit, **selection(args)}
    atomic_write_text(out, json.dumps(result, indent=1))
    table = effects_markdown(result)
    atomic_write_text(out.with_suffix(".md"), table)
    print(table)
    print(f"wrote {out} and {out.with_suffix('.md')} ({result['seconds']:.0f} s)")
    return 0


def cmd_gap_map(args) -> int:
    import json
    from pathlib import Path

    from engine.loading import load_direction
    from engine.paths import atomic_write_text
    from engine.plane import Axis, PreferencePlane
    from engine.sweep import plane_gap_map

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise TsdpoError(f"{out} exists; choose another --out or pass --overwrite.")
    lo, hi = parse_point(args.range, "--range", "LOW,HIGH")
    lm = load(args, args.model)
    store = None if args.no_store else open_store(args)
    dx, dy = load_direction(args.x, lm, store), load_direction(args.y, lm, store)
    if dx.name == dy.name:
        raise TsdpoError(f"Both axes hold a direction named {dx.name!r}; give one another name (tsdpo directions add --name).")
    plane = PreferencePlane(Axis(dx.name, args.scale_x, lo, hi), Axis(dy.name, args.scale_y, lo, hi))
    bars = PhaseBars()
    with bars:
        result = plane_gap_map(lm, plane, {dx.name: dx, dy.name: dy}, grid=args.grid, n_pairs=args.pairs,
                               max_tokens=args.max_tokens, progress=bars)
    atomic_write_text(out, json.dumps(result, indent=1))
    rel, xs, ys = result["relative"], result["xs"], result["ys"]
    print(f"relative linearization gap (|log pi_lin - log pi| / |log pi - log pi0| per token), rows {dy.name}, "
          f"columns {dx.name}:")
    print("      " + " ".join(f"{x:>6.2f}" for x in xs))
    for y, row in zip(reversed(ys), reversed(rel)):
        print(f"{y:>5.2f} " + " ".join(f"{v:6.2f}" for v in row))
    print(f"wrote {out} (the studio draws it when these directions are on the plane's axes)")
    return 0


def _heldout_options(p) -> None:
    p.add_argument("--data", action="append", default=[], required=True, metavar="OBJECTIVE=FILE",
                   help="held-out pairs per objective: the same file and --limit as in training, so the held-out split matches")
    p.add_argument("--format", default=None)
    p.add_argument("--limit", type=int, help="as in training")
    selection_options(p)  # as in training
    p.add_argument("--val-fraction", type=float, default=0.1, help="as in training")
    p.add_argument("--seed", type=int, default=0, help="as in training")


def cmd_sweep(args) -> int:
    from engine.loading import load_direction
    from engine.sweep import Method, Sweep, SweepConfig, write_outputs

    lo, hi = parse_point(args.range, "--range", "LOW,HIGH")
    prompts = read_prompts(args.prompts, args.n_prompts) if args.prompts else []
    cfg = SweepConfig(grid=args.grid, low=lo, high=hi, pairs=args.pairs, beta=args.beta, prompts=prompts,
                      max_new_tokens=args.max_new_tokens, pareto_metric=args.metric,
                      max_prompt_tokens=args.max_prompt_tokens, max_response_tokens=args.max_response_tokens,
                      reference=parse_point(args.reference, "--reference") if args.reference else None,
                      linearization_gap=not args.no_lin_gap, reward_model=args.reward_model)
    cfg.coords()  # refuse a bad grid before loading anything
    if not (args.x or args.steer_x or args.scalarized):
        raise TsdpoError("Nothing to sweep: give tangent directions (--x, --y), steering vectors (--steer-x, --steer-y) "
                         "and/or scalarized runs (--scalarized FILE, repeatable).")
    data = heldout_data(args)
    lm = load(args, args.model)
    store = None if args.no_store else open_store(args)
    methods = []
    for kind, x, y in (("tangent", args.x, args.y), ("steering", args.steer_x, args.steer_y)):
        if x or y:
            if not (x and y):
                raise TsdpoError(f"The {kind} grid needs both axes (--{'x' if kind == 'tangent' else 'steer-x'} and "
                                 f"--{'y' if kind == 'tangent' else 'steer-y'}).")
            dx, dy = load_direction(x, lm, store), load_direction(y, lm, store)
            for d, ref in ((dx, x), (dy, y)):
                if d.label != kind:
                    raise TsdpoError(f"{ref} is a {d.label} direction, not a {kind} one.")
            methods.append(Method(kind, kind, dx, dy))
    if args.scalarized:
        points = []
        for ref in args.scalarized:
            d = load_direction(ref, lm, store)
            if d.label != "scalarized":
                raise TsdpoError(f"{ref} is a {d.label} direction, not a scalarized-DPO run.")
            sources = d.meta.get("objective_sources", [])
            share = float(sources[0]["weight"]) if sources else float("nan")
            points.append((d.name, d, share))
        methods.append(Method("scalarized", "scalarized", points=points))
    bars = PhaseBars()
    sweep = Sweep(lm, methods, data, cfg, args.out, progress=bars, trust_remote_code=args.trust_remote_code)
    try:
        with bars:
            result = sweep.run()
    except KeyboardInterrupt:
        print(f"tsdpo: stopped; {len(sweep.state['points'])} points are saved in {args.out}. Run the same command to "
              "resume.", file=sys.stderr)
        return 130
    if result is None:  # another process of a sharded sweep: the first one writes the results
        return 0
    files = write_outputs(result, args.out)
    ox, oy = result["objectives"]
    print(f"{'method':<12} {'points':>6} {'hypervolume':>12} {'pareto':>6}  smoothness {ox} / {oy} (Kendall tau)")
    for name, info in result["methods"].items():
        sm = info["smoothness"]
        taus = " / ".join("-" if sm.get(o, {}).get("kendall_tau") is None else f"{sm[o]['kendall_tau']:+.2f}" for o in (ox, oy))
        print(f"{name:<12} {len(info['points']):>6} {info['hypervolume']:>12.4g} {len(info['pareto']):>6}  {taus}")
    boot = result.get("bootstrap") or {}
    for name, (lo, hi) in boot.get("hypervolume", {}).items():
        print(f"hypervolume {name}: 95% interval {lo:.4g} to {hi:.4g} ({boot['resamples']} bootstrap resamples)")
    for pair, r in boot.get("ratios", {}).items():
        print(f"hypervolume ratio {pair}: {r['value']:.4g}, 95% interval {r['interval'][0]:.4g} to {r['interval'][1]:.4g}")
    for name, c in result.get("cca", {}).items():
        print(f"CCA {name}: mean canonical correlation {c['mean']:.3f} (largest {c['top']:.3f})")
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def _pair_length_options(p) -> None:
    p.add_argument("--max-prompt-tokens", type=int, default=128, help="cut each held-out prompt to this many tokens")
    p.add_argument("--max-response-tokens", type=int, default=128,
                   help="cut each held-out reply to this many tokens (use the training run's, to score what it learned)")


def add_parsers(sub) -> None:
    p = sub.add_parser("sweep", parents=MODEL_AND_STORE,
                       help="measure a grid of plane points: Pareto fronts, smoothness, disentanglement, linearization gap")
    p.add_argument("--x", help="TS-DPO direction on the x axis (file or stored name)")
    p.add_argument("--y", help="TS-DPO direction on the y axis")
    p.add_argument("--steer-x", help="steering vector on the x axis (the steering grid)")
    p.add_argument("--steer-y", help="steering vector on the y axis")
    p.add_argument("--scalarized", action="append", default=[], metavar="FILE", help="a scalarized-DPO run (repeatable)")
    _heldout_options(p)
    p.add_argument("--pairs", type=int, default=16, help="held-out pairs per objective to score")
    _pair_length_options(p)
    p.add_argument("--prompts", help="prompts for length / distinct-2 / reward (.jsonl with 'prompt', or .txt)")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reward-model", help="a sequence-classification model (folder or hub id) to score replies")
    p.add_argument("--grid", type=int, default=5, help="points per axis (odd)")
    p.add_argument("--range", default="-1,1", metavar="LOW,HIGH")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--metric", choices=METRICS[::-1], default="margin", help="Pareto front and hypervolume on this metric")
    p.add_argument("--reference", metavar="X,Y", help="hypervolume reference point (default: the worst value of each objective)")
    p.add_argument("--no-lin-gap", action="store_true", help="skip the linearization gap (one JVP per point)")
    p.add_argument("--out", required=True, help="a folder: results, plots and report; rerun with the same --out to resume")
    p.set_defaults(func=cmd_sweep)

    q = sub.add_parser("effects", parents=MODEL_AND_STORE,
                       help="each direction alone at a few weights: every objective's held-out margin, its monotonicity "
                            "and slope with 95%% intervals, and the cross-effects (held-out pairs whose prompt is among "
                            "the training pairs of the direction's own objective are left out of its figures)")
    q.add_argument("--direction", action="append", default=[], required=True,
                   help="a direction file or stored name (repeatable)")
    _heldout_options(q)
    q.add_argument("--pairs", type=int, default=64, help="held-out pairs per objective to score")
    q.add_argument("--weights", default="-1,-0.5,0,0.5,1", help="increasing, including 0")
    q.add_argument("--beta", type=float, default=0.1)
    _pair_length_options(q)
    q.add_argument("--no-lin-gap", action="store_true", help="skip the linearization gap (one JVP per tangent point)")
    q.add_argument("--out", required=True, help="a .json file (a .md table is written beside it)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_effects)

    g = sub.add_parser("gap-map", parents=MODEL_AND_STORE,
                       help="where the plane's weight arithmetic departs from the linearized model two tangent "
                            "directions were trained on (one JVP per direction, one forward per point)")
    g.add_argument("--x", required=True, help="TS-DPO direction on the x axis (file or stored name)")
    g.add_argument("--y", required=True, help="TS-DPO direction on the y axis")
    g.add_argument("--scale-x", type=float, default=1.0, help="weight at x = 1")
    g.add_argument("--scale-y", type=float, default=1.0, help="weight at y = 1")
    g.add_argument("--range", default="-1,1", metavar="LOW,HIGH", help="where the point can go on both axes")
    g.add_argument("--grid", type=int, default=7, help="points per axis (odd)")
    g.add_argument("--pairs", type=int, default=4, help="held-out pairs of the first direction (by name) to measure on")
    g.add_argument("--max-tokens", type=int, default=64, help="prompt and response tokens per pair")
    g.add_argument("--out", required=True, help="a .json file")
    g.add_argument("--overwrite", action="store_true")
    g.set_defaults(func=cmd_gap_map)
