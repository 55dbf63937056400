"""What every direction file shares: safetensors tensors plus JSON metadata, and the rules for refusing one.

A direction records the identity of the model it was made for (fingerprint, name, layer count, hidden
size). Loading it for another model, or loading a file with NaN or inf values, is refused with a message
that says what to do.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import TsdpoError

FORMAT_KEY = "tsdpo.format"
META_KEY = "tsdpo.meta"


class DirectionError(TsdpoError):
    pass


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_direction_file(path: str | Path, kind: str, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    """Write atomically: a crash leaves the old file (or none), never half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: v for k, v in meta.items() if not k.startswith("_")}  # "_path" and the like describe this session only
    save_file(clean, str(tmp), metadata={FORMAT_KEY: kind, META_KEY: json.dumps(meta)})
    os.replace(tmp, path)
    return path


def read_direction_file(path: str | Path) -> tuple[str, dict[str, torch.Tensor], dict]:
    path = Path(path)
    if not path.is_file():
        raise DirectionError(f"No direction file at {path}. Check the path, or list stored directions with `tsdpo directions`.")
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for damaged files
        raise DirectionError(f"{path} is not a readable safetensors direction file ({exc}). It may be damaged; rebuild it.") from exc
    kind = header.get(FORMAT_KEY)
    if kind is None:
        raise DirectionError(f"{path} is a safetensors file but not a tsdpo-studio direction (no {FORMAT_KEY} metadata).")
    try:
        meta = json.loads(header.get(META_KEY, "{}"))
    except ValueError as exc:
        raise DirectionError(f"{path}: its metadata is damaged ({exc}); rebuild the direction.") from exc
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise DirectionError(f"{path}: tensor {name!r} holds {bad} NaN or infinite values; the direction is unusable. Rebuild it.")
    return kind, tensors, meta


def check_model(meta_model: dict, lm, path: Optional[str | Path] = None) -> None:
    """Refuse a direction made for another model, naming both."""
    where = f"{path}: " if path else ""
    theirs = f"{meta_model.get('model_name', '?')} (fingerprint {meta_model.get('fingerprint', '?')}, " \
             f"{meta_model.get('n_layers', '?')} layers, hidden size {meta_model.get('hidden_size', '?')})"
    ours = f"{lm.name} (fingerprint {lm.fingerprint}, {lm.n_layers} layers, hidden size {lm.hidden_size})"
    if meta_model.get("n_layers") != lm.n_layers or meta_model.get("hidden_size") != lm.hidden_size:
        raise DirectionError(f"{where}this direction was made for {theirs}, which has another shape than the loaded "
                             f"model {ours}. Load that model, or rebuild the direction for this one.")
    if meta_model.get("fingerprint") != lm.fingerprint:
        raise DirectionError(f"{where}this direction was made for {theirs}, not for the loaded model {ours}. "
                             "Load that model, or rebuild the direction for this one.")


class DirectionFile:
    """What every direction class shares: loading from its file, checked against a model."""

    @classmethod
    def load(cls, path: str | Path, lm=None):
        kind, tensors, meta = read_direction_file(path)
        direction = cls.from_file(kind, tensors, meta, Path(path))
        direction.meta["_path"] = str(Path(path).resolve())
        if lm is not None:
            check_model(direction.model, lm, path)
            direction.check_weights(lm, path)
        return direction

    def check_weights(self, lm, path) -> None:
        """Directions that change weights check that the model has them, with the right shapes."""


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


def open_direction(path: str | Path):
    """The direction stored in a file, read once and not yet checked against any model."""
    from engine.steering import SteeringVector
    from engine.tangent import TangentDirection

    path = Path(path)
    kind, tensors, meta = read_direction_file(path)
    classes = {"steering": SteeringVector, "tangent": TangentDirection}
    if kind not in classes:
        raise DirectionError(f"{path} holds a {kind!r} direction, which this version cannot load.")
    direction = classes[kind].from_file(kind, tensors, meta, path)
    direction.meta["_path"] = str(path.resolve())
    return direction


def load_direction(ref: str | Path, lm, store=None):
    """A direction from a file path or from its name in the store, checked against the loaded model."""
    path = resolve_direction_path(ref, store)
    direction = open_direction(path)
    check_model(direction.model, lm, path)
    direction.check_weights(lm, path)
    return direction
