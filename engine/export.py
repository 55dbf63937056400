"""Exporting a mix so other tools can use it.

Three formats, each loaded by its own ecosystem's loader:

- ``hf``: the mixed checkpoint theta0 + sum_k alpha_k tau_k as a Hugging Face folder (safetensors, sharded
  above ``max_shard_size``; config, generation config, tokenizer with its chat template, a model card and a
  ``mix.yaml`` in task-arithmetic terms). From a GGUF base the export is the de-quantized model. Steering
  vectors can be *baked* into it where the architecture has an MLP bias (Llama's ``mlp_bias``): the down
  projection of a block writes straight into the residual stream, so its bias adds a constant to the
  block's output at every position, which is what a steering vector does.
- ``peft``: low-rank directions share A0 per weight, so sum_k alpha_k B_k A0 = (sum_k alpha_k B_k) A0 is one
  LoRA adapter with lora_A = A0, lora_B = sum_k alpha_k B_k and scaling 1 (lora_alpha = r).
- ``controlvector``: steering vectors as llama.cpp control-vector GGUF files (the mix, and each vector at
  weight 1), plus the same tensors in safetensors. ``direction.N`` is added to the output of 0-based block N,
  which is the layer index a tsdpo steering vector already uses; llama.cpp cannot steer block 0.

Every export is written into a hidden temporary folder beside the target, checked, and renamed into place
at the end: an interrupted or failed export leaves nothing half-written, and an existing export that is
being overwritten stays whole until the new one is complete.
"""

from __future__ import annotations

import copy
import errno
import glob
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import torch

from engine import __version__
from engine.directions import file_sha256
from engine.errors import Cancelled, TsdpoError
from engine.models import LoadedModel
from engine.paths import can_create_in
from engine.steering import SteeringVector
from engine.tangent import TangentDirection

FORMATS = ("hf", "peft", "controlvector")
MANIFEST = "tsdpo-export.json"
VERIFY_PROMPT = "Explain in two sentences why the sky is blue."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The HF export's checks. Read-back: strided samples of every tensor reloaded equal the ones written, bit for bit.
# Against the studio's model (same dtype): exact for weight mixes; a baked steering bias adds inside the MLP's
# sum rather than after the block, so the rounding order differs (4.8e-5 measured on the embedded model, fp32).
READ_BACK_TOLERANCE = 0.0  # weights read back are the bits written
MIX_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}
WEIGHT_TOLERANCE = 1e-5  # PEFT: B @ A read back vs sum_k alpha_k tau_k, relative to the largest delta

Progress = Callable[[str, Optional[float]], None]


class ExportError(TsdpoError):
    pass


def _quiet(message: str, fraction: Optional[float] = None) -> None:
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


# --------------------------------------------------------------------------------------------- the folder

