"""What every `tsdpo` command shares: the option groups (argparse parents), reading numbers, lists and texts
from the command line with errors that name the option, opening the model and the database, and progress
on stderr."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Optional

from engine.data import FORMATS as DATA_FORMATS
from engine.errors import TsdpoError
from engine.progress import Progress

EXIT_USER_ERROR = 2
MAX_SANE_WEIGHT = 100.0  # beyond this a weight is almost surely a typo; --force accepts it


# --------------------------------------------------------------------------------------------- option groups

def _group(build) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    build(p)
    return p


def _model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run custom model code from the model's repository (only for sources you trust)")


def _source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="model source (default: embedded)")


def _store_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-store", action="store_true", help="do not use the database")
    p.add_argument("--db", help="database path")


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="a .jsonl/.json/.csv/.tsv/.parquet file, a folder, or a `datasets` name")
    p.add_argument("--format", choices=DATA_FORMATS, help="default: detected")
    p.add_argument("--objective", help="objective name; verbosity/conciseness build pairs from response length")
    p.add_argument("--attribute", help="HelpSteer attribute to make pairs from")
    p.add_argument("--limit", type=int, help="use the first N pairs")
    selection_options(p)


def selection_options(p: argparse.ArgumentParser) -> None:
    """--min-score-gap / --length-matched / --length-balanced: which pairs stay, so that near-ties do not dilute the
    labels and a direction is not a length direction in disguise (`load_pairs`)."""
    p.add_argument("--min-score-gap", type=float, metavar="GAP",
                   help="keep only pairs whose chosen reply was rated at least GAP above the rejected one (rated data: "
                        "UltraFeedback, HelpSteer); applies before the length options")
    p.add_argument("--length-matched", type=float, metavar="RATIO",
                   help="keep only pairs whose two responses are within this length ratio (1.2: 20%%), so the "
                        "direction is not a length direction in disguise")
    p.add_argument("--length-balanced", type=float, metavar="RATIO",
                   help="of the pairs within this length ratio, keep as many with the longer reply preferred as with "
                        "the shorter, matched by how much longer: length says nothing about the label, and more "
                        "pairs stay than with --length-matched")


def selection(args) -> dict:
    """The `load_pairs` keywords of `selection_options`."""
    return {"min_score_gap": args.min_score_gap, "length_matched": args.length_matched,
            "length_balanced": args.length_balanced}


def _force_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true", help=f"accept weights beyond +-{MAX_SANE_WEIGHT:g}")


MODEL = _group(_model_options)  # how to load: device, dtype, remote code
SOURCE = _group(_source_options)  # which model
STORE = _group(_store_options)  # the database
DATA = _group(_data_options)  # one preference-data source
FORCE = _group(_force_option)
MODEL_AND_STORE = [SOURCE, STORE, MODEL]


# --------------------------------------------------------------------------------------------- values

def number(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TsdpoError(f"{what}: {text!r} is not a number.") from None
    if not math.isfinite(value):
        raise TsdpoError(f"{what}: {text!r} is not a finite number; weights must be finite.")
    return value


def int_list(text: Optional[str], option: str) -> Optional[list[int]]:
    """'3,5,7' -> [3, 5, 7], or a clear error naming the option."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise TsdpoError(f"{option} takes whole numbers separated by commas (e.g. 10,12), not {text!r}.") from None


def float_list(text: str, option: str) -> list[float]:
    values = [number(x.strip(), option) for x in text.split(",") if x.strip()]
    if not values:
        raise TsdpoError(f"{option} takes numbers separated by commas (e.g. -1,0,1), not {text!r}.")
    return values


def check_weights(weights, force: bool, option: str) -> None:
    """Weights beyond a sane range are almost always a typo (1e3 for 1e-3): they need --force."""
    big = [w for w in weights if abs(w) > MAX_SANE_WEIGHT]
    if big and not force:
        raise TsdpoError(f"{option}: weight {big[0]:g} is beyond +-{MAX_SANE_WEIGHT:g}, far outside where a direction "
                         "means anything. Pass --force if you mean it.")


