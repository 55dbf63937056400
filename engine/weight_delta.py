"""A weight-space direction: one delta tau per selected weight matrix, full or low rank (tau = B @ A0).

``method`` says how it was trained: ``tangent`` (TS-DPO, DPO on the model linearized at theta0, whose
directions add) or ``scalarized`` (ordinary DPO on a weighted mix of objectives, the baseline). Either way
it acts on a model the same way: theta0 + alpha tau.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

import torch

from engine.directions import WEIGHT, Direction, DirectionError, cosine_of, save_direction_file

KIND = "weights"
LEGACY_KINDS = ("tangent",)  # what earlier versions wrote in the file
PARAMS = ("full", "lowrank")
METHODS = ("tangent", "scalarized")
LEGACY_METHODS = {"ordinary": "scalarized"}  # the word earlier versions wrote


@dataclass
class WeightDelta(Direction):
    objective: str
    param: str
    tensors: dict[str, torch.Tensor]  # full: {weight name: delta}; lowrank: {name + ":B": B, name + ":A": A0}
    model: dict
    method: str = "tangent"
    meta: dict = field(default_factory=dict)
    name: str = ""

    space: ClassVar[str] = WEIGHT
    kind: ClassVar[str] = KIND

    def __post_init__(self):
        super().__post_init__()
        self.method = LEGACY_METHODS.get(self.method, self.method)
        if self.method not in METHODS:
            raise DirectionError(f"A weight delta is trained by one of {METHODS}, not {self.method!r}.")

    @property
    def label(self) -> str:
        return self.method

    # the protocol
    def weight_names(self) -> list[str]:
        names = self.__dict__.get("_names")  # asked once per weight of every mix applied: computed once
        if names is None:
            names = list(self.tensors) if self.param == "full" else [k[:-2] for k in self.tensors if k.endswith(":B")]
            self.__dict__["_names"], self.__dict__["_name_set"] = names, frozenset(names)
        return list(names)

    def changes(self, name: str) -> bool:
        self.weight_names()
        return name in self.__dict__["_name_set"]

    def weight_delta(self, name: str) -> torch.Tensor:
        """The delta in the parameter's own layout. Low-rank factors are the linear map's (B [out, r], A0 [r, in]),
        so for a weight stored [in, out] (GPT-2's Conv1D, listed in ``meta["transposed"]``) it is (B A0)^T."""
        if self.param == "full":
            return self.tensors[name]
        delta = self.tensors[name + ":B"] @ self.tensors[name + ":A"]
        return delta.T if name in self.meta.get("transposed", ()) else delta

    def low_rank(self, name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        if self.param == "full":
            return None
        return self.tensors[name + ":B"], self.tensors[name + ":A"]

    def cosine(self, other: Direction) -> Optional[float]:
        if other.space != self.space:
            return None
        mine, theirs = set(self.weight_names()), set(other.weight_names())
        return cosine_of((self.weight_delta(n) if n in mine else None, other.weight_delta(n) if n in theirs else None)
                         for n in mine | theirs)

    def norm(self) -> float:
        cached = self.__dict__.get("_norm")
        if cached is None:
            cached = self.__dict__["_norm"] = math.sqrt(sum(float(self.weight_delta(n).double().pow(2).sum())
                                                            for n in self.weight_names()))
        return cached

    def describe(self) -> dict:
        return {**super().describe(), "method": self.method, "param": self.param, "norm": round(self.norm(), 6)}

    def check_weights(self, lm, path) -> None:
        params = dict(lm.model.named_parameters())
        for n in self.weight_names():
            if n not in params or tuple(params[n].shape) != tuple(self.weight_delta(n).shape):
                raise DirectionError(f"{path}: weight {n} does not exist in {lm.name} with the shape the direction expects.")

    # the file
    def save(self, path: str | Path) -> Path:
        meta = {**self.meta, "objective": self.objective, "param": self.param, "method": self.method,
                "model": self.model, "name": self.name}
        return save_direction_file(path, KIND, {k: v.float() for k, v in self.tensors.items()}, meta)

    @classmethod
    def from_file(cls, kind: str, tensors: dict, meta: dict, path: Path) -> "WeightDelta":
        if kind != KIND and kind not in LEGACY_KINDS:
            raise DirectionError(f"{path} holds a {kind} direction, not a weight-space direction.")
        try:
            d = cls(meta["objective"], meta["param"], tensors, meta["model"], meta.get("method", "tangent"), meta,
                    meta.get("name") or meta["objective"])
        except KeyError as exc:
            raise DirectionError(f"{path}: the direction lacks {exc}; the file is incomplete. Rebuild it.") from exc
        if d.param not in PARAMS:
            raise DirectionError(f"{path}: unknown parameterization {d.param!r}.")
        return d