def check_target(out: Path, overwrite: bool) -> None:
    """Refuse a target that would lose something: a file, or a non-empty folder without overwrite."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; export into a new folder (choose another --out).")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty. Choose a new folder, or pass --overwrite "
                          "(the old contents are replaced only once the new export is complete).")
    probe = out.parent
    while not probe.exists():  # the folders to create go below the nearest one that exists
        probe = probe.parent
    if not probe.is_dir() or not can_create_in(probe):
        raise ExportError(f"Cannot create {out}: {probe} is not a folder you can write to. Choose another location.")


STAGING, HIDDEN_OLD = "tsdpo-export", "tsdpo-old"


def clean_stale(out: Path) -> list[str]:
    """Undo what an export that was killed left beside ``out``: its staging folders are removed, and an old
    export it had moved aside (killed between the two renames) is put back. Only folders of processes that
    are no longer running are touched. Returns what was done, one line each."""
    import psutil

    done = []
    if not out.parent.is_dir():
        return done
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.tsdpo-*-*")):
        kind, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if kind not in (STAGING, HIDDEN_OLD) or not pid.isdigit() or not p.is_dir():
            continue
        if int(pid) != os.getpid() and psutil.pid_exists(int(pid)):
            continue  # another export is writing there right now
        if kind == HIDDEN_OLD and not out.exists():
            os.replace(p, out)
            done.append(f"restored the earlier export {out} (an interrupted overwrite had moved it to {p.name})")
        else:
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}, left by an interrupted export ({_size(size)})")
    return done


def _check_space(parent: Path, needed: int) -> None:
    probe = parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ExportError(f"The export needs about {_size(needed)} but {probe} has {_size(free)} free. "
                          "Free some space, or export to another disk.")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


class _Staging:
    """A hidden temporary folder beside ``out`` that becomes ``out`` only when everything is written."""

    def __init__(self, out: Path, overwrite: bool):
        self.out = out
        self.overwrite = overwrite
        self.tmp = out.parent / f".{out.name}.{STAGING}-{os.getpid()}"

    def __enter__(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as exc:
            raise ExportError(f"Cannot write the export beside {self.out} ({exc.strerror or exc}). "
                              "Choose a folder you can write to.") from exc
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ExportError(f"The disk ran out of space while writing the export to {self.out.parent}; "
                                  "nothing was left behind. Free some space, or export to another disk.") from exc
            return False
        check_target(self.out, self.overwrite)  # another process may have written there meanwhile
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.{HIDDEN_OLD}-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False


# --------------------------------------------------------------------------------------------- the mix

@dataclass
class _Mix:
    weights: dict[str, float]  # non-zero weights only
    steering: list[tuple[str, SteeringVector, float]]
    weight_space: list[tuple[str, TangentDirection, float]]

    def steering_deltas(self) -> dict[int, torch.Tensor]:
        """Layer -> what the mix adds to that block's output (float32)."""
        out: dict[int, torch.Tensor] = {}
        for _, sv, alpha in self.steering:
            for layer in sv.layers:
                d = sv.delta(layer, alpha).float()
                out[layer] = out[layer] + d if layer in out else d
        return dict(sorted(out.items()))


def _mix(mixer, weights: dict[str, float]) -> _Mix:
    unknown = sorted(set(weights) - set(mixer.directions))
    if unknown:
        raise ExportError(f"No loaded direction named {', '.join(unknown)}; load it first.")
    active = {k: float(v) for k, v in weights.items() if v}
    bad = sorted(f"{k}={v}" for k, v in active.items() if not math.isfinite(v))
    if bad:
        raise ExportError(f"Weights must be finite numbers; got {', '.join(bad)}. Nothing was written.")
    steering, weight_space = [], []
    for name, alpha in active.items():
        d = mixer.directions[name]
        (steering if isinstance(d, SteeringVector) else weight_space).append((name, d, alpha))
    return _Mix(active, steering, weight_space)


def _direction_record(name: str, d, alpha: float) -> dict:
    path = d.meta.get("_path")
    rec = {"name": name, "weight": alpha, "objective": d.objective, "kind": d.kind}
    if isinstance(d, TangentDirection):
        rec.update(method=d.method, param=d.param, norm=round(d.norm(), 6))
    else:
        rec.update(layers=list(d.layers), strength=d.strength)
    if path and Path(path).is_file():
        rec.update(file=str(path), sha256=file_sha256(path))
    return rec


# --------------------------------------------------------------------------------------------- public entry

