"""Exporting a mix so other tools can use it: one writer per format behind one small protocol
(``base.Writer``: validate, estimate, write, verify, card), written through ``staging``.

- ``hf`` (``hf.py``): the merged checkpoint theta0 + sum_k alpha_k tau_k, loadable by plain transformers;
  steering vectors can be baked in as an MLP bias.
- ``peft`` (``peft.py``): low-rank directions as one LoRA adapter (lora_A = A0, lora_B = sum_k alpha_k B_k).
- ``controlvector`` (``controlvector.py``): steering vectors as llama.cpp control-vector GGUF files.

Every export is written into a hidden temporary folder beside the target, checked, and renamed into place
at the end: an interrupted or failed export leaves nothing half-written, and an existing export that is
being overwritten stays whole until the new one is complete. A check that fails is an ``ExportError``.
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from engine import __version__
from engine.directions import Direction, DirectionError, file_sha256
from engine.errors import Cancelled
from engine.export.base import MANIFEST, ExportError, ExportResult, Writer
from engine.export.controlvector import ControlVectorWriter
from engine.export.hf import DTYPES, MIX_TOLERANCE, HFWriter
from engine.export.peft import PeftWriter
from engine.export.staging import Staging, check_space, check_target, clean_stale
from engine.models import LoadedModel
from engine.paths import format_bytes
from engine.progress import ProgressFn, note

WRITERS: dict[str, type[Writer]] = {w.format: w for w in (HFWriter, PeftWriter, ControlVectorWriter)}
FORMATS = tuple(WRITERS)

__all__ = ["DTYPES", "FORMATS", "MANIFEST", "MIX_TOLERANCE", "ExportError", "ExportResult", "check_target",
           "clean_stale", "export_mix"]


def _direction_record(name: str, d: Direction, alpha: float) -> dict:
    rec = {"name": name, "weight": alpha, **d.describe()}
    path = d.meta.get("_path")
    if path and Path(path).is_file():
        rec.update(file=str(path), sha256=file_sha256(path))
    return rec


def export_mix(lm: LoadedModel, mixer, weights: dict[str, float], out: str | os.PathLike, *, format: str = "hf",
               overwrite: bool = False, bake_steering: bool = False, dtype: Optional[str] = None,
               max_shard_size: str = "2GB", verify: bool = True, point: Optional[tuple[float, float]] = None,
               plane: Optional[dict] = None, progress: Optional[ProgressFn] = None,
               should_stop: Callable[[], bool] = lambda: False) -> ExportResult:
    """Write the mix ``weights`` (direction name in ``mixer`` -> weight) to the new folder ``out``."""
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    out = Path(out).expanduser().resolve()
    try:
        mix = mixer.mix(weights)
    except DirectionError as exc:
        raise ExportError(f"{exc} Nothing was written.") from exc
    t0 = time.perf_counter()
    for line in clean_stale(out):
        note(progress, line[0].upper() + line[1:] + ".")
    check_target(out, overwrite)
    context = {"point": list(point) if point is not None else None, "plane": plane}
    if format == "hf":
        writer: Writer = HFWriter(lm, mix, mixer, bake_steering, dtype, max_shard_size)
    else:
        writer = WRITERS[format](lm, mix)
    writer.validate()
    check_space(out.parent, writer.estimate_bytes())
    result = ExportResult(format, out, [], 0, 0.0, mix.weights)

    def stop_check(what: str) -> None:
        if should_stop():
            raise Cancelled(f"the export ({what})")

    with Staging(out, overwrite) as tmp:
        writer.write(tmp, progress, stop_check)
        stop_check("before the check")
        if verify:
            note(progress, "Checking the written files...")
            result.check = writer.verify(tmp)
        result.notes = writer.notes
        manifest = {
            "tsdpo_studio": __version__, "format": format,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_model": {**lm.identity(), "source": lm.source.to_json()},
            "directions": [_direction_record(n, d, a) for n, d, a in mix.weight_space.terms + mix.steering.terms],
            "weights": mix.weights, **context, "check": result.check, "notes": writer.notes,
        }
        try:
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, allow_nan=False))
        except ValueError as exc:  # a NaN or infinity reached the record of the export: refuse the export
            raise ExportError(f"The export's record holds a value that is not a finite number ({exc}); nothing was "
                              "written. Check the weights of the mix.") from exc
        (tmp / "README.md").write_text(writer.card(manifest))
        stop_check("before the final rename")
        result.files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        result.bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    result.seconds = time.perf_counter() - t0
    note(progress, f"Exported to {out} ({format_bytes(result.bytes)}, {result.seconds:.1f} s)")
    return result
