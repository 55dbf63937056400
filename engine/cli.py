"""`tsdpo`: every engine capability without a display. Errors end in one clear line and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
from typing import Optional, Sequence

from engine.errors import TsdpoError

EXIT_USER_ERROR = 2


def _progress(message: str, fraction: Optional[float] = None) -> None:
    print(f"  {message}", file=sys.stderr, flush=True)


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run custom model code from the model's repository (only for sources you trust)")


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


def cmd_generate(args) -> int:
    from engine.generation import SamplingParams, generate

    lm = _load(args, args.model)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            repetition_penalty=args.repetition_penalty, seed=args.seed)
    result = generate(lm, args.prompt, params, on_text=lambda t: print(t, end="", flush=True))
    print()
    print(f"[{result.n_tokens} tokens, {result.seconds:.1f} s, {result.tokens_per_s:.1f} tokens/s]", file=sys.stderr)
    return 0


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

    p = sub.add_parser("generate", help="generate a reply from the base model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--model", default=None, help="model source (default: embedded)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    _model_args(p)
    p.set_defaults(func=cmd_generate)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