def export_mix(lm: LoadedModel, mixer, weights: dict[str, float], out: str | os.PathLike, *, format: str = "hf",
               overwrite: bool = False, bake_steering: bool = False, dtype: Optional[str] = None,
               max_shard_size: str = "2GB", verify: bool = True, point: Optional[tuple[float, float]] = None,
               plane: Optional[dict] = None, progress: Progress = _quiet,
               should_stop: Callable[[], bool] = lambda: False) -> ExportResult:
    """Write the mix ``weights`` (direction name in ``mixer`` -> weight) to the new folder ``out``."""
    if format not in FORMATS:
        raise ExportError(f"Unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    out = Path(out).expanduser().resolve()
    mix = _mix(mixer, weights)
    t0 = time.perf_counter()
    for line in clean_stale(out):
        progress(line[0].upper() + line[1:] + ".", None)
    check_target(out, overwrite)
    context = {"point": list(point) if point is not None else None, "plane": plane}
    if format == "hf":
        writer = _HFExport(lm, mixer, mix, bake_steering, dtype, max_shard_size)
    elif format == "peft":
        writer = _PeftExport(lm, mix)
    else:
        writer = _ControlVectorExport(lm, mix)
    writer.validate()
    _check_space(out.parent, writer.estimate_bytes())
    result = ExportResult(format, out, [], 0, 0.0, mix.weights)

    def stop_check(what: str) -> None:
        if should_stop():
            raise Cancelled(f"the export ({what})")

    with _Staging(out, overwrite) as tmp:
        writer.write(tmp, progress, stop_check)
        stop_check("before the check")
        if verify:
            progress("Checking the written files...", None)
            result.check = writer.verify(tmp)
        result.notes = writer.notes
        manifest = {
            "tsdpo_studio": __version__, "format": format,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "base_model": {**lm.identity(), "source": lm.source.to_json()},
            "directions": [_direction_record(n, d, a) for n, d, a in mix.weight_space + mix.steering],
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
    progress(f"Exported to {out} ({_size(result.bytes)}, {result.seconds:.1f} s)", 1.0)
    return result


def _mix_lines(manifest: dict) -> str:
    rows = ["| direction | objective | kind | weight | file sha256 |", "|---|---|---|---|---|"]
    for d in manifest["directions"]:
        kind = d["kind"] + (f" ({d['param']})" if d.get("param") else f" (layers {', '.join(map(str, d['layers']))})")
        rows.append(f"| {d['name']} | {d['objective']} | {kind} | {d['weight']:+g} | {('`' + d['sha256'][:16] + '`') if d.get('sha256') else 'not saved to a file'} |")
    if len(rows) == 2:
        rows.append("| (none: the base model) | | | | |")
    return "\n".join(rows)


def _base_lines(manifest: dict) -> str:
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


# --------------------------------------------------------------------------------------------- hf

class _HFExport:
    def __init__(self, lm: LoadedModel, mixer, mix: _Mix, bake: bool, dtype: Optional[str], max_shard_size: str):
        self.lm, self.mixer, self.mix, self.bake = lm, mixer, mix, bake
        if dtype not in (None, "auto") and dtype not in DTYPES:
            raise ExportError(f"Export dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
        self.dtype = DTYPES[dtype] if dtype in DTYPES else lm.dtype
        self.max_shard_size = max_shard_size
        self.notes: list[str] = []
        self._reference: Optional[torch.Tensor] = None  # the studio's mixed model on a fixed prompt
        self._written: dict[str, torch.Tensor] = {}  # strided samples of every tensor as it was written

    def validate(self) -> None:
        if self.mix.steering and not self.bake:
            names = ", ".join(n for n, _, _ in self.mix.steering)
            raise ExportError(
                f"The mix includes steering vectors ({names}), which act on activations, not weights. Export them as "
                "llama.cpp control vectors (--format controlvector), set their weights to 0, or bake them into the "
                "checkpoint as an MLP bias (--bake-steering; in the studio, 'Bake steering vectors'), which Llama-style "
                "models can carry.")
        if self.mix.steering:
            self._bias_names()  # refuses an architecture that cannot carry the bias
            self.notes.append("Steering is baked in as the down-projection bias of the steered blocks, so it acts at "
                              "every position (prompt and reply).")
        if self.lm.source.kind in ("gguf", "embedded"):
            self.notes.append("The base model came from a GGUF file: these weights are its de-quantized values.")

    def _bias_names(self) -> dict[int, str]:
        config = self.lm.config
        if not hasattr(config, "mlp_bias"):
            raise ExportError(f"A {self.lm.model_type} model has no MLP bias to carry a steering vector; export the "
                              "steering vectors with --format controlvector instead.")
        blocks = self.lm.decoder_layers()
        prefix = self.lm.decoder_prefix()
        names = {}
        for layer in self.mix.steering_deltas():
            down = getattr(getattr(blocks[layer], "mlp", None), "down_proj", None)
            if not isinstance(down, torch.nn.Linear):
                raise ExportError(f"Block {layer} of this {self.lm.model_type} model has no mlp.down_proj; the steering "
                                  "cannot be baked. Export it with --format controlvector instead.")
            names[layer] = f"{prefix}.{layer}.mlp.down_proj.bias"
        return names

    def estimate_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return int(self.lm.n_params * elem * 1.02) + (64 << 20)

    def _fixed_input(self) -> torch.Tensor:
        ids = self.lm.tokenizer(self.lm.chat_text(VERIFY_PROMPT), return_tensors="pt", add_special_tokens=False).input_ids
        return ids.to(self.lm.device)

    @torch.no_grad()
    def write(self, tmp: Path, progress: Progress, stop_check) -> None:
        from transformers import AutoModelForCausalLM

        lm = self.lm
        before_positions = self.mixer.positions
        progress("Applying the mix to the weights...", 0.05)
        with self.mixer.applied([self.mix.weights]):
            try:
                self.mixer.positions = "all"  # what a baked bias does
                self._reference = lm.model(self._fixed_input()).logits.float().cpu()
            finally:
                self.mixer.positions = before_positions
            stop_check("while applying the mix")
            config = copy.deepcopy(lm.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            state = {k: v.detach() for k, v in lm.model.state_dict().items()}
            if self.mix.steering:
                config.mlp_bias = True
            with torch.device("meta"):
                plain = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
            wanted = dict(plain.named_parameters(remove_duplicate=False))
            if self.mix.steering:
                for name, p in wanted.items():  # zero biases where the base had none
                    if name not in state and name.endswith(".bias"):
                        state[name] = torch.zeros(p.shape, dtype=self.dtype, device=lm.device)
                deltas = self.mix.steering_deltas()
                for layer, name in self._bias_names().items():
                    delta = deltas[layer].to(device=lm.device)
                    state[name] = (state[name].float() + delta).to(self.dtype)
            state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in state.items()}
            missing, unexpected = plain.load_state_dict(state, assign=True, strict=False)
            plain.tie_weights()
            still_meta = [n for n, p in plain.named_parameters() if p.is_meta]
            if still_meta or unexpected:
                raise ExportError(f"Could not build the checkpoint: weights {still_meta[:3]} have no values and "
                                  f"{unexpected[:3]} have no place in the model. Report this with the model's config.")
            plain.generation_config = copy.deepcopy(lm.model.generation_config)
            # In the model's own dtype the mixer has refused anything that overflows; stored in another one, the
            # rounding can still overflow (a float32 weight beyond float16's range, say).
            bad = [] if self.dtype == lm.dtype else \
                [n for n, p in plain.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()]
            if bad:
                raise ExportError(f"The mixed weights hold NaN or infinite values in {len(bad)} tensor(s) (first: {bad[0]}) "
                                  f"once stored as {str(self.dtype).replace('torch.', '')}; nothing was written. Use smaller "
                                  "weights, or float32.")
            self._written = {k: _sample(v) for k, v in state.items() if v.is_floating_point()}  # what the files must give back
            progress("Writing safetensors shards...", 0.3)
            stop_check("before writing the weights")
            plain.save_pretrained(str(tmp), max_shard_size=self.max_shard_size)
            del plain, state
        stop_check("after writing the weights")
        progress("Writing the tokenizer and chat template...", 0.8)
        lm.tokenizer.save_pretrained(str(tmp))
        self._write_yaml(tmp)

    def _write_yaml(self, tmp: Path) -> None:
        import yaml

        base = self.lm.base_ref()
        doc = {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "dtype": str(self.dtype).replace("torch.", ""),
            "parameters": {"normalize": False},
            "models": [{"model": d.meta.get("_path") or n, "parameters": {"weight": a},
                        "tsdpo": {"objective": d.objective, "kind": d.kind, "param": d.param}}
                       for n, d, a in self.mix.weight_space],
        }
        header = ("# theta = theta0 + sum_k weight_k * tau_k  (linear / task arithmetic, no normalization).\n"
                  "# Each `model` here is a tsdpo direction file holding tau_k itself (a weight delta, full or B @ A0),\n"
                  "# not a fine-tuned checkpoint: merge tools that expect checkpoints need theta0 + tau_k per entry.\n")
        if self.mix.steering:
            doc["steering_baked_as_bias"] = [{"name": n, "weight": a, "layers": list(sv.layers)} for n, sv, a in self.mix.steering]
        (tmp / "mix.yaml").write_text(header + yaml.safe_dump(doc, sort_keys=False))

    @torch.no_grad()
    def verify(self, tmp: Path) -> dict:
        from transformers import AutoModelForCausalLM

        # The export's own folder: its config is ours, and no code from anywhere runs while it is read back.
        loaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=self.dtype, use_safetensors=True,
                                                      trust_remote_code=False).to(self.lm.device)
        loaded.eval()
        got = loaded(self._fixed_input()).logits.float().cpu()
        back = loaded.state_dict()
        read_back = max((_max_diff(_sample(back[k]), v) for k, v in self._written.items() if k in back), default=0.0)
        del loaded, back
        if read_back > READ_BACK_TOLERANCE:
            raise ExportError(f"The checkpoint read back from disk holds other weights than were written (max |difference| "
                              f"{read_back:.3g}); nothing was kept. The disk or the transformers version may be at fault: try "
                              "again, or export elsewhere.")
        diff = _max_diff(got, self._reference)
        dtype = str(self.dtype).replace("torch.", "")
        check = {"what": "logits on a fixed prompt, reloaded with AutoModelForCausalLM vs the studio's mixed model:",
                 "result": f"max |difference| = {diff:.3g}", "max_abs_logit_diff": diff, "read_back_diff": read_back,
                 "prompt": VERIFY_PROMPT, "dtype": dtype}
        if self.dtype == self.lm.dtype:
            tolerance = MIX_TOLERANCE.get(dtype, MIX_TOLERANCE["float32"])
            check.update(tolerance=tolerance, result=f"max |difference| = {diff:.3g} (allowed {tolerance:g})")
            if diff > tolerance:
                raise ExportError(f"The exported checkpoint does not reproduce the studio's mixed model: its logits differ by "
                                  f"up to {diff:.3g} (allowed {tolerance:g} in {dtype}); nothing was kept. Report this with "
                                  "the model's config.")
        else:  # stored in another dtype: the rounding is the difference, reported, and checked by the read-back above
            check["result"] += f" (rounding to {dtype}; the weights read back are the ones written)"
        return check

    def card(self, manifest: dict) -> str:
        src = self.lm.source
        front = ["---", "library_name: transformers", "tags:", "- tsdpo-studio", "- task-arithmetic", "- preference-mixing"]
        if src.kind == "hub":
            front.append(f"base_model: {src.ref}")
        front.append("---")
        return "\n".join(front) + f"""

# {self.lm.name} mixed with tsdpo-studio

theta = theta0 + sum_k alpha_k tau_k, written as a plain Hugging Face checkpoint.

{_base_lines(manifest)}
## Directions and weights

{_mix_lines(manifest)}

`mix.yaml` states the same mix in the linear / task-arithmetic terms that merge tools use;
`{MANIFEST}` holds every number above in JSON.

## Loading

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")
tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")
messages = [{{"role": "user", "content": "Hello!"}}]
ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0][ids.shape[1]:], skip_special_tokens=True))
```
"""


# --------------------------------------------------------------------------------------------- peft

class _PeftExport:
    def __init__(self, lm: LoadedModel, mix: _Mix):
        self.lm, self.mix = lm, mix
        self.notes: list[str] = []
        self.tensors: dict[str, torch.Tensor] = {}

    def validate(self) -> None:
        if self.mix.steering:
            raise ExportError("A LoRA adapter carries weight deltas only; the mix includes steering vectors "
                              f"({', '.join(n for n, _, _ in self.mix.steering)}). Export them with --format controlvector.")
        if not self.mix.weight_space:
            raise ExportError("The mix has no weight-space direction with a non-zero weight: there is no adapter to write.")
        full = [n for n, d, _ in self.mix.weight_space if d.param != "lowrank"]
        if full:
            raise ExportError(f"{', '.join(full)} {'is a full-rank direction' if len(full) == 1 else 'are full-rank directions'}; "
                              "a LoRA adapter needs low-rank ones (B @ A0). Export a merged checkpoint with --format hf instead.")
        a0: dict[str, torch.Tensor] = {}
        for name, d, _ in self.mix.weight_space:
            for w in d.param_names():
                A = d.tensors[w + ":A"]
                if w in a0 and not torch.equal(a0[w], A):
                    raise ExportError(f"{name} was trained with another shared A0 than the other directions (another seed or "
                                      "rank), so they cannot share one adapter. Export a merged checkpoint with --format hf.")
                a0.setdefault(w, A)
        self._a0 = a0

    def estimate_bytes(self) -> int:
        return sum(A.numel() * 4 + A.shape[0] * 4 * self.lm.model.get_parameter(w).shape[0] for w, A in self._a0.items()) + (1 << 20)

    def write(self, tmp: Path, progress: Progress, stop_check) -> None:
        from safetensors.torch import save_file

        progress("Summing the B factors...", 0.2)
        ranks: dict[str, int] = {}
        for w, A in self._a0.items():
            module = w[: -len(".weight")]
            B = None
            for _, d, alpha in self.mix.weight_space:
                if w + ":B" in d.tensors:
                    term = d.tensors[w + ":B"].float() * alpha
                    B = term if B is None else B + term
            self.tensors[f"base_model.model.{module}.lora_A.weight"] = A.float().contiguous()
            self.tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
            ranks[module] = int(A.shape[0])
        stop_check("while summing")
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        pattern = {m: k for m, k in ranks.items() if k != r}
        src = self.lm.source
        base = self.lm.base_ref()
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": pattern,  # scaling = alpha / r = 1
            "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None,
        }
        progress("Writing the adapter...", 0.6)
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(self.tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if src.kind in ("gguf", "embedded"):
            self.notes.append(f"The base is a GGUF file; load the adapter onto its de-quantized copy at {base}.")

    def verify(self, tmp: Path) -> dict:
        from safetensors.torch import load_file

        back = load_file(str(tmp / "adapter_model.safetensors"))
        worst = scale = 0.0
        for w in self._a0:
            module = w[: -len(".weight")]
            got = back[f"base_model.model.{module}.lora_B.weight"] @ back[f"base_model.model.{module}.lora_A.weight"]
            want = sum(d.delta(w).float() * a for _, d, a in self.mix.weight_space if w in d.param_names())
            worst = max(worst, _max_diff(got, want))
            biggest = float(want.abs().max())
            scale = max(scale, biggest if math.isfinite(biggest) else math.inf)
        allowed = WEIGHT_TOLERANCE * max(1.0, scale)
        if not worst <= allowed:
            raise ExportError(f"The adapter read back from disk is not the mix: B @ A differs from sum_k alpha_k tau_k by "
                              f"{worst:.3g} (allowed {allowed:.3g}); nothing was kept. Check the weights of the mix.")
        return {"what": "B @ A read back from adapter_model.safetensors vs sum_k alpha_k tau_k, over every weight:",
                "result": f"max |difference| = {worst:.3g} (allowed {allowed:.3g})", "max_abs_weight_diff": worst}

    def card(self, manifest: dict) -> str:
        return f"""---
library_name: peft
tags:
- tsdpo-studio
- lora
---

# A LoRA adapter for {self.lm.name}, mixed with tsdpo-studio

sum_k alpha_k tau_k with tau_k = B_k A0: lora_A = A0 (shared by every direction), lora_B = sum_k alpha_k B_k,
lora_alpha = r so the scaling is 1. Applied to the base model it reproduces the mix exactly.

{_base_lines(manifest)}
## Directions and weights

{_mix_lines(manifest)}

## Loading

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("path/to/the/base/model")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
merged = model.merge_and_unload()  # optional: a plain model
```
"""


# --------------------------------------------------------------------------------------------- control vectors

class _ControlVectorExport:
    def __init__(self, lm: LoadedModel, mix: _Mix):
        self.lm, self.mix = lm, mix
        self.notes: list[str] = []
        self.written: dict[str, dict[int, torch.Tensor]] = {}

    def validate(self) -> None:
        if self.mix.weight_space:
            raise ExportError("A control vector carries steering vectors only; the mix includes weight-space directions "
                              f"({', '.join(n for n, _, _ in self.mix.weight_space)}). Export those with --format hf or peft.")
        if not self.mix.steering:
            raise ExportError("The mix has no steering vector with a non-zero weight: there is no control vector to write.")
        if 0 in self.mix.steering_deltas():
            raise ExportError("The mix steers the output of block 0, which llama.cpp's control vectors cannot reach "
                              "(their layers start at 1). Rebuild the vector with --layers set to 1 or higher.")
        self.notes.append("llama.cpp adds a control vector at every position (prompt and reply).")

    def estimate_bytes(self) -> int:
        return 4 * self.lm.hidden_size * self.lm.n_layers * (len(self.mix.steering) + 2) + (1 << 20)

    def _write_gguf(self, path: Path, vectors: dict[int, torch.Tensor]) -> None:
        import gguf

        writer = gguf.GGUFWriter(str(path), "controlvector")
        writer.add_string("controlvector.model_hint", self.lm.model_type)
        writer.add_uint32("controlvector.layer_count", len(vectors))
        for layer, v in vectors.items():
            writer.add_tensor(f"direction.{layer}", v.float().cpu().numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    def write(self, tmp: Path, progress: Progress, stop_check) -> None:
        from safetensors.torch import save_file

        progress("Writing control vectors...", 0.3)
        mixed = self.mix.steering_deltas()
        self.written["mix.gguf"] = mixed
        self._write_gguf(tmp / "mix.gguf", mixed)
        meta = {"model_hint": self.lm.model_type, "layer_count": str(len(mixed)),
                "mapping": "direction.N is added to the output of 0-based decoder block N (HF hidden_states[N+1])"}
        save_file({f"direction.{l}": v.contiguous() for l, v in mixed.items()}, str(tmp / "mix.safetensors"), metadata=meta)
        for name, sv, _ in self.mix.steering:
            stop_check("while writing the single vectors")
            single = {l: sv.delta(l, 1.0).float() for l in sorted(sv.layers)}
            fname = f"{_safe_name(name)}.gguf"
            self.written[fname] = single
            self._write_gguf(tmp / fname, single)

    def verify(self, tmp: Path) -> dict:
        import gguf

        worst = 0.0
        for fname, vectors in self.written.items():
            reader = gguf.GGUFReader(str(tmp / fname))
            arch = reader.get_field("general.architecture")
            if arch is None or arch.contents() != "controlvector":
                raise ExportError(f"{fname} was written without general.architecture = controlvector.")
            names = {t.name: t for t in reader.tensors}
            if set(names) != {f"direction.{l}" for l in vectors}:
                raise ExportError(f"{fname} holds tensors {sorted(names)}, not the expected ones.")
            for layer, v in vectors.items():
                t = names[f"direction.{layer}"]
                if t.tensor_type != gguf.GGMLQuantizationType.F32:
                    raise ExportError(f"{fname}: direction.{layer} is not F32.")
                worst = max(worst, _max_diff(torch.from_numpy(t.data.copy()).reshape(-1), v.cpu().float()))
        if worst != 0.0:  # F32 written and read as F32: the values are the same bits
            raise ExportError(f"The control vectors read back from disk differ from the mix by {worst:.3g}; nothing was "
                              "kept. Check the weights of the mix, and the disk.")
        return {"what": f"{len(self.written)} GGUF file(s) read back with the gguf package (names, F32, values):",
                "result": f"max |difference| = {worst:.3g}", "max_abs_value_diff": worst}

    def card(self, manifest: dict) -> str:
        singles = " ".join(f"--control-vector-scaled {_safe_name(n)}.gguf {a:g}" for n, _, a in self.mix.steering)
        layers = sorted(self.mix.steering_deltas())
        return f"""---
tags:
- tsdpo-studio
- control-vector
- llama.cpp
---

# Control vectors for {self.lm.name}, from tsdpo-studio

`mix.gguf` holds the mix with its weights applied; each `<name>.gguf` holds one vector at weight 1.
`direction.N` is added to the output of 0-based decoder block N (steered blocks: {', '.join(map(str, layers))}).
`mix.safetensors` has the same tensors under the same names.

{_base_lines(manifest)}
## Directions and weights

{_mix_lines(manifest)}

## Using them with llama.cpp

```sh
llama-cli -m model.gguf --control-vector mix.gguf
# the same mix from the single vectors:
llama-cli -m model.gguf {singles}
```
"""


def _sample(t: torch.Tensor, k: int = 257) -> torch.Tensor:
    """An evenly strided sample of a tensor's values, copied (float32, CPU)."""
    flat = t.detach().reshape(-1)
    idx = torch.arange(min(k, flat.numel()), device=flat.device) * (flat.numel() - 1) // max(min(k, flat.numel()) - 1, 1)
    return flat[idx].float().cpu().clone()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest absolute difference, or inf when either side holds a NaN or infinity (never a quiet NaN)."""
    d = float((a - b).abs().max())  # a NaN or infinity on either side makes this NaN or inf (one pass)
    return d if math.isfinite(d) else math.inf


def _safe_name(name: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-.")
    return keep or "direction"
