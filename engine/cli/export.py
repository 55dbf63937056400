"""`tsdpo export`: a mix (given as weights, or a stored session's plane at a point) written as a Hugging Face
checkpoint, a PEFT LoRA adapter or llama.cpp control vectors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from engine.cli.common import (FORCE, MODEL, STORE, check_weights, load, load_mix, open_store, parse_mix, parse_point,
                               report)
from engine.errors import TsdpoError
from engine.export import DTYPES, FORMATS


def cmd_export(args) -> int:
    from engine.export import check_target, clean_stale, export_mix
    from engine.plane import PreferencePlane

    if args.clean:
        done = clean_stale(Path(args.out).expanduser().resolve())
        print("\n".join(done) if done else f"nothing to clean beside {args.out}")
        return 0
    if bool(args.mix) == bool(args.session):
        raise TsdpoError("Give either --mix DIRECTION=W[,...] or --session ID (with --point X,Y), not both or neither.")
    check_target(Path(args.out).expanduser().resolve(), args.overwrite)  # before minutes of loading
    store = open_store(args) if (args.session or not args.no_store) else None
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
        lm = load(args, source)
        if row.model_fingerprint and lm.fingerprint != row.model_fingerprint:
            raise TsdpoError(f"Session {row.id} was made with another model (fingerprint {row.model_fingerprint}) than "
                             f"{lm.name} ({lm.fingerprint}). Pass the session's model with --model.")
        mixer, names = load_mix(lm, [d["path"] for d in saved], None)
        renamed = {d["name"]: names[d["path"]] for d in saved}
        plane_obj = PreferencePlane.from_json(settings.get("plane", {}))
        point = parse_point(args.point) if args.point else tuple(settings.get("point", (0.0, 0.0)))
        weights = {renamed.get(k, k): w for k, w in plane_obj.weights(*point).items()}
        check_weights(weights.values(), args.force, f"session {row.id}'s plane")
        plane = plane_obj.to_json()
        print(f"  session {row.id} ({row.name}) at point ({point[0]:+.3f}, {point[1]:+.3f})", file=sys.stderr)
    else:
        if args.point:
            raise TsdpoError("--point goes with --session (a stored plane); with --mix, give the weights directly.")
        mix = parse_mix(args.mix, args.force)
        lm = load(args, args.model)
        mixer, names = load_mix(lm, list(mix), store)
        weights = {names[r]: w for r, w in mix.items()}
    print("  mix: " + (", ".join(f"{n} {w:+g}" for n, w in weights.items() if w) or "none (the base model)"), file=sys.stderr)
    result = export_mix(lm, mixer, weights, args.out, format=args.format, overwrite=args.overwrite,
                        bake_steering=args.bake_steering, dtype=args.out_dtype, max_shard_size=args.max_shard_size,
                        verify=not args.no_verify, point=point, plane=plane, progress=report)
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


def add_parsers(sub) -> None:
    p = sub.add_parser("export", parents=[STORE, FORCE, MODEL],
                       help="write a mix as a Hugging Face checkpoint, a PEFT LoRA adapter or llama.cpp control vectors")
    p.add_argument("--mix", metavar="DIRECTION=W[,DIRECTION=W...]", help="directions (files or stored names) and weights")
    p.add_argument("--session", type=int, metavar="ID", help="export the mix of a stored session's plane instead")
    p.add_argument("--point", metavar="X,Y", help="with --session: the point on the plane (default: the session's saved point)")
    p.add_argument("--out", required=True, help="a new folder (an existing non-empty one needs --overwrite)")
    p.add_argument("--format", choices=FORMATS, default="hf",
                   help="hf: merged checkpoint; peft: LoRA adapter from low-rank directions; controlvector: llama.cpp GGUF")
    p.add_argument("--overwrite", action="store_true", help="replace an existing export (only once the new one is complete)")
    p.add_argument("--bake-steering", action="store_true",
                   help="hf: put steering vectors into the checkpoint as an MLP bias (Llama-style models)")
    p.add_argument("--out-dtype", choices=DTYPES, help="hf: dtype of the saved weights (default: as loaded)")
    p.add_argument("--max-shard-size", default="2GB", help="hf: split the weights into files of at most this size")
    p.add_argument("--no-verify", action="store_true", help="skip reading the export back and comparing it")
    p.add_argument("--clean", action="store_true",
                   help="only tidy up after an interrupted export to --out (stale temporary folders, a hidden old export)")
    p.add_argument("--model", default=None, help="model source (default: embedded, or the session's model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_export)
