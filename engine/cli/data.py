"""`tsdpo data inspect`: what a preference-data file holds, and which rows gave no pair."""

from __future__ import annotations

import json

from engine.data import FORMATS


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


def add_parsers(sub) -> None:
    data = sub.add_parser("data", help="read preference data").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("inspect", help="count pairs, show length statistics and malformed rows")
    p.add_argument("file", help="a .jsonl/.json/.csv/.tsv/.parquet file, a folder, or a `datasets` name")
    p.add_argument("--format", choices=FORMATS, help="default: detected from the columns")
    p.add_argument("--objective", help="objective name; verbosity/conciseness build pairs from response length")
    p.add_argument("--attribute", help="HelpSteer attribute to make pairs from")
    p.add_argument("--limit", type=int, help="use the first N pairs")
    p.add_argument("--split", default="train", help="dataset split, for `datasets` names")
    p.add_argument("--show", type=int, default=10, help="how many problem rows to list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_inspect)
