"""What the window and the model worker say to each other: requests and results as plain values, no Qt.

A request carries its own cancellation token (``engine.progress.CancelToken``), set by Stop; progress is the
engine's one ``Progress`` type; a failure says what failed as a ``kind`` the window can act on, not only as
a title for the dialog.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Optional

from engine.generation import Column, SamplingParams
from engine.progress import CancelToken

# ---------------------------------------------------------------------------------------------- requests


@dataclass
class LoadRequest:
    source: Optional[str] = None  # a folder, a hub id or a .gguf file; None: the embedded model
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    token: CancelToken = field(default_factory=CancelToken)


@dataclass
class CompareRequest:
    prompt: str
    columns: list[Column]
    params: SamplingParams = field(default_factory=SamplingParams)
    session_id: Optional[int] = None  # where the replies are saved; None: not saved
    blind: bool = False
    token: CancelToken = field(default_factory=CancelToken)


@dataclass
class Data:
    """One source of preference pairs for a job."""

    path: str
    format: Optional[str] = None  # None: detected
    objective: Optional[str] = None
    limit: Optional[int] = None
    length_matched: Optional[float] = None  # keep only pairs whose two replies are within this length ratio
    length_balanced: Optional[float] = None  # within this ratio, as many longer-preferred pairs as shorter-preferred
    min_score_gap: Optional[float] = None  # rated data: keep pairs whose chosen reply scored at least this much higher

    def load(self):
        from engine.data import load_pairs

        return load_pairs(self.path, format=self.format, objective=self.objective, limit=self.limit,
                          length_matched=self.length_matched, length_balanced=self.length_balanced,
                          min_score_gap=self.min_score_gap)


BUILD_KINDS = ("extract", "train", "scalarized")  # a steering vector, a TS-DPO direction, the scalarized baseline


@dataclass
class BuildJob:
    """Build a direction from preference pairs, save it to ``out`` and add it to the plane."""

    kind: str  # one of BUILD_KINDS
    name: str
    out: str
    data: Data
    second: Optional[Data] = None  # scalarized: the second objective
    weight: float = 0.5  # scalarized: the share of the first objective
    strength: Optional[float] = None  # extract: weight 1 adds this fraction of the layer's typical norm
    estimator: str = "mean-difference"  # extract: mean-difference | pca
    band: int = 1  # extract: contiguous layers steered around the best one, the strength split across them
    param: str = "lowrank"
    steps: int = 60
    lr: float = 0.0  # 0: the default for the parameterization
    lr_grid: list[float] = field(default_factory=list)  # train once per rate, keep the lowest held-out loss
    optimizer: str = "adamw"  # adamw | sgd
    keep: Optional[Data] = None  # train: another objective's pairs whose margins stay unchanged (to first order)
    beta: float = 0.1
    batch_size: int = 4
    max_tokens: int = 128  # for prompts and for responses
    overwrite: bool = False
    session_id: Optional[int] = None
    token: CancelToken = field(default_factory=CancelToken)


@dataclass
class ExportJob:
    """Export the mix the window showed when Export was pressed."""

    out: str
    format: str = "hf"
    overwrite: bool = False
    bake_steering: bool = False
    dtype: Optional[str] = None  # None: as loaded
    weights: dict = field(default_factory=dict)
    point: Optional[tuple[float, float]] = None
    plane: Optional[dict] = None
    session_id: Optional[int] = None
    token: CancelToken = field(default_factory=CancelToken)

    kind: ClassVar[str] = "export"

    @property
    def name(self) -> str:
        return Path(self.out).name


@dataclass
class PredictJob:
    """The margin gradients behind the first-order predicted maps."""

    pairs: int = 16  # held-out pairs per objective
    session_id: Optional[int] = None
    token: CancelToken = field(default_factory=CancelToken)

    kind: ClassVar[str] = "predict"
    name: ClassVar[str] = "margin maps"


@dataclass
class GapJob:
    """The linearization gap over the plane, for the layout the window showed when it was asked for."""

    plane: dict  # PreferencePlane.to_json()
    grid: int = 7
    pairs: int = 4
    session_id: Optional[int] = None
    token: CancelToken = field(default_factory=CancelToken)

    kind: ClassVar[str] = "gap"
    name: ClassVar[str] = "linearization gap"


@dataclass
class PromptSetJob:
    """A prompt set through the columns the window chose (their weights as they were when Run was pressed)."""

    path: str
    columns: list[Column]
    params: SamplingParams = field(default_factory=SamplingParams)
    limit: Optional[int] = None
    system: Optional[str] = None
    blind: bool = False
    session_id: Optional[int] = None
    token: CancelToken = field(default_factory=CancelToken)

    kind: ClassVar[str] = "promptset"

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass
class SignalJob:
    """Before training: does a first DPO step on the data's training pairs move its held-out pairs
    (``engine.signal``)?"""

    data: Data
    max_tokens: int = 128  # prompts and replies cut to this many tokens, as for training
    heldout: int = 64
    session_id: Optional[int] = None
    token: CancelToken = field(default_factory=CancelToken)

    kind: ClassVar[str] = "signal"

    @property
    def name(self) -> str:
        return self.data.objective or Path(self.data.path).name


Job = BuildJob | ExportJob | PredictJob | GapJob | PromptSetJob | SignalJob

# ---------------------------------------------------------------------------------------------- results


@dataclass
class ModelInfo:
    name: str
    fingerprint: str
    source: dict  # {"kind": embedded | folder | gguf | hub, "ref": ...}
    layers: int
    device: str
    dtype: str
    description: dict  # everything LoadedModel.describe() says
    kept_directions: list[str] = field(default_factory=list)  # carried over from the same model loaded before
    coverage: list[str] = field(default_factory=list)  # what a weight-space direction covers on it, and what it skips

    @classmethod
    def of(cls, lm, kept: list[str]) -> "ModelInfo":
        from engine.errors import TsdpoError
        from engine.tangent import coverage, describe_coverage

        d = lm.describe()
        try:
            lines = describe_coverage(coverage(lm))
        except TsdpoError as exc:
            lines = [str(exc)]
        return cls(d["model"], d["fingerprint"], d["source"], d["layers"], d["device"], d["dtype"], d, list(kept), lines)


@dataclass
class DirectionInfo:
    name: str
    label: str  # steering | tangent | scalarized
    objective: str
    path: str
    detail: str
    interference: list[tuple[str, str, float]] = field(default_factory=list)  # (a, b, cosine) pairs that overlap
    meaning: str = ""  # what weight 1 is

    @classmethod
    def of(cls, name: str, d) -> "DirectionInfo":
        facts = d.describe()
        if d.space == "activation":
            layers = ", ".join(map(str, facts["layers"]))
            detail = f"layer {layers}, strength {facts['strength']:g}"
            meaning = f"weight 1 = {facts['strength']:g} x layer {layers}'s typical norm (steering)"
        else:
            val = d.meta.get("validation", {}).get("rewards/accuracies")
            detail = facts["param"] + (f", held-out accuracy {val:.2f}" if val is not None else "")
            meaning = ("weight 1 = tau as trained (TS-DPO)" if d.label == "tangent" else
                       "weight 1 = the scalarized-DPO run's delta")
        return cls(name, d.label, d.objective, d.meta.get("_path", ""), detail, meaning=meaning)


@dataclass
class Reply:
    """One column's reply as the window shows it (from a comparison just made, or from the history)."""

    label: str
    weights: dict
    point: Optional[tuple[float, float]]
    text: str
    n_tokens: int
    seconds: float
    tokens_per_s: float
    stopped: bool  # by Stop
    truncated: bool  # it used every token it was allowed without ending
    generation_id: Optional[int]  # in the store; None when not saved


@dataclass
class ComparisonResult:
    prompt: str
    columns: list[Reply]
    comparison_id: Optional[int] = None  # None: not saved, so not rateable
    batched: bool = False
    blind: bool = False
    max_new_tokens: Optional[int] = None
    batches: int = 1  # more than one when full-rank directions at different weights could not share a batch
    merged: int = 0  # batches whose low-rank mix was merged into the weights (measured faster than the adapter)


@dataclass
class JobResult:
    kind: str
    seconds: float
    name: str = ""
    path: str = ""
    cancelled: bool = False
    failed: bool = False
    summary: str = ""
    prediction: Optional[dict] = None  # predict: {"names": [...], "grads": {objective: [[...]]}}
    gap_map: Optional[dict] = None  # gap: what engine.sweep.plane_gap_map returns
    export: Optional[dict] = None  # export: ExportResult.to_json()
    signal: Optional[dict] = None  # signal: what engine.signal.data_signal returns


FAILURE_KINDS = ("no_model", "load", "direction", "apply", "generate", "not_saved", "not_registered", "job")


@dataclass
class Failure:
    kind: str  # one of FAILURE_KINDS: what the window may need to undo or stop waiting for
    title: str
    message: str
