"""``controlvector``: steering vectors as llama.cpp control-vector GGUF files (the mix, and each vector at weight
1), plus the same tensors in safetensors. ``direction.N`` is added to the output of 0-based block N, which is
the layer index a tsdpo steering vector already uses; llama.cpp cannot steer block 0. Checked before it is
kept: every file read back with the gguf package (names, F32, values)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from engine.export.base import ExportError, StopCheck, Writer, base_lines, max_diff, mix_lines, names, safe_name
from engine.progress import ProgressFn, note


class ControlVectorWriter(Writer):
    format = "controlvector"

    def validate(self) -> None:
        self.written: dict[str, dict[int, torch.Tensor]] = {}
        if self.mix.weight_space:
            raise ExportError("A control vector carries steering vectors only; the mix includes weight-space directions "
                              f"({names(self.mix.weight_space)}). Export those with --format hf or peft.")
        if not self.mix.steering:
            raise ExportError("The mix has no steering vector with a non-zero weight: there is no control vector to write.")
        if 0 in self.mix.activation_deltas():
            raise ExportError("The mix steers the output of block 0, which llama.cpp's control vectors cannot reach "
                              "(their layers start at 1). Rebuild the vector with --layers set to 1 or higher.")
        self.notes.append("llama.cpp adds a control vector at every position (prompt and reply).")

    def estimate_bytes(self) -> int:
        return 4 * self.lm.hidden_size * self.lm.n_layers * (len(self.mix.terms) + 2) + (1 << 20)

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

    def write(self, tmp: Path, progress: Optional[ProgressFn], stop_check: StopCheck) -> None:
        from safetensors.torch import save_file

        note(progress, "Writing control vectors...")
        mixed = self.mix.activation_deltas()
        self.written["mix.gguf"] = mixed
        self._write_gguf(tmp / "mix.gguf", mixed)
        meta = {"model_hint": self.lm.model_type, "layer_count": str(len(mixed)),
                "mapping": "direction.N is added to the output of 0-based decoder block N (HF hidden_states[N+1])"}
        save_file({f"direction.{l}": v.contiguous() for l, v in mixed.items()}, str(tmp / "mix.safetensors"), metadata=meta)
        for name, sv, _ in self.mix.terms:
            stop_check("while writing the single vectors")
            single = (sv * 1.0).activation_deltas()
            fname = f"{safe_name(name)}.gguf"
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
                worst = max(worst, max_diff(torch.from_numpy(t.data.copy()).reshape(-1), v.cpu().float()))
        if worst != 0.0:  # F32 written and read as F32: the values are the same bits
            raise ExportError(f"The control vectors read back from disk differ from the mix by {worst:.3g}; nothing was "
                              "kept. Check the weights of the mix, and the disk.")
        return {"what": f"{len(self.written)} GGUF file(s) read back with the gguf package (names, F32, values):",
                "result": f"max |difference| = {worst:.3g}", "max_abs_value_diff": worst}

    def card(self, manifest: dict) -> str:
        singles = " ".join(f"--control-vector-scaled {safe_name(n)}.gguf {a:g}" for n, _, a in self.mix.terms)
        layers = sorted(self.mix.activation_deltas())
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

{base_lines(manifest)}
## Directions and weights

{mix_lines(manifest)}

## Using them with llama.cpp

```sh
llama-cli -m model.gguf --control-vector mix.gguf
# the same mix from the single vectors:
llama-cli -m model.gguf {singles}
```
"""
