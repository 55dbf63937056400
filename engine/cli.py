"""`tsdpo`: every engine capability without a display. Errors end in one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
from typing import Optional, Sequence

from engine.errors import TsdpoError
from engine.progress import Progress

EXIT_USER_ERROR = 2


def _progress(message: str, fraction: Optional[float] = None) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run custom model code from the model's repository (only for sources you trust)")


def _model_store_args(p: argparse.ArgumentParser) -> None:
    """--model, the database options and the model options most commands share."""
    p.add_argument("--model", default=None, help="model source (default: embedded)")
    p.add_argument("--no-store", action="store_true", help="do not use the database")
    p.add_argument("--db", help="database path")
    _model_args(p)


def _load(args, source):
    from engine.models import load_model

    return load_model(source, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                      progress=_progress)


def cmd_info(args) -> int:
    import torch
    import transformers

    from engine import __version__
    from engine.models import embedded_gguf_path, pick_device
    from engine.paths import cache_dir, data_dir, default_db_path, log_path

    try:
        embedded = str(embedded_gguf_path())
    except TsdpoError as exc:
        embedded = f"not installed ({exc})"
    rows = {
        "tsdpo-studio": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device (auto)": str(pick_device("auto")),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "cpu threads": torch.get_num_threads(),
        "model cache": str(cache_dir() / "models"),
        "database": str(args.db or default_db_path()),
        "data folder": str(data_dir()),
        "log file": str(log_path()),
        "embedded model": embedded,
    }
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        width = max(map(len, rows))
        for k, v in rows.items():
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_model_load(args) -> int:
    lm = _load(args, args.source)
    info = lm.describe()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(f"model         {info['model']}")
    print(f"architecture  {info['architecture']} ({info['model_type']})")
    print(f"layers        {info['layers']}")
    print(f"hidden size   {info['hidden_size']}")
    print(f"parameters    {info['parameters'] / 1e6:.1f} M")
    print(f"device        {info['device']} ({info['dtype']})")
    print(f"fingerprint   {info['fingerprint']}")
    where = f"from cache {lm.folder}" if lm.from_cache else (f"converted to {lm.folder}" if lm.folder and lm.source.kind != "folder" else "")
    print(f"load time     {info['load_seconds']:.2f} s {where}".rstrip())
    return 0


def cmd_data_inspect(args) -> int:
    from engine.data import load_pairs

    ps = load_pairs(args.file, format=args.format, objective=args.objective, limit=args.limit, split=args.split,
                    attribute=args.attribute)
    stats = ps.stats()
    if args.json:
        print(json.dumps({"format": ps.format, "objective": ps.objective, **stats,
                          "problems": [{"line": p.line, "kind": p.kind, "reason": p.reason} for p in ps.problems]},
                         indent=2))
        return 0
    print(f"source     {ps.source}")
    print(f"format     {ps.format}")
    print(f"objective  {ps.objective}")
    for k, v in stats.items():
        print(f"{k.replace('_', ' '):<24} {v}")
    for kind in ("malformed", "skipped"):
        rows = [p for p in ps.problems if p.kind == kind]
        if rows:
            print(f"\n{kind} rows ({len(rows)}):")
            for p in rows[: args.show]:
                print(f"  {p}")
            if len(rows) > args.show:
                print(f"  ... and {len(rows) - args.show} more (--show N to list more)")
    return 0


def _store(args):
    from engine.store import Store

    return Store(args.db) if getattr(args, "db", None) else Store()


MAX_SANE_WEIGHT = 100.0  # beyond this a weight is almost surely a typo; --force accepts it


def _number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TsdpoError(f"{what}: {text!r} is not a number.") from None
    if not math.isfinite(value):
        raise TsdpoError(f"{what}: {text!r} is not a finite number; weights must be finite.")
    return value


def _int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    """'3,5,7' -> [3, 5, 7], or a clear error naming the option."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TsdpoError(f"{option} takes whole numbers separated by commas (e.g. 10,12), not {text!r}.") from None


def _float_list(text: str, option: str) -> list[float]:
    values = [_number(x.strip(), option) for x in text.split(",") if x.strip()]
    if not values:
        raise TsdpoError(f"{option} takes numbers separated by commas (e.g. -1,0,1), not {text!r}.")
    return values


def _check_weights(weights, force: bool, option: str) -> None:
    """Weights beyond a sane range are almost always a typo (1e3 for 1e-3): they need --force."""
    big = [w for w in weights if abs(w) > MAX_SANE_WEIGHT]
    if big and not force:
        raise TsdpoError(f"{option}: weight {big[0]:g} is beyond +-{MAX_SANE_WEIGHT:g}, far outside where a direction "
                         "means anything. Pass --force if you mean it.")


