"""`tsdpo sessions` and `tsdpo ratings`: what was rated and what it adds up to, without a display."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.cli.common import FORCE, MODEL, STORE, PhaseBars, cli_session, load, load_mix, open_store, parse_mix
from engine.errors import TsdpoError
from engine.mixer import POSITIONS


def _pin_mix(store, session_id: int, name: str) -> tuple[dict[str, float], dict[str, str]]:
    """A pinned point's mix in a session, as {direction name: weight}, and where those directions' files are."""
    from engine.plane import PreferencePlane

    if session_id is None:
        raise TsdpoError(f"--column pin:{name} names a pinned point of a session: give --session N (tsdpo sessions lists them).")
    row = store.session(session_id)
    pin = next((p for p in row.pinned if p.name == name), None)
    if pin is None:
        names = ", ".join(p.name for p in row.pinned) or "none"
        raise TsdpoError(f"Session {session_id} has no pinned point {name!r} (its pins: {names}).")
    settings = row.settings or {}
    weights = dict(pin.weights or {})
    if not weights:  # pinned before schema 3: the mix the session's plane gives its coordinates
        weights = PreferencePlane.from_json(settings.get("plane", {})).weights(pin.x, pin.y)
    paths = {d["name"]: d["path"] for d in settings.get("directions", [])}
    missing = [n for n, w in weights.items() if w and n not in paths]
    if missing:
        raise TsdpoError(f"The pin {name!r} mixes {', '.join(missing)}, which session {session_id} has no file for.")
    return {n: w for n, w in weights.items() if w}, paths


def parse_columns(specs: list[str], force: bool) -> list[tuple[str, str, object]]:
    """--column base | mix:DIRECTION=W[,DIRECTION=W...] | pin:NAME  ->  (label, kind, value)."""
    out = []
    for spec in specs:
        kind, sep, rest = spec.partition(":")
        if spec == "base":
            out.append(("base", "base", None))
        elif kind == "mix" and sep and rest:
            mix = parse_mix(rest, force)
            out.append(("mix " + ", ".join(f"{Path(r).stem if r.endswith('.safetensors') else r}={w:+g}" for r, w in mix.items()),
                        "mix", mix))
        elif kind == "pin" and sep and rest:
            out.append((f"pinned {rest}", "pin", rest))
        else:
            raise TsdpoError(f"--column takes base, mix:DIRECTION=W[,DIRECTION=W...] or pin:NAME, not {spec!r}.")
    if not 1 <= len(out) <= 4:
        raise TsdpoError(f"A prompt set runs through 1 to 4 columns (--column, repeatable), not {len(out)}.")
    return out


def cmd_sessions(args) -> int:
    store = open_store(args)
    rows = store.sessions(limit=args.limit)
    if not rows:
        print("no sessions yet")
        return 0
    print(f"{'id':>4}  {'name':<36} {'comparisons':>11} {'rated':>6}  updated")
    for s in rows:
        comps = store.history(s.id)
        print(f"{s.id:>4}  {s.name[:36]:<36} {len(comps):>11} {sum(1 for c in comps if c.ratings):>6}  "
              f"{s.updated_at:%Y-%m-%d %H:%M}")
    return 0


def _refuse_existing(paths, overwrite: bool) -> None:
    for p in paths:
        if p and Path(p).exists() and not overwrite:
            raise TsdpoError(f"{p} exists; choose another file or pass --overwrite.")


def cmd_ratings(args) -> int:
    from engine.paths import atomic_write_text
    from engine.ratings import parse_date, plot_report, rated_comparisons, ratings_csv, ratings_report, report_text
    from engine.store import export_ratings_trl

    since = parse_date(args.since, "--since") if args.since else None
    until = parse_date(args.until, "--until") if args.until else None
    if args.trl and args.session is None:
        raise TsdpoError("--trl writes one session's pairs: give --session N (tsdpo sessions lists them).")
    _refuse_existing([args.json_out, args.csv, args.plot, args.trl], args.overwrite)
    if args.no_store:
        raise TsdpoError("Ratings live in the database; leave out --no-store (or give --db PATH).")
    store = open_store(args)
    if args.session is not None:
        store.session(args.session)  # a clear error for a session that is not there
    report = ratings_report(store, args.session, args.prompt_set, since, until)
    print(report_text(report), end="")
    if args.json_out:
        atomic_write_text(args.json_out, json.dumps(report, indent=1))
        print(f"wrote {args.json_out}", file=sys.stderr)
    if args.csv:
        atomic_write_text(args.csv, ratings_csv(rated_comparisons(store, args.session, args.prompt_set, since, until)))
        print(f"wrote {args.csv}", file=sys.stderr)
    if args.plot:
        plot_report(report, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    if args.trl:
        n = export_ratings_trl(store, args.session, args.trl, exclude_truncated=args.exclude_truncated)
        print(f"wrote {n} preference pairs to {args.trl}" + (" (pairs with a cut-off reply left out)" if args.exclude_truncated
                                                             else " (cut-off replies flagged)"), file=sys.stderr)
    return 0


def cmd_eval(args) -> int:
    from engine.generation import Column, SamplingParams
    from engine.promptsets import prompt_text, read_prompt_set, run_prompt_set

    specs = parse_columns(args.column, args.force)
    pset = read_prompt_set(args.prompts, args.limit, args.name)
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise TsdpoError(f"{out} exists; choose another --out or pass --overwrite.")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed).validate()
    if args.no_store and any(kind == "pin" for _, kind, _ in specs):
        raise TsdpoError("pin: columns come from a session in the database; leave out --no-store.")
    lm = load(args, args.model)
    store = None if args.no_store else open_store(args)
    if store is not None and args.session is not None:
        row = store.session(args.session)
        if row.model_fingerprint and row.model_fingerprint != lm.fingerprint:
            raise TsdpoError(f"Session {args.session} is for another model ({row.model_ref.get('ref', '?')}); load that "
                             "model with --model, or leave out --session to use this model's own CLI session.")
    refs, wanted, preferred = [], [], {}
    for label, kind, value in specs:
        if kind == "mix":
            refs += list(value)
            wanted.append((label, value))
        elif kind == "pin":
            mix, paths = _pin_mix(store, args.session, value)
            refs += [paths[n] for n in mix]
            preferred.update({paths[n]: n for n in mix})  # stored under the session's own names
            wanted.append((label, {paths[n]: w for n, w in mix.items()}))
        else:
            wanted.append((label, {}))
    mixer, names = load_mix(lm, list(dict.fromkeys(refs)), store, args.positions, preferred) if refs else (None, {})
    columns = [Column(label, {names[r]: w for r, w in mix.items()}) for label, mix in wanted]
    session_id = None
    if store is not None:
        session_id = args.session if args.session is not None else cli_session(store, lm)
        if args.system:
            row = store.session(session_id)
            store.update_session(session_id, settings={**(row.settings or {}), "system_prompt": args.system})
        elif args.session is not None:
            args.system = (store.session(session_id).settings or {}).get("system_prompt")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".part")
    with open(tmp, "w", encoding="utf-8") as f, PhaseBars() as bars:
        def on_row(r) -> None:  # each row on disk as it finishes: a stopped run keeps what it made
            f.write(json.dumps({**r.to_json(), "prompt_set": pset.name}, ensure_ascii=False) + "\n")
            f.flush()

        try:
            result = run_prompt_set(lm, pset, columns, params, mixer=mixer, store=store, session_id=session_id,
                                    system=args.system, progress=bars, on_row=on_row)
        except KeyboardInterrupt:
            f.close()
            tmp.replace(out)
            print(f"tsdpo: stopped; the rows finished so far are in {out} and in the session.", file=sys.stderr)
            return 130
    tmp.replace(out)
    width = max(len(c.label) for c in columns)
    print(f"{'prompt':<40} " + " ".join(f"{c.label[:width]:>{width}}" for c in columns))
    for r in result.rows:
        text = " ".join(prompt_text(r.prompt).split())
        print(f"{text[:40]:<40} " + " ".join(
            f"{str(c['n_tokens']) + (' cut' if c['truncated'] else ''):>{width}}" for c in r.columns))
    failed = [r for r in result.rows if r.save_error]
    where = f"session {session_id} in {store.path}" if store is not None else "no database (--no-store)"
    print(f"{len(result.rows)} prompts x {len(columns)} columns in {result.seconds:.0f} s; tokens per reply above "
          f"('cut': reached the token limit); wrote {out}; stored in {where} as prompt set {pset.name!r}", file=sys.stderr)
    if failed:
        raise TsdpoError(f"{len(failed)} rows were generated (they are in {out}) but not saved: {failed[0].save_error}")
    return 0


def add_parsers(sub) -> None:
    e = sub.add_parser("eval", parents=[STORE, FORCE, MODEL],
                       help="run a prompt set through up to 4 columns (base, mixes, pinned points), stored in the "
                            "session and written as JSONL")
    e.add_argument("--prompts", required=True, help=".jsonl ('prompt' text or chat messages, or 'messages'), .csv "
                                                    "('prompt' column) or .txt (one per line)")
    e.add_argument("--column", action="append", default=[], required=True,
                   help="base, mix:DIRECTION=W[,DIRECTION=W...] (files or stored names), or pin:NAME (a pinned point "
                        "of --session); repeat for up to 4 columns")
    e.add_argument("--out", required=True, help="results, one JSON line per prompt")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--session", type=int, help="store in this session (default: the model's CLI session)")
    e.add_argument("--name", help="the prompt set's name in the session (default: the file's name)")
    e.add_argument("--system", help="a system prompt in front of every prompt (kept as the session's)")
    e.add_argument("--limit", type=int, help="the first N prompts")
    e.add_argument("--model", default=None, help="model source (default: embedded)")
    e.add_argument("--positions", choices=POSITIONS, default="all", help="steer every position, or only generated tokens")
    e.add_argument("--max-new-tokens", type=int, default=128)
    e.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    e.add_argument("--top-p", type=float, default=1.0)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("sessions", parents=[STORE], help="list the sessions in the database, with their comparisons and ratings")
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(func=cmd_sessions)

    q = sub.add_parser("ratings", parents=[STORE],
                       help="what the ratings add up to: wins, ties, losses, win rates and Bradley-Terry strengths with "
                            "95%% intervals per source, blind and unblind apart; CSV, TRL and a plot")
    q.add_argument("--session", type=int, help="one session (default: all)")
    q.add_argument("--prompt-set", help="only comparisons from this prompt set")
    q.add_argument("--since", help="only ratings from this date (YYYY-MM-DD, UTC)")
    q.add_argument("--until", help="only ratings up to this date")
    q.add_argument("--json-out", help="the numbers as JSON")
    q.add_argument("--csv", help="one row per rated column, as CSV")
    q.add_argument("--plot", help="a bar chart of the win rates with intervals (PNG)")
    q.add_argument("--trl", help="the session's preference pairs as TRL JSONL (needs --session)")
    q.add_argument("--exclude-truncated", action="store_true",
                   help="with --trl: leave out pairs where a reply was cut off (by the token limit or Stop)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_ratings)
