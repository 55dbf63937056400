"""What every export format shares: the writer protocol, the result, the checks' helpers, and the model card's
common lines."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from engine.directions import Mix
from engine.errors import TsdpoError
from engine.models import LoadedModel
from engine.progress import ProgressFn

MANIFEST = "tsdpo-export.json"
StopCheck = Callable[[str], None]  # raises Cancelled, naming where the export stopped


class ExportError(TsdpoError):
    pass


@dataclass
class ExportResult:
    format: str
    path: Path
    files: list[str]
    bytes: int
    seconds: float
    weights: dict[str, float]
    check: dict = field(default_factory=dict)  # what the written files were checked against, and the difference
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"format": self.format, "path": str(self.path), "files": self.files, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "weights": self.weights, "check": self.check, "notes": self.notes}


class Writer:
    """One export format. ``export_mix`` calls, in this order: ``validate`` (refuse what the format cannot carry,
    before anything is written), ``estimate_bytes`` (checked against the free space), ``write`` into the staging
    folder, ``verify`` what was written (raise ``ExportError`` when it is not the mix), ``card`` (the README)."""

    format: str

    def __init__(self, lm: LoadedModel, mix: Mix):
        self.lm, self.mix = lm, mix
        self.notes: list[str] = []

    def validate(self) -> None:
        raise NotImplementedError

    def estimate_bytes(self) -> int:
        raise NotImplementedError

    def write(self, tmp: Path, progress: Optional[ProgressFn], stop_check: StopCheck) -> None:
        raise NotImplementedError

    def verify(self, tmp: Path) -> dict:
        raise NotImplementedError

    def card(self, manifest: dict) -> str:
        raise NotImplementedError


def names(mix: Mix) -> str:
    return ", ".join(mix.names())


def mix_lines(manifest: dict) -> str:
    rows = ["| direction | objective | kind | weight | file sha256 |", "|---|---|---|---|---|"]
    for d in manifest["directions"]:
        kind = d["kind"] + (f" ({d['param']})" if d.get("param") else f" (layers {', '.join(map(str, d['layers']))})")
        rows.append(f"| {d['name']} | {d['objective']} | {kind} | {d['weight']:+g} | {('`' + d['sha256'][:16] + '`') if d.get('sha256') else 'not saved to a file'} |")
    if len(rows) == 2:
        rows.append("| (none: the base model) | | | | |")
    return "\n".join(rows)


def base_lines(manifest: dict) -> str:
    b = manifest["base_model"]
    src = b["source"]
    where = {"embedded": "the embedded default model (a GGUF file, de-quantized)",
             "gguf": f"GGUF file `{src.get('ref')}` (de-quantized)", "folder": f"folder `{src.get('ref')}`",
             "hub": f"`{src.get('ref')}` on the Hugging Face hub"}.get(src.get("kind"), str(src))
    point = manifest.get("point")
    text = (f"- Base model: {b['model_name']}, from {where}; {b['model_type']}, {b['n_layers']} layers, "
            f"hidden size {b['hidden_size']}; weights fingerprint `{b['fingerprint']}`.\n")
    if point:
        text += f"- Point on the preference plane: ({point[0]:+.3f}, {point[1]:+.3f}).\n"
    check = manifest.get("check") or {}
    if check:
        text += f"- Checked on export: {check.get('what', '')} {check.get('result', '')}\n"
    for note in manifest.get("notes", []):
        text += f"- {note}\n"
    return text


def sample(t: torch.Tensor, k: int = 257) -> torch.Tensor:
    """An evenly strided sample of a tensor's values, copied (float32, CPU)."""
    flat = t.detach().reshape(-1)
    idx = torch.arange(min(k, flat.numel()), device=flat.device) * (flat.numel() - 1) // max(min(k, flat.numel()) - 1, 1)
    return flat[idx].float().cpu().clone()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference, or inf when either side holds a NaN or infinity (never a quiet NaN)."""
    d = float((a - b).abs().max())  # a NaN or infinity on either side makes this NaN or inf (one pass)
    return d if math.isfinite(d) else math.inf


def safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.")
    return keep or "direction"