def text_arg(value: str, option: str) -> str:
    """A prompt from the command line: valid UTF-8 and not empty."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise TsdpoError(f"{option} is not valid UTF-8 text; check the terminal's or the file's encoding.") from None
    if not value.strip():
        raise TsdpoError(f"{option} is empty; type what the model should answer.")
    return value


def parse_mix(text: str, force: bool = False) -> dict[str, float]:
    """'a.safetensors=0.5,verbosity=-1' -> {'a.safetensors': 0.5, 'verbosity': -1.0}"""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        ref, sep, w = part.rpartition("=")
        if not sep or not ref:
            raise TsdpoError(f"--mix takes DIRECTION=WEIGHT[,DIRECTION=WEIGHT...]; {part!r} has no '=WEIGHT'.")
        out[ref] = number(w, f"--mix: the weight of {ref!r}")
    check_weights(out.values(), force, "--mix")
    return out


def parse_point(text: str, option: str = "--point", names: str = "X,Y") -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise TsdpoError(f"{option} takes {names} (two numbers), not {text!r}.") from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise TsdpoError(f"{option} takes {names} as finite numbers, not {text!r}.")
    return x, y


def read_prompts(path: str, limit: Optional[int] = None) -> list[str]:
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


def new_output(path: str, overwrite: bool):
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise TsdpoError(f"{out} already exists; choose another --out or pass --overwrite.")
    if out.parent and not out.parent.exists():
        out.parent.mkdir(parents=True)
    return out


# --------------------------------------------------------------------------------------------- model, database

def load(args, source):
    from engine.models import load_model

    with PhaseBars() as progress:
        return load_model(source, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                          progress=progress)


def open_store(args):
    from engine.store import Store

    return Store(args.db) if getattr(args, "db", None) else Store()


def register(store, direction, out, lm, meta: dict) -> None:
    """Put a saved direction in the database; if that fails the file stays, with how to register it later."""
    from engine.directions import file_sha256

    try:
        store.add_direction(name=direction.name, kind=direction.label, objective=direction.objective,
                            path=str(out.resolve()), sha256=file_sha256(out), model_fingerprint=lm.fingerprint, meta=meta)
    except TsdpoError as exc:
        raise TsdpoError(f"the direction is saved in {out}, but not registered in the database: {exc} Once the "
                         f"database is free, register it with `tsdpo directions add {out}`.") from exc


def cli_session(store, lm) -> int:
    """Generations from the command line go to one session per model, named after it."""
    name = f"cli: {lm.name}"
    for s in store.sessions(limit=200):
        if s.name == name and s.model_fingerprint == lm.fingerprint:
            return s.id
    return store.create_session(name, lm.source.to_json(), lm.fingerprint).id


def load_mix(lm, refs, store, positions: str = "all", preferred: Optional[dict[str, str]] = None):
    """The engine's mixer for these references (files or stored names), warning on stderr about directions
    whose effects overlap."""
    from engine.loading import mixer_for

    mixer, names = mixer_for(lm, refs, store, positions, preferred)
    for a, b, cos in mixer.interference():
        print(f"note: {a} and {b} point nearly the same way (cosine {cos:+.2f}); their effects will overlap.", file=sys.stderr)
    return mixer, names


# --------------------------------------------------------------------------------------------- progress

def progress_bar(total: int, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=False)


class PhaseBars:
    """The engine's progress on stderr: a bar per phase of a job (tokenizing, forward passes, ranking layers,
    training, saving, ...), and a line for each stage with nothing to count (loading, writing files)."""

    def __init__(self):
        self.bar, self.phase = None, None

    def __enter__(self):
        return self

    def __call__(self, p: Progress) -> None:
        if p.total == 0:
            self._close()
            print(f"  {p.phase}", file=sys.stderr, flush=True)
            return
        if p.phase != self.phase:
            self._close()
            self.bar, self.phase = progress_bar(p.total, p.phase, "it"), p.phase
        self.bar.total = p.total
        self.bar.n = p.done
        post = {k: (f"{v:.4f}" if isinstance(v, float) else str(v)[:40]) for k, v in p.metrics.items()
                if k in ("loss", "rewards/accuracies", "rewards/margins", "point")}
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.refresh()

    def _close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar, self.phase = None, None

    def __exit__(self, *exc):
        self._close()
        return False


report = PhaseBars()  # for stages outside a ``with`` block: lines only, or a bar closed by the next line
