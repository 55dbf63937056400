"""Building directions: `tsdpo steer extract` (a steering vector, no training), `tsdpo train` (a TS-DPO weight
delta), `tsdpo train-scalarized` (the scalarized-DPO baseline), and `tsdpo directions` (the stored ones)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from engine.cli.common import (DATA, MODEL_AND_STORE, PhaseBars, float_list, int_list, load,
                               new_output, open_store, register, selection, selection_options)
from engine.data import FORMATS
from engine.dpo import LOSSES
from engine.errors import TsdpoError
from engine.progress import Progress
from engine.steering import ACTIVATION_DTYPES, AGGREGATES, ESTIMATORS
from engine.weight_delta import PARAMS


def cmd_steer_extract(args) -> int:
    from engine.data import load_pairs
    from engine.steering import extract

    layers = int_list(args.layers, "--layers")
    pairs = load_pairs(args.data, format=args.format, objective=args.objective, limit=args.limit,
                       attribute=args.attribute, **selection(args))
    print(f"  {len(pairs)} {pairs.objective} pairs from {pairs.source} ({pairs.format})", file=sys.stderr)
    out = new_output(args.out, args.overwrite)
    store = None if args.no_store else open_store(args)  # a database that cannot open says so before minutes of work
    lm = load(args, args.model)
    with PhaseBars() as progress:
        sv = extract(lm, pairs, aggregate=args.aggregate, batch_size=args.batch_size, val_fraction=args.val_fraction,
                     seed=args.seed, layers=layers, strength=args.strength,
                     max_response_tokens=args.max_response_tokens, progress=progress, name=args.name,
                     estimator=args.estimator, band=args.band, activation_dtype=args.activation_dtype)
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
    print(f"activations   read in {sv.meta['method']['activation_dtype']}")
    print(f"saved         {out} ({sv.meta['seconds']:.1f} s)", flush=True)
    if store is not None:
        register(store, sv, out, lm, meta={"layers": sv.layers, "strength": sv.strength, "pairs": len(pairs)})
        print(f"stored as     {sv.name!r} (use --mix {sv.name}=W)")
    return 0


def train_config(args, method: str):
    from engine.train import TrainConfig

    return TrainConfig(method=method, param=args.param, rank=args.rank, steps=args.steps, batch_size=args.batch_size,
                       grad_accum=args.grad_accum, lr=args.lr, beta=args.beta, loss=args.loss, seed=args.seed,
                       layers=int_list(args.layers, "--layers"),
                       modules=args.modules.split(",") if args.modules else None,
                       max_prompt_tokens=args.max_prompt_tokens, max_response_tokens=args.max_response_tokens,
                       val_fraction=args.val_fraction, checkpoint_every=args.checkpoint_every, optimizer=args.optimizer)


def run_training(args, data, cfg, kind: str, objective: Optional[str] = None, keep=None) -> int:
    import os

    from engine.train import train_direction, train_with_lr_search

    main_process = int(os.environ.get("RANK", "0")) == 0
    out = new_output(args.out, args.overwrite) if main_process else None
    store = None if args.no_store or not main_process else open_store(args)
    lm = load(args, args.model)
    if main_process:  # what the direction will change on this model, and what it leaves out (never silently)
        from engine.tangent import coverage, describe_coverage

        for line in describe_coverage(coverage(lm, cfg.layers, cfg.modules)):
            print(f"  {line}", file=sys.stderr)
    grid = float_list(args.lr_grid, "--lr-grid") if getattr(args, "lr_grid", None) else None
    with PhaseBars() as progress:
        if grid:
            result = train_with_lr_search(lm, data, cfg, grid, progress=progress if main_process else None,
                                          checkpoint_dir=args.checkpoint_dir, objective=objective, keep=keep)
        else:
            result = train_direction(lm, data, cfg, progress=progress if main_process else None,
                                     checkpoint_dir=args.checkpoint_dir, objective=objective, keep=keep)
    if not main_process:
        return 0
    d = result.direction
    d.save(out)
    last, val = result.history[-1], result.val_metrics
    print(f"{kind} direction {d.name!r} ({cfg.param}, {len(d.weight_names())} weight matrices) saved to {out}")
    line = (f"final: step {last['step']} loss {last['loss']:.4f} accuracy {last['rewards/accuracies']:.3f} "
            f"margin {last['rewards/margins']:.4f}")
    if val:
        line += (f" | held-out: accuracy {val['rewards/accuracies']:.3f} margin {val['rewards/margins']:.4f} "
                 f"loss {val['loss']:.4f}")
    print(line, flush=True)
    kept = d.meta.get("kept_unchanged")
    if kept:
        print(f"kept unchanged: {kept['objective']} pairs from {kept['source']}: the margins of their {kept['pairs']} "
              f"training pairs (a basis of {kept['basis']} gradients); share of the direction in their span "
              f"{kept['share_in_span']:.2e}")
    search = d.meta.get("lr_search")
    if search:
        for run in search["runs"]:
            mark = "  <- kept" if run["lr"] == search["chosen"] else ""
            print(f"  lr {run['lr']:<10g} held-out loss {run['val_loss']:.4f}  accuracy {run['val_accuracy']:.3f}  "
                  f"margin {run['val_margin']:.4f}{mark}")
    if store is not None:
        register(store, d, out, lm, meta={"param": cfg.param, "steps": cfg.steps, "validation": val})
        print(f"stored as {d.name!r} (use --mix {d.name}=W)")
    return 0


def cmd_train(args) -> int:
    from engine.data import load_pairs

    pairs = load_pairs(args.data, format=args.format, objective=args.objective, limit=args.limit, attribute=args.attribute,
                       **selection(args))
    print(f"  {len(pairs)} {pairs.objective} pairs from {pairs.source} ({pairs.format})", file=sys.stderr)
    keep = None
    if args.keep_unchanged:
        objective, sep, path = args.keep_unchanged.partition("=")
        if not sep or not objective or not path:
            raise TsdpoError(f"--keep-unchanged takes OBJECTIVE=FILE (e.g. verbosity=pairs.jsonl), not "
                             f"{args.keep_unchanged!r}.")
        from engine.keep import require_lowrank

        require_lowrank(args.param)  # before the model loads
        keep = load_pairs(path, objective=objective)
        print(f"  keeping the margins of {len(keep)} {keep.objective} pairs from {keep.source} unchanged (their "
              f"training split at --val-fraction {args.val_fraction:g})", file=sys.stderr)
    return run_training(args, pairs, train_config(args, "tangent"), "tangent", args.name, keep=keep)


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
        ps = load_pairs(path, format=args.format, objective=objective, limit=args.limit, **selection(args))
        sources.append((ps, w))
        print(f"  {len(ps)} {ps.objective} pairs from {path}, share {w:g}", file=sys.stderr)
    name = args.name or f"scalarized {sources[0][0].objective}={args.weight:g}"
    return run_training(args, sources, train_config(args, "scalarized"), "scalarized", name)


def cmd_directions(args) -> int:
    store = open_store(args)
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

    from engine.directions import file_sha256
    from engine.loading import open_direction

    path = Path(args.file).expanduser().resolve()
    d = open_direction(path)
    if args.name:
        d.name = args.name
    store = open_store(args)
    store.add_direction(name=d.name, kind=d.label, objective=d.objective, path=str(path), sha256=file_sha256(path),
                        model_fingerprint=d.model.get("fingerprint"), meta={"registered_from": "tsdpo directions add"})
    print(f"stored {d.name!r} ({d.label}, {d.objective}, for model {d.model.get('model_name', '?')}) from {path}")
    return 0


def _training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the .safetensors direction file to write")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--name", help="name to store it under")
    p.add_argument("--param", choices=PARAMS, default="lowrank")
    p.add_argument("--rank", type=int, default=8, help="rank of the low-rank B A0 factorization")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step, over all processes")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="adamw (default), or sgd: plain gradient steps; one step over every training pair "
                        "(--steps 1 --batch-size N) is the first-order direction `tsdpo data signal` measures")
    p.add_argument("--lr", type=float, default=0.0, help="default: 2e-3 low-rank, 1e-4 full")
    p.add_argument("--lr-grid", metavar="LR,LR,...",
                   help="train once per learning rate and keep the direction with the lowest held-out DPO loss "
                        "(every run's metrics are kept in the file); replaces --lr. With --optimizer sgd --steps 1 "
                        "it trains once: one plain step is the rate times the same vector, so each rate is scored on "
                        "its multiple")
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--loss", choices=LOSSES, default="sigmoid")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layers", help="decoder layers to train (comma-separated; default all)")
    p.add_argument("--modules", help="only weights whose names contain one of these (comma-separated), e.g. mlp")
    p.add_argument("--max-prompt-tokens", type=int, default=128)
    p.add_argument("--max-response-tokens", type=int, default=128)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--checkpoint-dir", help="save checkpoints here, and resume from one found here")
    p.add_argument("--checkpoint-every", type=int, default=0)


def add_parsers(sub) -> None:
    training = argparse.ArgumentParser(add_help=False)
    _training_options(training)

    steer = sub.add_parser("steer", help="steering vectors (training-free)").add_subparsers(dest="steer_command", required=True, metavar="ACTION")
    p = steer.add_parser("extract", parents=[DATA, *MODEL_AND_STORE], help="build a steering vector from preference pairs")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--name", help="name to store it under (default: the objective)")
    p.add_argument("--layers", help="steer these layers (comma-separated) instead of the best-scoring one")
    p.add_argument("--strength", type=float, default=None, help="weight 1.0 adds this fraction of the layer's typical norm")
    p.add_argument("--aggregate", choices=AGGREGATES, default="mean", help="over response tokens")
    p.add_argument("--estimator", choices=ESTIMATORS, default="mean-difference",
                   help="per layer: difference of the means, or the first principal component of the paired differences")
    p.add_argument("--band", type=int, default=1,
                   help="steer this many contiguous layers around the best one, the strength split across them")
    p.add_argument("--batch-size", type=int, default=8, help="pairs whose prompts share a forward pass")
    p.add_argument("--activation-dtype", choices=ACTIVATION_DTYPES, default="auto",
                   help="auto: a bfloat16 copy of a float32 model for the activation pass on a CPU with bfloat16 "
                        "matrix units (about 2x faster), else the model's own; model: always the model's own")
    p.add_argument("--val-fraction", type=float, default=0.2, help="pairs held out to score layers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-response-tokens", type=int, default=None)
    p.set_defaults(func=cmd_steer_extract)

    p = sub.add_parser("train", parents=[DATA, training, *MODEL_AND_STORE],
                       help="train a TS-DPO direction (a weight delta) for one objective")
    p.add_argument("--keep-unchanged", metavar="OBJECTIVE=FILE",
                   help="leave another objective's margins unchanged, to first order: the direction is trained "
                        "orthogonal to the margin gradients of that file's training split (split as --val-fraction "
                        "and --seed say, so its held-out pairs stay unseen); low-rank only")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("train-scalarized", parents=[training, *MODEL_AND_STORE],
                       help="train the scalarized-DPO baseline on a weighted mixture of two objectives")
    p.add_argument("--data", action="append", default=[], required=True, metavar="OBJECTIVE=FILE")
    p.add_argument("--weight", type=float, required=True, help="share of the first objective's pairs (0..1)")
    p.add_argument("--format", choices=FORMATS)
    p.add_argument("--limit", type=int)
    selection_options(p)
    p.set_defaults(func=cmd_train_scalarized)

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
