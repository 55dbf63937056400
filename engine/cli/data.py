"""`tsdpo data inspect`: what a preference-data file holds, and which rows gave no pair; `tsdpo data select`: the
rows behind the pairs a selection keeps (--min-score-gap, --length-matched, --length-balanced), written as JSON lines in their
original order and form, so a subset ships as a file any tool reads; `tsdpo data signal`: whether the pairs carry a
preference this model can learn, before training on them (`engine.signal`)."""

from __future__ import annotations

import json
import sys

from engine.cli.common import MODEL, SOURCE, PhaseBars, load, selection, selection_options
from engine.data import FORMATS
from engine.errors import TsdpoError


def cmd_data_inspect(args) -> int:
    from engine.data import load_pairs

    ps = load_pairs(args.file, format=args.format, objective=args.objective, limit=args.limit, split=args.split,
                    attribute=args.attribute, **selection(args))
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


def cmd_data_select(args) -> int:
    from engine.cli.common import new_output
    from engine.data import _read_rows, load_pairs
    from engine.paths import atomic_write_text

    if all(v is None for v in selection(args).values()):
        raise TsdpoError("Say what to keep: --min-score-gap GAP, --length-matched RATIO or --length-balanced RATIO.")
    out = new_output(args.out, args.overwrite)
    ps = load_pairs(args.file, format=args.format, limit=args.limit, split=args.split, **selection(args))
    if ps.format == "helpsteer":
        raise TsdpoError("HelpSteer pairs are made from two rows each; select works on formats with a pair per row.")
    keep = {p.line for p in ps.pairs}
    rows, _ = _read_rows(args.file, args.split)
    lines = [json.dumps(row, ensure_ascii=False) for n, row in rows if n in keep]
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    print(f"{len(lines)} rows written to {out}", file=sys.stderr)
    print(f"kept       {ps.source}")
    return 0


def cmd_data_signal(args) -> int:
    from engine.data import load_pairs
    from engine.signal import SignalConfig, data_signal, signal_text, split_for_signal

    ps = load_pairs(args.file, format=args.format, objective=args.objective, limit=args.limit, split=args.split,
                    attribute=args.attribute, **selection(args))
    cfg = SignalConfig(rank=args.rank, seed=args.seed, val_fraction=args.val_fraction, heldout=args.heldout,
                       beta=args.beta, batch_size=args.batch_size, max_prompt_tokens=args.max_prompt_tokens,
                       max_response_tokens=args.max_response_tokens)
    train, val = split_for_signal(ps, cfg)  # before the model loads: a split too small is said at once
    print(f"  {len(ps)} pairs ({ps.objective}) from {ps.source} ({ps.format}): {len(train)} to train on, "
          f"{min(len(val), cfg.heldout)} of {len(val)} held out measured", file=sys.stderr)
    lm = load(args, args.model)
    with PhaseBars() as progress:
        result = data_signal(lm, ps, cfg, progress=progress)
    print(json.dumps(result, indent=2) if args.json else signal_text(result))
    return 0


def _file_options(p, objective: bool = True) -> None:
    """The data file and how to read it; with ``objective``, which preference to make pairs for."""
    p.add_argument("file", help="a .jsonl/.json/.csv/.tsv/.parquet file, a folder, or a `datasets` name")
    p.add_argument("--format", choices=FORMATS, help="default: detected from the columns")
    if objective:
        p.add_argument("--objective", help="objective name; verbosity/conciseness build pairs from response length")
        p.add_argument("--attribute", help="HelpSteer attribute to make pairs from")
    p.add_argument("--limit", type=int, help="use the first N pairs")
    p.add_argument("--split", default="train", help="dataset split, for `datasets` names")


def add_parsers(sub) -> None:
    data = sub.add_parser("data", help="read preference data").add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = data.add_parser("inspect", help="count pairs, show length statistics and malformed rows")
    _file_options(p)
    p.add_argument("--show", type=int, default=10, help="how many problem rows to list")
    p.add_argument("--json", action="store_true")
    selection_options(p)
    p.set_defaults(func=cmd_data_inspect)

    p = data.add_parser("select", help="write the rows behind the pairs a selection keeps (JSON lines, "
                                       "original order and form)")
    _file_options(p, objective=False)
    selection_options(p)
    p.add_argument("--out", required=True, help="the .jsonl file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_data_select)

    p = data.add_parser("signal", parents=[SOURCE, MODEL],
                        help="before training: does a first DPO step on the training pairs move the held-out pairs? "
                             "(per-pair margin gradients at the base model)")
    _file_options(p)
    selection_options(p)
    p.add_argument("--val-fraction", type=float, default=0.35, help="share held out, as in training (default 0.35)")
    p.add_argument("--seed", type=int, default=0, help="the split's and A0's seed, as in training")
    p.add_argument("--heldout", type=int, default=64, help="held-out pairs to measure (default 64)")
    p.add_argument("--rank", type=int, default=8, help="rank of the low-rank factors, as in training")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--max-response-tokens", type=int, default=128)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_data_signal)