def _text(value: str, option: str) -> str:
    """A prompt from the command line: valid UTF-8 and not empty."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TsdpoError(f"{option} is not valid UTF-8 text; check the terminal's or the file's encoding.") from None
    if not value.strip():
        raise TsdpoError(f"{option} is empty; type what the model should answer.")
    return value


def _parse_mix(text: str, force: bool = False) -> dict[str, float]:
    """'a.safetensors=0.5,verbosity=-1' -> {'a.safetensors': 0.5, 'verbosity': -1.0}"""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        ref, sep, w = part.rpartition("=")
        if not sep or not ref:
            raise TsdpoError(f"--mix takes DIRECTION=WEIGHT[,DIRECTION=WEIGHT...]; {part!r} has no '=WEIGHT'.")
        out[ref] = _number(w, f"--mix: the weight of {ref!r}")
    _check_weights(out.values(), force, "--mix")
    return out


def _progress_bar(total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)


def _side_by_side(columns: list[tuple[str, str, str]], width: int) -> str:
    """Columns of (header, text, footer) printed next to each other, wrapped to the terminal."""
    import textwrap

    n = len(columns)
    w = max(20, (width - 3 * (n - 1)) // n)

    def wrap(text: str) -> list[str]:
        lines = []
        for para in text.splitlines() or [""]:
            lines += textwrap.wrap(para, w) or [""]
        return lines

    blocks = [[*wrap(h), "-" * w, *wrap(t), "-" * w, *wrap(f)] for h, t, f in columns]
    height = max(map(len, blocks))
    return "\n".join(" | ".join(b[i].ljust(w) if i < len(b) else " " * w for b in blocks).rstrip() for i in range(height))


def cmd_generate(args) -> int:
    import shutil

    from engine.generation import Column, SamplingParams, compare

    prompt = _text(args.prompt, "--prompt")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed).validate()
    mixes = [_parse_mix(m, args.force) for m in args.mix]
    if len(mixes) + len(args.compare) > 4:
        raise TsdpoError("At most 4 columns: count the --mix and --compare options.")
    for c in args.compare:
        if c != "base":
            raise TsdpoError(f"--compare takes 'base' (add more mixes with another --mix), not {c!r}.")
    lm = _load(args, args.model)
    store = None if args.no_store else _store(args)
    mixer, names = _mixer_for(lm, [r for m in mixes for r in m], store, args.positions)
    columns = []
    for mix in mixes:
        weights = {names[r]: w for r, w in mix.items()}
        columns.append(Column(" + ".join(f"{w:+g} {n}" for n, w in weights.items()), weights))
    columns += [Column("base") for _ in args.compare]
    if not columns:
        columns = [Column("base")]
    session_id, not_saved = None, None
    if store is not None:
        try:
            session_id = _cli_session(store, lm)
        except TsdpoError as exc:  # generate anyway: the replies are shown, and the reason they are not saved
            not_saved = str(exc)
    bar = _progress_bar(params.max_new_tokens * len(columns), "generating", "tok")

    def on_text(i: int, piece: str) -> None:
        bar.update(1)

    try:
        comp = compare(lm, prompt, columns, params, mixer=mixer, on_text=on_text, store=store,
                       session_id=session_id, batched=False if args.sequential else None)
    finally:
        bar.close()
    width = shutil.get_terminal_size((120, 40)).columns
    print(_side_by_side([(cr.column.label, cr.result.text,
                          f"{cr.result.n_tokens} tokens, {cr.result.tokens_per_s:.1f} tokens/s"
                          + (" (stopped)" if cr.result.stopped else " (cut at the token limit)" if cr.result.truncated else ""))
                         for cr in comp.columns], width), flush=True)
    mode = "one batch" if comp.batched else "one after another"
    not_saved = not_saved or comp.save_error
    saved = f"; saved as comparison {comp.comparison_id} in {store.path}" if comp.comparison_id is not None else ""
    print(f"[{len(columns)} column(s), {mode}, seed {params.seed}{saved}]", file=sys.stderr)
    if not_saved:
        raise TsdpoError(f"the replies above were generated but not saved: {not_saved}")
    return 0


def _mixer_for(lm, refs, store, positions: str = "all"):
    """A mixer holding each referenced direction once (a file or a stored name), and the name each
    reference is mixed under."""
    from engine.directions import load_direction, resolve_direction_path
    from engine.mixer import Mixer

    mixer = Mixer(lm, positions=positions)
    names: dict[str, str] = {}  # reference as typed -> name in the mixer (one per file)
    by_path: dict = {}
    for ref in dict.fromkeys(refs):
        path = resolve_direction_path(ref, store)
        if path not in by_path:
            direction = load_direction(path, lm)
            taken = direction.name in mixer.directions
            by_path[path] = mixer.add(direction, name=f"{direction.name} ({path.stem})" if taken else None)
        names[ref] = by_path[path]
    for a, b, cos in mixer.interference():
        print(f"note: {a} and {b} point nearly the same way (cosine {cos:+.2f}); their effects will overlap.", file=sys.stderr)
    return mixer, names


def _cli_session(store, lm) -> int:
    """Generations from the command line go to one session per model, named after it."""
    name = f"cli: {lm.name}"
    for s in store.sessions(limit=200):
        if s.name == name and s.model_fingerprint == lm.fingerprint:
            return s.id
    return store.create_session(name, lm.source.to_json(), lm.fingerprint).id


def cmd_steer_extract(args) -> int:
    from engine.data import load_pairs
    from engine.steering import extract

    layers = _int_list(args.layers, "--layers")
    pairs = load_pairs(args.data, format=args.format, objective=args.objective, limit=args.limit,
                       attribute=args.attribute)
    print(f"  {len(pairs)} {pairs.objective} pairs from {pairs.source} ({pairs.format})", file=sys.stderr)
    out = _new_output(args.out, args.overwrite)
    store = None if args.no_store else _store(args)  # a database that cannot open says so before minutes of work
    lm = _load(args, args.model)
    with _phase_bars() as progress:
        sv = extract(lm, pairs, aggregate=args.aggregate, batch_size=args.batch_size, val_fraction=args.val_fraction,
                     seed=args.seed, padding_side=args.padding_side, layers=layers, strength=args.strength,
                     max_response_tokens=args.max_response_tokens, progress=progress, name=args.name)
        progress(Progress("saving", 0, 1))
        sv.save(out)
        progress(Progress("saving", 1, 1))
    print(f"objective     {sv.objective}")
    print(f"pairs         {sv.meta['train_pairs']} for the vector, {sv.meta['heldout_pairs']} held out for scoring")
    print("layer ranking   steerability  separation accuracy  effect size   (held-out pairs)")
    steer = sv.meta.get("steerability") or [None] * len(sv.ranking)
    for l in sv.ranking[:5]:
        st = f"{steer[l]:+.4f}" if steer[l] is not None else "-"
        print(f"  layer {l:>3}     {st:>9}      {float(sv.accuracy[l]):.2f}                {float(sv.effect[l]):+.2f}")
    print(f"steered       layer(s) {', '.join(map(str, sv.layers))} at strength {sv.strength:g} x layer norm")
    print(f"saved         {out} ({sv.meta['seconds']:.1f} s)", flush=True)
    if store is not None:
        _register(store, sv, out, lm, meta={"layers": sv.layers, "strength": sv.strength, "pairs": len(pairs)})
        print(f"stored as     {sv.name!r} (use --mix {sv.name}=W)")
    return 0


def _register(store, direction, out, lm, meta: dict) -> None:
    """Put a saved direction in the database; if that fails the file stays, with how to register it later."""
    from engine.directions import file_sha256

    try:
        store.add_direction(name=direction.name, kind=direction.kind, objective=direction.objective,
                            path=str(out.resolve()), sha256=file_sha256(out), model_fingerprint=lm.fingerprint, meta=meta)
    except TsdpoError as exc:
        raise TsdpoError(f"the direction is saved in {out}, but not registered in the database: {exc} Once the "
                         f"database is free, register it with `tsdpo directions add {out}`.") from exc


class _phase_bars:
    """A progress bar per phase of a job on stderr (tokenizing, forward passes, ranking layers, saving, ...)."""

    def __enter__(self):
        self.bar, self.phase = None, None
        return self

    def __call__(self, p: Progress) -> None:
        if p.phase != self.phase:
            if self.bar is not None:
                self.bar.close()
            self.bar, self.phase = _progress_bar(p.total, p.phase, "it"), p.phase
        self.bar.total = p.total
        self.bar.n = p.done
        post = {k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in p.metrics.items()
                if k in ("loss", "rewards/accuracies", "rewards/margins")}
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False


def _new_output(path: str, overwrite: bool):
    from pathlib import Path

    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise TsdpoError(f"{out} already exists; choose another --out or pass --overwrite.")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True)
    return out


def cmd_lengths(args) -> int:
    from engine.directions import load_direction
    from engine.evaluate import is_monotonic, response_lengths, summarize_lengths
    from engine.generation import SamplingParams
    from engine.mixer import Mixer

    weights = _float_list(args.weights, "--weights")
    _check_weights(weights, args.force, "--weights")
    prompts = _read_prompts(args.prompts, args.limit)
    lm = _load(args, args.model)
    mixer = Mixer(lm, positions=args.positions)
    store = None if args.no_store else _store(args)
    direction = load_direction(args.direction, lm, store)
    if (args.layers or args.strength is not None) and direction.kind == "steering":
        direction = direction.with_settings(_int_list(args.layers, "--layers"), args.strength)
    name = mixer.add(direction)
    params = SamplingParams(max_new_tokens=args.max_new_tokens)
    bar = _progress_bar(len(prompts), "prompts", "prompt")
    try:
        lengths = response_lengths(mixer, name, weights, prompts, params, progress=lambda d, n: bar.update(1))
    finally:
        bar.close()
    rows = summarize_lengths(lengths, params.max_new_tokens)
    print(f"{'weight':>8} {'mean tokens':>12} {'median':>8} {'at limit':>9}")
    for r in rows:
        print(f"{r['weight']:>8g} {r['mean_tokens']:>12.1f} {r['median_tokens']:>8g} {r['at_limit']:>9}")
    means = [r["mean_tokens"] for r in rows]
    how = f"layers {direction.layers}, strength {direction.strength:g}" if direction.kind == "steering" else direction.param
    print(f"monotonic increasing: {is_monotonic(means)}  ({len(prompts)} prompts, greedy, {direction.kind}, {how})")
    return 0


def _parse_point(text: str, option: str = "--point", names: str = "X,Y") -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise TsdpoError(f"{option} takes {names} (two numbers), not {text!r}.") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise TsdpoError(f"{option} takes {names} as finite numbers, not {text!r}.")
    return x, y


def cmd_export(args) -> int:
    from pathlib import Path

    from engine.export import check_target, clean_stale, export_mix
    from engine.plane import PreferencePlane

    if args.clean:
        done = clean_stale(Path(args.out).expanduser().resolve())
        print("\n".join(done) if done else f"nothing to clean beside {args.out}")
        return 0
    if bool(args.mix) == bool(args.session):
        raise TsdpoError("Give either --mix DIRECTION=W[,...] or --session ID (with --point X,Y), not both or neither.")
    check_target(Path(args.out).expanduser().resolve(), args.overwrite)  # before minutes of loading
    store = _store(args) if (args.session or not args.no_store) else None
    point = plane = None
    if args.session:
        row = store.session(args.session)
        settings = row.settings or {}
        saved = settings.get("directions", [])
        if not saved:
            raise TsdpoError(f"Session {row.id} ({row.name}) has no directions on its plane; nothing to export.")
        source = args.model
        if source is None and row.model_ref.get("kind") != "embedded":
            source = row.model_ref.get("ref")
        lm = _load(args, source)
        if row.model_fingerprint and lm.fingerprint != row.model_fingerprint:
            raise TsdpoError(f"Session {row.id} was made with another model (fingerprint {row.model_fingerprint}) than "
                             f"{lm.name} ({lm.fingerprint}). Pass the session's model with --model.")
        mixer, names = _mixer_for(lm, [d["path"] for d in saved], None)
        renamed = {d["name"]: names[d["path"]] for d in saved}
        plane_obj = PreferencePlane.from_json(settings.get("plane", {}))
        point = _parse_point(args.point) if args.point else tuple(settings.get("point", (0.0, 0.0)))
        weights = {renamed.get(k, k): w for k, w in plane_obj.weights(*point).items()}
        _check_weights(weights.values(), args.force, f"session {row.id}'s plane")
        plane = plane_obj.to_json()
        print(f"  session {row.id} ({row.name}) at point ({point[0]:+.3f}, {point[1]:+.3f})", file=sys.stderr)
    else:
        if args.point:
            raise TsdpoError("--point goes with --session (a stored plane); with --mix, give the weights directly.")
        mix = _parse_mix(args.mix, args.force)
        lm = _load(args, args.model)
        mixer, names = _mixer_for(lm, list(mix), store)
        weights = {names[r]: w for r, w in mix.items()}
    print("  mix: " + (", ".join(f"{n} {w:+g}" for n, w in weights.items() if w) or "none (the base model)"), file=sys.stderr)
    result = export_mix(lm, mixer, weights, args.out, format=args.format, overwrite=args.overwrite,
                        bake_steering=args.bake_steering, dtype=args.out_dtype, max_shard_size=args.max_shard_size,
                        verify=not args.no_verify, point=point, plane=plane, progress=_progress)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
        return 0
    print(f"format   {result.format}")
    print(f"folder   {result.path}")
    print(f"files    {len(result.files)} ({', '.join(result.files[:6])}{', ...' if len(result.files) > 6 else ''})")
    print(f"size     {result.bytes / 1e6:.2f} MB, written in {result.seconds:.1f} s")
    if result.check:
        print(f"check    {result.check['what']} {result.check['result']}")
    for note in result.notes:
        print(f"note     {note}")
    return 0


def cmd_sweep(args) -> int:
    from engine.data import load_pairs
    from engine.directions import load_direction
    from engine.sweep import Method, Sweep, SweepConfig, write_outputs

    lo, hi = _parse_point(args.range, "--range", "LOW,HIGH")
    prompts = _read_prompts(args.prompts, args.n_prompts) if args.prompts else []
    cfg = SweepConfig(grid=args.grid, low=lo, high=hi, pairs=args.pairs, beta=args.beta, prompts=prompts,
                      max_new_tokens=args.max_new_tokens, pareto_metric=args.metric,
                      reference=_parse_point(args.reference, "--reference") if args.reference else None,
                      linearization_gap=not args.no_lin_gap, reward_model=args.reward_model)
    cfg.coords()  # refuse a bad grid before loading anything
    if not (args.x or args.steer_x or args.scalarized):
        raise TsdpoError("Nothing to sweep: give tangent directions (--x, --y), steering vectors (--steer-x, --steer-y) "
                         "and/or scalarized runs (--scalarized FILE, repeatable).")
    data = {}
    for spec in args.data:
        objective, sep, path = spec.partition("=")
        if not sep:
            raise TsdpoError(f"--data takes OBJECTIVE=FILE, not {spec!r}.")
        ps = load_pairs(path, format=args.format, objective=objective, limit=args.limit)
        data[ps.objective] = ps.split(args.val_fraction, args.seed)[1]
        print(f"  {objective}: {len(data[ps.objective])} held-out pairs from {path}", file=sys.stderr)
    lm = _load(args, args.model)
    store = None if args.no_store else _store(args)
    methods = []
    for kind, x, y in (("tangent", args.x, args.y), ("steering", args.steer_x, args.steer_y)):
        if x or y:
            if not (x and y):
                raise TsdpoError(f"The {kind} grid needs both axes (--{'x' if kind == 'tangent' else 'steer-x'} and "
                                 f"--{'y' if kind == 'tangent' else 'steer-y'}).")
            dx, dy = load_direction(x, lm, store), load_direction(y, lm, store)
            for d, ref in ((dx, x), (dy, y)):
                if d.kind != kind:
                    raise TsdpoError(f"{ref} is a {d.kind} direction, not a {kind} one.")
            methods.append(Method(kind, kind, dx, dy))
    if args.scalarized:
        points = []
        for ref in args.scalarized:
            d = load_direction(ref, lm, store)
            if d.kind != "scalarized":
                raise TsdpoError(f"{ref} is a {d.kind} direction, not a scalarized-DPO run.")
            sources = d.meta.get("objective_sources", [])
            share = float(sources[0]["weight"]) if sources else float("nan")
            points.append((d.name, d, share))
        methods.append(Method("scalarized", "scalarized", points=points))
    bar = _progress_bar(1, "sweep", "point")

    def progress(done: int, total: int, what: str) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(what[:40])
        bar.refresh()

    sweep = Sweep(lm, methods, data, cfg, args.out, progress=progress, trust_remote_code=args.trust_remote_code)
    try:
        result = sweep.run()
    except KeyboardInterrupt:
        bar.close()
        print(f"tsdpo: stopped; {len(sweep.state['points'])} points are saved in {args.out}. Run the same command to "
              "resume.", file=sys.stderr)
        return 130
    finally:
        bar.close()
    files = write_outputs(result, args.out)
    ox, oy = result["objectives"]
    print(f"{'method':<12} {'points':>6} {'hypervolume':>12} {'pareto':>6}  smoothness {ox} / {oy} (Kendall tau)")
    for name, info in result["methods"].items():
        sm = info["smoothness"]
        taus = " / ".join("-" if sm.get(o, {}).get("kendall_tau") is None else f"{sm[o]['kendall_tau']:+.2f}" for o in (ox, oy))
        print(f"{name:<12} {len(info['points']):>6} {info['hypervolume']:>12.4g} {len(info['pareto']):>6}  {taus}")
    for name, c in result.get("cca", {}).items():
        print(f"CCA {name}: mean canonical correlation {c['mean']:.3f} (largest {c['top']:.3f})")
    print(f"wrote {', '.join(str(f) for f in files)}")
    return 0


def _read_prompts(path: str, limit: Optional[int] = None) -> list[str]:
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise TsdpoError(f"No prompts file at {p}: give a .jsonl with a 'prompt' field per line, or a .txt with one prompt per line.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise TsdpoError(f"{p} is not valid UTF-8 text (byte {exc.start}); save it as UTF-8.") from None
    if p.suffix == ".jsonl":
        try:
            prompts = [json.loads(l)["prompt"] for l in text.splitlines() if l.strip()]
        except (ValueError, KeyError, TypeError) as exc:
            raise TsdpoError(f"{p}: every line must be a JSON object with a 'prompt' field ({exc}).") from exc
    else:
        prompts = [l for l in text.splitlines() if l.strip()]
    if not prompts:
        raise TsdpoError(f"{p} holds no prompts.")
    return prompts[:limit] if limit else prompts


def _train_config(args, method: str):
    from engine.train import TrainConfig

    return TrainConfig(method=method, param=args.param, rank=args.rank, steps=args.steps, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, lr=args.lr, beta=args.beta, loss=args.loss, seed=args.seed,
                       layers=_int_list(args.layers, "--layers"),
                       modules=args.modules.split(",") if args.modules else None,
                       max_prompt_tokens=args.max_prompt_tokens, max_response_tokens=args.max_response_tokens,
                       val_fraction=args.val_fraction, checkpoint_every=args.checkpoint_every)


def _run_training(args, data, cfg, kind: str, objective: Optional[str] = None) -> int:
    import os

    from engine.train import train_direction

    main_process = int(os.environ.get("RANK", "0")) == 0
    out = _new_output(args.out, args.overwrite) if main_process else None
    store = None if args.no_store or not main_process else _store(args)
    lm = _load(args, args.model)
    with _phase_bars() as progress:
        result = train_direction(lm, data, cfg, progress=progress if main_process else None,
                                 checkpoint_dir=args.checkpoint_dir, objective=objective)
    if not main_process:
        return 0
    d = result.direction
    d.save(out)
    last, val = result.history[-1], result.val_metrics
    print(f"{kind} direction {d.name!r} ({cfg.param}, {len(d.param_names())} weight matrices) saved to {out}")
    line = (f"final: step {last['step']} loss {last['loss']:.4f} accuracy {last['rewards/accuracies']:.3f} "
            f"margin {last['rewards/margins']:.4f}")
    if val:
        line += (f" | held-out: accuracy {val['rewards/accuracies']:.3f} margin {val['rewards/margins']:.4f} "
                 f"loss {val['loss']:.4f}")
    print(line, flush=True)
    if store is not None:
        _register(store, d, out, lm, meta={"param": cfg.param, "steps": cfg.steps, "validation": val})
        print(f"stored as {d.name!r} (use --mix {d.name}=W)")
    return 0


def cmd_train(args) -> int:
    from engine.data import load_pairs

    pairs = load_pairs(args.data, format=args.format, objective=args.objective, limit=args.limit, attribute=args.attribute)
    print(f"  {len(pairs)} {pairs.objective} pairs from {pairs.source} ({pairs.format})", file=sys.stderr)
    return _run_training(args, pairs, _train_config(args, "tangent"), "tangent", args.name)


def cmd_train_scalarized(args) -> int:
    from engine.data import load_pairs

    if len(args.data) != 2:
        raise TsdpoError("train-scalarized takes two --data OBJECTIVE=FILE options; --weight is the first one's share.")
    if not 0.0 <= args.weight <= 1.0:
        raise TsdpoError(f"--weight is a share between 0 and 1, not {args.weight}.")
    sources = []
    for spec, w in zip(args.data, (args.weight, 1.0 - args.weight)):
        objective, sep, path = spec.partition("=")
        if not sep:
            raise TsdpoError(f"--data takes OBJECTIVE=FILE, not {spec!r}.")
        ps = load_pairs(path, format=args.format, objective=objective, limit=args.limit)
        sources.append((ps, w))
        print(f"  {len(ps)} {ps.objective} pairs from {path}, share {w:g}", file=sys.stderr)
    name = args.name or f"scalarized {sources[0][0].objective}={args.weight:g}"
    return _run_training(args, sources, _train_config(args, "ordinary"), "scalarized", name)


def _training_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the .safetensors direction file to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--name", help="name to store it under")
    p.add_argument("--param", choices=["lowrank", "full"], default="lowrank")
    p.add_argument("--rank", type=int, default=8, help="rank of the low-rank B A0 factorization")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step, over all processes")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=0.0, help="default: 2e-3 low-rank, 1e-4 full")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss", choices=["sigmoid", "ipo"], default="sigmoid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", help="decoder layers to train (comma-separated; default all)")
    p.add_argument("--modules", help="only weights whose names contain one of these (comma-separated), e.g. mlp")
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--max-response-tokens", type=int, default=128)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--checkpoint-dir", help="save checkpoints here, and resume from one found here")
    p.add_argument("--checkpoint-every", type=int, default=0)
    _model_store_args(p)


def cmd_directions(args) -> int:
    store = _store(args)
    rows = store.directions()
    if not rows:
        print("No stored directions yet: build one with `tsdpo steer extract`, or register a file with "
              "`tsdpo directions add FILE`.")
        return 0
    for d in rows:
        print(f"{d.name:<20} {d.kind:<10} {d.objective:<14} {d.model_fingerprint or '':<17} {d.path}")
    return 0


def cmd_directions_add(args) -> int:
    """Register a direction file that exists (one whose registration failed, or one from elsewhere)."""
    from pathlib import Path

    from engine.directions import file_sha256, open_direction

    path = Path(args.file).expanduser().resolve()
    d = open_direction(path)
    if args.name:
        d.name = args.name
    store = _store(args)
    store.add_direction(name=d.name, kind=d.kind, objective=d.objective, path=str(path), sha256=file_sha256(path),
                        model_fingerprint=d.model.get("fingerprint"), meta={"registered_from": "tsdpo directions add"})
    print(f"stored {d.name!r} ({d.kind}, {d.objective}, for model {d.model.get('model_name', '?')}) from {path}")
    return 0


def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a .jsonl/.json/.csv/.tsv/.parquet file, a folder, or a `datasets` name")
    p.add_argument("--format", choices=["trl", "ultrafeedback", "hh-rlhf", "helpsteer"], help="default: detected")
    p.add_argument("--objective", help="objective name; verbosity/conciseness build pairs from response length")
    p.add_argument("--attribute", help="HelpSteer attribute to make pairs from")
    p.add_argument("--limit", type=int, help="use the first N pairs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tsdpo", description="Preference mixing: directions, steering, generation, export.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("info", help="versions, device, and where the cache and database live")
    p.add_argument("--db", help="database path (default: in the user data folder, or TSDPO_DB)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    model = sub.add_parser("model", help="load and describe models").add_subparsers(dest="model_command", required=True, metavar="ACTION")
    p = model.add_parser("load", help="load a model and print its architecture, size and fingerprint")
    p.add_argument("source", nargs="?", default=None,
                   help="a Hugging Face folder, a hub id, or a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    _model_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_load)

    data = sub.add_parser("data", help="read preference data").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("inspect", help="count pairs, show length statistics and malformed rows")
    p.add_argument("file", help="a .jsonl/.json/.csv/.tsv/.parquet file, a folder, or a `datasets` name")
    p.add_argument("--format", choices=["trl", "ultrafeedback", "hh-rlhf", "helpsteer"], help="default: detected from the columns")
    p.add_argument("--objective", help="objective name; verbosity/conciseness build pairs from response length")
    p.add_argument("--attribute", help="HelpSteer attribute to make pairs from")
    p.add_argument("--limit", type=int, help="use the first N pairs")
    p.add_argument("--split", default="train", help="dataset split, for `datasets` names")
    p.add_argument("--show", type=int, default=10, help="how many problem rows to list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_inspect)

    p = sub.add_parser("generate", help="generate with a mix of directions, side by side with the base model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--mix", action="append", default=[], metavar="DIRECTION=W[,DIRECTION=W...]",
                   help="a column mixing directions (a file or a stored name) with weights; repeat for more columns")
    p.add_argument("--compare", action="append", default=[], metavar="base", help="add a base-model column")
    p.add_argument("--positions", choices=["all", "generated"], default="all",
                   help="steer every position, or only generated tokens")
    p.add_argument("--sequential", action="store_true", help="run columns one after another instead of as one batch")
    p.add_argument("--force", action="store_true", help=f"accept weights beyond +-{MAX_SANE_WEIGHT:g}")
    p.add_argument("--no-store", action="store_true", help="do not save the generations in the database")
    p.add_argument("--db", help="database path")
    p.add_argument("--model", default=None, help="model source (default: embedded)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    _model_args(p)
    p.set_defaults(func=cmd_generate)

    steer = sub.add_parser("steer", help="steering vectors (training-free)").add_subparsers(dest="steer_command", required=True, metavar="ACTION")
    p = steer.add_parser("extract", help="build a steering vector from preference pairs")
    _data_args(p)
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--name", help="name to store it under (default: the objective)")
    p.add_argument("--model", default=None, help="model source (default: embedded)")
    p.add_argument("--layers", help="steer these layers (comma-separated) instead of the best-scoring one")
    p.add_argument("--strength", type=float, default=None, help="weight 1.0 adds this fraction of the layer's typical norm")
    p.add_argument("--aggregate", choices=["mean", "last"], default="mean", help="over response tokens")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--val-fraction", type=float, default=0.2, help="pairs held out to score layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--padding-side", choices=["right", "left"], default="right")
    p.add_argument("--max-response-tokens", type=int, default=None)
    p.add_argument("--no-store", action="store_true", help="do not register it in the database")
    p.add_argument("--db", help="database path")
    _model_args(p)
    p.set_defaults(func=cmd_steer_extract)

    p = sub.add_parser("lengths", help="mean response length at several weights of one direction (a length check)")
    p.add_argument("--direction", required=True, help="a direction file or stored name (steering or tangent)")
    p.add_argument("--prompts", required=True, help=".jsonl with a prompt field, or .txt with one prompt per line")
    p.add_argument("--weights", default="-1,-0.5,0,0.5,1")
    p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--layers", help="steering only: override the steered layers")
    p.add_argument("--strength", type=float, help="steering only: override the strength")
    p.add_argument("--positions", choices=["all", "generated"], default="all")
    p.add_argument("--force", action="store_true", help=f"accept weights beyond +-{MAX_SANE_WEIGHT:g}")
    _model_store_args(p)
    p.set_defaults(func=cmd_lengths)

    p = sub.add_parser("train", help="train a TS-DPO tangent direction for one objective")
    _data_args(p)
    _training_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-scalarized", help="train the scalarized-DPO baseline on a weighted mixture of two objectives")
    p.add_argument("--data", action="append", default=[], required=True, metavar="OBJECTIVE=FILE")
    p.add_argument("--weight", type=float, required=True, help="share of the first objective's pairs (0..1)")
    p.add_argument("--format", choices=["trl", "ultrafeedback", "hh-rlhf", "helpsteer"])
    p.add_argument("--limit", type=int)
    _training_args(p)
    p.set_defaults(func=cmd_train_scalarized)

    p = sub.add_parser("sweep", help="measure a grid of plane points: Pareto fronts, smoothness, disentanglement, linearization gap")
    p.add_argument("--x", help="tangent direction on the x axis (file or stored name)")
    p.add_argument("--y", help="tangent direction on the y axis")
    p.add_argument("--steer-x", help="steering vector on the x axis (the steering grid)")
    p.add_argument("--steer-y", help="steering vector on the y axis")
    p.add_argument("--scalarized", action="append", default=[], metavar="FILE", help="a scalarized-DPO run (repeatable)")
    p.add_argument("--data", action="append", default=[], required=True, metavar="OBJECTIVE=FILE",
                   help="held-out pairs per objective: the same file and --limit as in training, so the held-out split matches")
    p.add_argument("--format", default=None)
    p.add_argument("--limit", type=int, help="as in training")
    p.add_argument("--val-fraction", type=float, default=0.1, help="as in training")
    p.add_argument("--seed", type=int, default=0, help="as in training")
    p.add_argument("--pairs", type=int, default=16, help="held-out pairs per objective to score")
    p.add_argument("--prompts", help="prompts for length / distinct-2 / reward (.jsonl with 'prompt', or .txt)")
    p.add_argument("--n-prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--reward-model", help="a sequence-classification model (folder or hub id) to score replies")
    p.add_argument("--grid", type=int, default=5, help="points per axis (odd)")
    p.add_argument("--range", default="-1,1", metavar="LOW,HIGH")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--metric", choices=["margin", "accuracy"], default="margin", help="Pareto front and hypervolume on this metric")
    p.add_argument("--reference", metavar="X,Y", help="hypervolume reference point (default: the worst value of each objective)")
    p.add_argument("--no-lin-gap", action="store_true", help="skip the linearization gap (one JVP per point)")
    p.add_argument("--out", required=True, help="a folder: results, plots and report; rerun with the same --out to resume")
    _model_store_args(p)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("export", help="write a mix as a Hugging Face checkpoint, a PEFT LoRA adapter or llama.cpp control vectors")
    p.add_argument("--mix", metavar="DIRECTION=W[,DIRECTION=W...]", help="directions (files or stored names) and weights")
    p.add_argument("--session", type=int, metavar="ID", help="export the mix of a stored session's plane instead")
    p.add_argument("--point", metavar="X,Y", help="with --session: the point on the plane (default: the session's saved point)")
    p.add_argument("--out", required=True, help="a new folder (an existing non-empty one needs --overwrite)")
    p.add_argument("--format", choices=["hf", "peft", "controlvector"], default="hf",
                   help="hf: merged checkpoint; peft: LoRA adapter from low-rank directions; controlvector: llama.cpp GGUF")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export (only once the new one is complete)")
    p.add_argument("--bake-steering", action="store_true",
                   help="hf: put steering vectors into the checkpoint as an MLP bias (Llama-style models)")
    p.add_argument("--out-dtype", choices=["float32", "bfloat16", "float16"], help="hf: dtype of the saved weights (default: as loaded)")
    p.add_argument("--max-shard-size", default="2GB", help="hf: split the weights into files of at most this size")
    p.add_argument("--no-verify", action="store_true", help="skip reading the export back and comparing it")
    p.add_argument("--force", action="store_true", help=f"accept weights beyond +-{MAX_SANE_WEIGHT:g}")
    p.add_argument("--clean", action="store_true",
                   help="only tidy up after an interrupted export to --out (stale temporary folders, a hidden old export)")
    p.add_argument("--model", default=None, help="model source (default: embedded, or the session's model)")
    p.add_argument("--no-store", action="store_true", help="do not look up direction names in the database")
    p.add_argument("--db", help="database path")
    p.add_argument("--json", action="store_true")
    _model_args(p)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("directions", help="list the directions stored in the database, or register a file (add)")
    p.add_argument("--db")
    p.set_defaults(func=cmd_directions)
    actions = p.add_subparsers(dest="directions_command", metavar="ACTION")
    q = actions.add_parser("list", help="list the stored directions (the default)")
    q.add_argument("--db", default=argparse.SUPPRESS)
    q.set_defaults(func=cmd_directions)
    q = actions.add_parser("add", help="register a direction file in the database")
    q.add_argument("file", help="a direction .safetensors file")
    q.add_argument("--name", help="name to store it under (default: the file's own)")
    q.add_argument("--db", default=argparse.SUPPRESS)
    q.set_defaults(func=cmd_directions_add)
    return parser


_NEGATIVE_OK = ("--weights", "--mix", "--point", "--range", "--reference")


def _join_negative_values(argv: list[str]) -> list[str]:
    """Let `--weights -1,0,1` work: argparse would read '-1,0,1' as an option."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in _NEGATIVE_OK:
            nxt = next(it, None)
            out.append(a if nxt is None else f"{a}={nxt}")
        else:
            out.append(a)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except TsdpoError as exc:
        if args.debug:
            raise
        print(f"tsdpo: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("tsdpo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            raise
        print(f"tsdpo: unexpected error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
