"""Turning a file path or a stored direction's name into a direction of the right kind, checked against the
loaded model, and a set of references into a mixer. It sits above the kinds (``steering``, ``weight_delta``),
which know nothing of each other."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from engine.directions import Direction, DirectionError, check_model, read_direction_file
from engine.mixer import Mixer
from engine.steering import SteeringVector
from engine.weight_delta import LEGACY_KINDS, WeightDelta

KINDS: dict[str, type[Direction]] = {SteeringVector.kind: SteeringVector, WeightDelta.kind: WeightDelta,
                                     **{k: WeightDelta for k in LEGACY_KINDS}}


def resolve_direction_path(ref: str | Path, store=None) -> Path:
    """A direction reference is a file path or the name of a stored direction."""
    path = Path(ref).expanduser()
    if not path.is_file() and store is not None:
        row = store.find_direction(str(ref))
        if row is not None:
            path = Path(row.path)
            if not path.is_file():
                raise DirectionError(f"The stored direction {ref!r} points to {path}, which no longer exists. "
                                     "Rebuild it, or register the file again.")
    if not path.is_file():
        raise DirectionError(f"No direction file or stored direction named {str(ref)!r}. "
                             "Give a .safetensors path, or list stored directions with `tsdpo directions`.")
    return path.resolve()


def open_direction(path: str | Path) -> Direction:
    """The direction stored in a file, read once and not yet checked against any model."""
    path = Path(path)
    kind, tensors, meta = read_direction_file(path)
    if kind not in KINDS:
        raise DirectionError(f"{path} holds a {kind!r} direction, which this version cannot load.")
    direction = KINDS[kind].from_file(kind, tensors, meta, path)
    direction.meta["_path"] = str(path.resolve())
    return direction


def load_direction(ref: str | Path, lm, store=None) -> Direction:
    """A direction from a file path or from its name in the store, checked against the loaded model."""
    path = resolve_direction_path(ref, store)
    direction = open_direction(path)
    check_model(direction.model, lm, path)
    direction.check_weights(lm, path)
    return direction


def mixer_for(lm, refs, store=None, positions: str = "all", preferred: Optional[dict[str, str]] = None):
    """A mixer holding each referenced direction once (a file or a stored name), and the name each reference is
    mixed under: two references to one file share a name; two files with the same direction name get the file's
    stem added to the second. ``preferred`` names some references (a session's own names for its directions)."""
    mixer = Mixer(lm, positions=positions)
    names: dict[str, str] = {}  # reference as typed -> name in the mixer (one per file)
    by_path: dict[Path, str] = {}
    for ref in dict.fromkeys(refs):
        path = resolve_direction_path(ref, store)
        if path not in by_path:
            direction = load_direction(path, lm)
            name = (preferred or {}).get(ref) or direction.name
            taken = name in mixer.directions
            by_path[path] = mixer.add(direction, name=f"{name} ({path.stem})" if taken else name)
        names[ref] = by_path[path]
    return mixer, names
