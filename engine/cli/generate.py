"""`tsdpo generate` (columns side by side, saved to the session database) and `tsdpo lengths` (reply length
at several weights of one direction)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.cli.common import (FORCE, MODEL, MODEL_AND_STORE, STORE, check_weights, cli_session, float_list, int_list,
                               load, load_mix, open_store, parse_mix, PhaseBars, progress_bar, read_prompts,
                               text_arg)
from engine.errors import TsdpoError
from engine.paths import atomic_write_text
from engine.mixer import POSITIONS


def side_by_side(columns: list[tuple[str, str, str]], width: int) -> str:
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

    prompt = text_arg(args.prompt, "--prompt")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed).validate()
    mixes = [parse_mix(m, args.force) for m in args.mix]
    if len(mixes) + len(args.compare) > 4:
        raise TsdpoError("At most 4 columns: count the --mix and --compare options.")
    for c in args.compare:
        if c != "base":
            raise TsdpoError(f"--compare takes 'base' (add more mixes with another --mix), not {c!r}.")
    lm = load(args, args.model)
    store = None if args.no_store else open_store(args)
    mixer, names = load_mix(lm, [r for m in mixes for r in m], store, args.positions)
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
            session_id = cli_session(store, lm)
        except TsdpoError as exc:  # generate anyway: the replies are shown, and the reason they are not saved
            not_saved = str(exc)
    bar = progress_bar(params.max_new_tokens * len(columns), "generating", "tok")

    def on_text(i: int, piece: str) -> None:
        bar.update(1)

    try:
        comp = compare(lm, prompt, columns, params, mixer=mixer, on_text=on_text, store=store,
                       session_id=session_id, batched=False if args.sequential else None)
    finally:
        bar.close()
    width = shutil.get_terminal_size((120, 40)).columns
    print(side_by_side([(cr.column.label, cr.result.text,
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


def cmd_lengths(args) -> int:
    from engine.loading import load_direction
    from engine.evaluate import is_monotonic, response_lengths, summarize_lengths
    from engine.generation import SamplingParams
    from engine.mixer import Mixer

    weights = float_list(args.weights, "--weights")
    check_weights(weights, args.force, "--weights")
    prompts = read_prompts(args.prompts, args.limit)
    lm = load(args, args.model)
    mixer = Mixer(lm, positions=args.positions)
    store = None if args.no_store else open_store(args)
    direction = load_direction(args.direction, lm, store)
    if (args.layers or args.strength is not None) and direction.kind == "steering":
        direction = direction.with_settings(int_list(args.layers, "--layers"), args.strength)
    name = mixer.add(direction)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty).validate()
    texts: dict[float, list[str]] = {}
    with PhaseBars() as progress:
        lengths = response_lengths(mixer, name, weights, prompts, params, progress=progress, texts=texts)
    rows = summarize_lengths(lengths, params.max_new_tokens, texts)
    print(f"{'weight':>8} {'mean tokens':>12} {'median':>8} {'at limit':>9} {'distinct-2':>11}")
    for r in rows:
        print(f"{r['weight']:>8g} {r['mean_tokens']:>12.1f} {r['median_tokens']:>8g} {r['at_limit']:>9} {r['distinct2']:>11.3f}")
    means = [r["mean_tokens"] for r in rows]
    lo, hi = min(rows, key=lambda r: r["weight"]), max(rows, key=lambda r: r["weight"])
    if lo is not hi and lo["mean_tokens"] > 0:
        print(f"weight {hi['weight']:g} vs {lo['weight']:g}: {hi['mean_tokens'] / lo['mean_tokens']:.2f}x the tokens")
    if args.json_out:
        atomic_write_text(Path(args.json_out), json.dumps({"rows": rows, "lengths": {str(w): v for w, v in lengths.items()},
                                                           "texts": {str(w): v for w, v in texts.items()},
                                                           "direction": direction.describe(), "prompts": prompts,
                                                           "max_new_tokens": params.max_new_tokens,
                                                           "repetition_penalty": params.repetition_penalty}, indent=1))
    how = ", ".join(f"{k} {v}" for k, v in direction.describe().items() if k in ("layers", "strength", "param"))
    greedy = "greedy" if params.repetition_penalty == 1 else f"greedy, repetition penalty {params.repetition_penalty:g}"
    print(f"monotonic increasing: {is_monotonic(means)}  ({len(prompts)} prompts, {greedy}, {direction.label}, {how})")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("generate", parents=[STORE, FORCE, MODEL],
                       help="generate with a mix of directions, side by side with the base model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--mix", action="append", default=[], metavar="DIRECTION=W[,DIRECTION=W...]",
                   help="a column mixing directions (a file or a stored name) with weights; repeat for more columns")
    p.add_argument("--compare", action="append", default=[], metavar="base", help="add a base-model column")
    p.add_argument("--positions", choices=POSITIONS, default="all", help="steer every position, or only generated tokens")
    p.add_argument("--sequential", action="store_true", help="run columns one after another instead of as one batch")
    p.add_argument("--model", default=None, help="model source (default: embedded)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("lengths", parents=[*MODEL_AND_STORE, FORCE],
                       help="mean response length at several weights of one direction (a length check)")
    p.add_argument("--direction", required=True, help="a direction file or stored name (steering or weight delta)")
    p.add_argument("--prompts", required=True, help=".jsonl with a prompt field, or .txt with one prompt per line")
    p.add_argument("--weights", default="-1,-0.5,0,0.5,1")
    p.add_argument("--limit", type=int)
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--layers", help="steering only: override the steered layers")
    p.add_argument("--strength", type=float, help="steering only: override the strength")
    p.add_argument("--json-out", help="also write the rows, every reply's length and text to this JSON file")
    p.add_argument("--positions", choices=POSITIONS, default="all")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="above 1, tokens already in the prompt or reply become less likely (still greedy); for a model "
                        "whose greedy replies loop to the cap, which hides any length effect")
    p.set_defaults(func=cmd_lengths)
