"""What a direction is, how directions add up to a mix, and the file every direction is stored in.

A direction is a small value that knows how it acts on a model, through one protocol:

- in **activation space** (a steering vector): ``steered_layers()`` and ``activation_delta(layer)``, what
  it adds to the output of a decoder block;
- in **weight space** (a weight delta, trained by TS-DPO or scalarized DPO): ``weight_names()`` and
  ``weight_delta(name)``, what it adds to a weight matrix, and ``low_rank(name)``, its (B, A0) factors
  when it has them.

``direction * alpha`` is a ``Mix`` and mixes add, so theta0 + sum_k alpha_k tau_k (and the steering added
to activations) is one value: the mixer applies it, the export writes it, evaluation measures it, and none
of them asks what class a direction is.

Every direction file is safetensors tensors plus JSON metadata, and records the identity of the model it
was made for (fingerprint, name, layer count, hidden size). Loading it for another model, or loading a file
with NaN or inf values, is refused with a message that says what to do. This module imports no direction
kind; ``engine.loading`` (above the kinds) turns a file or a stored name into the right one.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Iterator, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine.errors import TsdpoError
from engine.paths import atomic_path

FORMAT_KEY = "tsdpo.format"
META_KEY = "tsdpo.meta"
ACTIVATION, WEIGHT = "activation", "weight"  # the two spaces a direction can act in


class DirectionError(TsdpoError):
    pass


# --------------------------------------------------------------------------------------------- the protocol

class Direction:
    """The protocol every direction kind implements (``SteeringVector``, ``WeightDelta``).

    Subclasses are dataclasses with ``objective``, ``model`` (the identity of the model it was made for),
    ``meta`` and ``name``, and set ``space`` and ``kind`` (the word written in files and the store)."""

    space: ClassVar[str]
    kind: ClassVar[str]
    objective: str
    model: dict
    meta: dict
    name: str

    def __post_init__(self):
        self.name = self.name or self.objective  # unnamed: it is mixed under its objective

    # activation space
    def steered_layers(self) -> list[int]:
        return []

    def activation_delta(self, layer: int, alpha: float = 1.0) -> torch.Tensor:
        """What weight ``alpha`` adds to the output of decoder block ``layer`` (float32)."""
        raise DirectionError(f"{self.name} does not act on activations.")

    # weight space
    def weight_names(self) -> list[str]:
        return []

    def changes(self, name: str) -> bool:
        """Whether it changes the weight matrix ``name``."""
        return name in self.weight_names()

    def weight_delta(self, name: str) -> torch.Tensor:
        """What weight 1 adds to the weight matrix ``name`` (float32)."""
        raise DirectionError(f"{self.name} does not change weights.")

    def low_rank(self, name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """(B, A0) with weight_delta(name) = B @ A0, or None for a full-rank delta."""
        return None

    # shared by every kind
    def max_abs(self) -> float:
        """The largest |entry| this direction adds at weight 1, computed once: it bounds what a mix can add."""
        cached = self.__dict__.get("_max_abs")
        if cached is None:
            parts = [self.activation_delta(l) for l in self.steered_layers()]
            parts += [self.weight_delta(n) for n in self.weight_names()]
            cached = max((float(p.abs().max()) for p in parts), default=0.0)
            self.__dict__["_max_abs"] = cached
        return cached

    def cosine(self, other: "Direction") -> Optional[float]:
        """How nearly the two point the same (1) or the opposite (-1) way; None across spaces."""
        return None

    def describe(self) -> dict:
        """What an export's record and the studio's list say about it."""
        return {"objective": self.objective, "kind": self.kind}

    def check_weights(self, lm, path) -> None:
        """Directions that change weights check that the model has them, with the right shapes."""

    @property
    def label(self) -> str:
        """How lists name it: steering, tangent (TS-DPO) or scalarized (the scalarized-DPO baseline)."""
        return self.kind

    @classmethod
    def from_file(cls, kind: str, tensors: dict, meta: dict, path: Path) -> "Direction":
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | Path, lm=None) -> "Direction":
        """This kind of direction from its file (read once), checked against ``lm`` when given."""
        kind, tensors, meta = read_direction_file(path)
        direction = cls.from_file(kind, tensors, meta, Path(path))
        direction.meta["_path"] = str(Path(path).resolve())
        if lm is not None:
            check_model(direction.model, lm, path)
            direction.check_weights(lm, path)
        return direction

    def __mul__(self, alpha: float) -> "Mix":
        return Mix(((self.name, self, float(alpha)),)) if float(alpha) else Mix()

    __rmul__ = __mul__

    def __add__(self, other) -> "Mix":
        return self * 1.0 + other


@dataclass(frozen=True)
class Mix:
    """sum_k alpha_k d_k as a value: named terms (name, direction, weight)."""

    terms: tuple[tuple[str, Direction, float], ...] = ()

    @classmethod
    def of(cls, directions: Mapping[str, Direction], weights: Mapping[str, float]) -> "Mix":
        """The mix of ``directions`` with ``weights`` (name -> weight); zero weights leave no term."""
        unknown = sorted(set(weights) - set(directions))
        if unknown:
            raise DirectionError(f"No loaded direction named {', '.join(unknown)}; load it first.")
        bad = sorted(f"{k}={v}" for k, v in weights.items() if not math.isfinite(float(v)))
        if bad:
            raise DirectionError(f"Weights must be finite numbers; got {', '.join(bad)}.")
        return cls(tuple((k, directions[k], float(v)) for k, v in weights.items() if float(v)))

    def __add__(self, other) -> "Mix":
        other = other if isinstance(other, Mix) else other * 1.0
        merged: dict[str, list] = {name: [d, a] for name, d, a in self.terms}
        for name, d, a in other.terms:
            if name in merged and merged[name][0] is not d:
                raise DirectionError(f"Two different directions are both named {name!r}; rename one.")
            merged.setdefault(name, [d, 0.0])[1] += a
        return Mix(tuple((n, d, a) for n, (d, a) in merged.items() if a))

    def __mul__(self, alpha: float) -> "Mix":
        return Mix(tuple((n, d, a * float(alpha)) for n, d, a in self.terms if a * float(alpha)))

    __rmul__ = __mul__

    def __bool__(self) -> bool:
        return bool(self.terms)

    @property
    def weights(self) -> dict[str, float]:
        return {n: a for n, _, a in self.terms}

    def names(self) -> list[str]:
        return [n for n, _, _ in self.terms]

    def in_space(self, space: str) -> "Mix":
        return Mix(tuple(t for t in self.terms if t[1].space == space))

    @property
    def steering(self) -> "Mix":
        return self.in_space(ACTIVATION)

    @property
    def weight_space(self) -> "Mix":
        return self.in_space(WEIGHT)

    # activation space
    def activation_deltas(self) -> dict[int, torch.Tensor]:
        """Layer -> what the mix adds to that block's output (float32), by layer."""
        out: dict[int, torch.Tensor] = {}
        for _, d, a in self.terms:
            for layer in d.steered_layers():
                x = d.activation_delta(layer, a)
                out[layer] = out[layer] + x if layer in out else x
        return dict(sorted(out.items()))

    # weight space
    def weight_names(self) -> list[str]:
        seen: dict[str, None] = {}
        for _, d, _ in self.terms:
            seen.update(dict.fromkeys(d.weight_names()))
        return list(seen)

    def weight_delta(self, name: str) -> torch.Tensor:
        """sum_k alpha_k tau_k for one weight matrix (float32); one matrix at a time keeps memory small."""
        out = None
        for _, d, a in self.terms:
            if d.changes(name):
                x = a * d.weight_delta(name).float()
                out = x if out is None else out + x
        if out is None:
            raise DirectionError(f"No direction of the mix changes {name}.")
        return out

    def weight_deltas(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name in self.weight_names():
            yield name, self.weight_delta(name)

    def adapter(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Weight -> (sum_k alpha_k B_k, A0): the mix as one low-rank adapter, exact because every term shares
        A0. Refused when a term is full rank or was trained with another A0."""
        full = [n for n, d, _ in self.terms if any(d.low_rank(w) is None for w in d.weight_names())]
        if full:
            raise DirectionError(f"{', '.join(full)} {'is a full-rank direction' if len(full) == 1 else 'are full-rank directions'}"
                                 "; a low-rank adapter needs low-rank ones (B @ A0).")
        out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, d, a in self.terms:
            for w in d.weight_names():
                B, A = d.low_rank(w)
                term = B.float() * a
                if w not in out:
                    out[w] = (term, A)
                elif not torch.equal(out[w][1], A):
                    raise DirectionError(f"{name} was trained with another shared A0 than the other directions (another "
                                         "seed or rank), so they cannot share one adapter.")
                else:
                    out[w] = (out[w][0] + term, A)
        return out

    def max_abs(self) -> float:
        """An upper bound on any entry the mix adds: sum_k |alpha_k| max|d_k|."""
        return sum(abs(a) * d.max_abs() for _, d, a in self.terms)


def cosine_of(pairs: Iterable[tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]) -> float:
    """The cosine of two vectors given as matching pieces (None where one side has no piece), in float64."""
    dot = na = nb = 0.0
    for x, y in pairs:
        if x is not None:
            na += float(x.double().pow(2).sum())
        if y is not None:
            nb += float(y.double().pow(2).sum())
        if x is not None and y is not None:
            dot += float((x.double() * y.double()).sum())
    return dot / math.sqrt(max(na * nb, 1e-300))


# --------------------------------------------------------------------------------------------- the file

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
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: v for k, v in meta.items() if not k.startswith("_")}  # "_path" and the like describe this session only
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata={FORMAT_KEY: kind, META_KEY: json.dumps(meta)})
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
