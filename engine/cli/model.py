"""`tsdpo info` and `tsdpo model load`: what is installed, and what a model is."""

from __future__ import annotations

import json
import platform
import textwrap

from engine.cli.common import MODEL, load
from engine.errors import TsdpoError


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
    from engine.tangent import coverage, describe_coverage

    lm = load(args, args.source)
    info = lm.describe()
    try:
        report = coverage(lm)
    except TsdpoError as exc:  # e.g. no decoder blocks it can find: said, not a crash
        report = {"error": str(exc)}
    if args.json:
        print(json.dumps({**info, "direction_coverage": report}, indent=2))
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
    print()
    if "error" in report:
        print(f"directions    {report['error']}")
        return 0
    for line in describe_coverage(report):
        print(textwrap.fill(line, width=110, subsequent_indent="  "))
    print(textwrap.fill("Steering vectors act on every decoder block's output (all "
                        f"{info['layers']} blocks).", width=110, subsequent_indent="  "))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("info", help="versions, device, and where the cache and database live")
    p.add_argument("--db", help="database path (default: in the user data folder, or TSDPO_DB)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    model = sub.add_parser("model", help="load and describe models").add_subparsers(dest="model_command", required=True, metavar="ACTION")
    p = model.add_parser("load", parents=[MODEL], help="load a model and print its architecture, size and fingerprint")
    p.add_argument("source", nargs="?", default=None,
                   help="a Hugging Face folder, a hub id, or a .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model_load)
