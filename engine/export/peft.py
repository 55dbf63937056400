"""``peft``: low-rank directions share A0 per weight, so sum_k alpha_k B_k A0 = (sum_k alpha_k B_k) A0 is one LoRA
adapter with lora_A = A0, lora_B = sum_k alpha_k B_k and scaling 1 (lora_alpha = r). Checked before it is kept:
B @ A read back from the file equals sum_k alpha_k tau_k for every weight."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import torch

from engine.directions import DirectionError
from engine.export.base import ExportError, StopCheck, Writer, base_lines, max_diff, mix_lines, names
from engine.hooks import transposed_weights
from engine.progress import ProgressFn, note

WEIGHT_TOLERANCE = 1e-5  # B @ A read back vs sum_k alpha_k tau_k, relative to the largest delta


class PeftWriter(Writer):
    format = "peft"

    def validate(self) -> None:
        if self.mix.steering:
            raise ExportError("A LoRA adapter carries weight deltas only; the mix includes steering vectors "
                              f"({names(self.mix.steering)}). Export them with --format controlvector.")
        if not self.mix.weight_space:
            raise ExportError("The mix has no weight-space direction with a non-zero weight: there is no adapter to write.")
        try:
            self.adapter = self.mix.adapter()  # weight -> (sum_k alpha_k B_k, A0)
        except DirectionError as exc:
            raise ExportError(f"{exc} Export a merged checkpoint with --format hf instead.") from exc
        self.tensors: dict[str, torch.Tensor] = {}
        # GPT-2's Conv1D stores its weight [in, out]: PEFT's fan_in_fan_out, which is one flag for the adapter
        self.transposed = transposed_weights(dict(self.lm.model.named_modules()), self.adapter)

    def estimate_bytes(self) -> int:
        return sum((A.numel() + B.numel()) * 4 for B, A in self.adapter.values()) + (1 << 20)

    def write(self, tmp: Path, progress: Optional[ProgressFn], stop_check: StopCheck) -> None:
        from safetensors.torch import save_file

        ranks: dict[str, int] = {}
        for w, (B, A) in self.adapter.items():
            module = w[: -len(".weight")]
            self.tensors[f"base_model.model.{module}.lora_A.weight"] = A.float().contiguous()
            self.tensors[f"base_model.model.{module}.lora_B.weight"] = B.contiguous()
            ranks[module] = int(A.shape[0])
        stop_check("while summing")
        r = max(set(ranks.values()), key=list(ranks.values()).count)
        if self.transposed and len(self.transposed) != len(self.adapter):
            raise ExportError(f"This {self.lm.model_type} model mixes linear layers stored [out, in] and [in, out] "
                              "(Conv1D) in one mix, which one LoRA adapter's fan_in_fan_out flag cannot describe. "
                              "Export a merged checkpoint with --format hf instead.")
        pattern = {m: k for m, k in ranks.items() if k != r}
        base = self.lm.base_ref()
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": r, "lora_alpha": r, "rank_pattern": pattern, "alpha_pattern": pattern,  # scaling = alpha / r = 1
            "target_modules": sorted(ranks), "lora_dropout": 0.0, "bias": "none",
            "fan_in_fan_out": bool(self.transposed),
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "layers_to_transform": None,
        }
        note(progress, "Writing the adapter...")
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(self.tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        if self.lm.source.kind in ("gguf", "embedded"):
            self.notes.append(f"The base is a GGUF file; load the adapter onto its de-quantized copy at {base}.")

    def verify(self, tmp: Path) -> dict:
        from safetensors.torch import load_file

        back = load_file(str(tmp / "adapter_model.safetensors"))
        worst = scale = 0.0
        for w in self.adapter:
            module = w[: -len(".weight")]
            got = back[f"base_model.model.{module}.lora_B.weight"] @ back[f"base_model.model.{module}.lora_A.weight"]
            got = got.T if w in self.transposed else got  # as PEFT merges it into a weight stored [in, out]
            want = self.mix.weight_delta(w)
            worst = max(worst, max_diff(got, want))
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

{base_lines(manifest)}
## Directions and weights

{mix_lines(manifest)}

## Loading

```python
from peft import PeftModel
from transformers import AutoModelForCausalLM

base = AutoModelForCausalLM.from_pretrained("path/to/the/base/model")
model = PeftModel.from_pretrained(base, "path/to/this/folder")
merged = model.merge_and_unload()  # optional: a plain model
```
"""
