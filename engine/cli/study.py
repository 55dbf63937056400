"""`tsdpo sessions` and `tsdpo ratings`: what was rated and what it adds up to, without a display."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.cli.common import STORE, open_store
from engine.errors import TsdpoError


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


def add_parsers(sub) -> None:
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
