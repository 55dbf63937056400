"""``hf``: the mixed checkpoint theta0 + sum_k alpha_k tau_k as a Hugging Face folder (safetensors, sharded above
``max_shard_size``; config, generation config, tokenizer with its chat template, a model card and a ``mix.yaml``
in task-arithmetic terms). From a GGUF base the export is the de-quantized model. Steering vectors can be
*baked* into it where the architecture has an MLP bias (Llama's ``mlp_bias``): the down projection of a block
writes straight into the residual stream, so its bias adds a constant to the block's output at every position,
which is what a steering vector does.

Checked before it is kept: strided samples of every tensor, reloaded, are the bits written; and the reloaded
model's logits on a fixed prompt match the studio's mixed model within ``MIX_TOLERANCE`` (same dtype).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Optional

import torch

from engine.directions import Mix
from engine.export.base import MANIFEST, ExportError, StopCheck, Writer, base_lines, max_diff, mix_lines, names, sample
from engine.hooks import is_linear
from engine.models import LoadedModel
from engine.progress import ProgressFn, note

VERIFY_PROMPT = "Explain in two sentences why the sky is blue."
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Against the studio's model (same dtype): exact for weight mixes; a baked steering bias adds inside the MLP's
# sum rather than after the block, so the rounding order differs (4.8e-5 measured on the embedded model, fp32).
READ_BACK_TOLERANCE = 0.0  # weights read back are the bits written
MIX_TOLERANCE = {"float32": 1e-3, "bfloat16": 0.1, "float16": 0.05}
# With steering baked in: also within 1% of what the steering does to the logits (a model whose logits are small, or
# a bias that reaches the residual stream scaled, would otherwise pass the absolute bound above).
BAKE_RELATIVE, BAKE_FLOOR = 1e-2, 1e-5


class HFWriter(Writer):
    format = "hf"

    def __init__(self, lm: LoadedModel, mix: Mix, mixer, bake: bool = False, dtype: Optional[str] = None,
                 max_shard_size: str = "2GB"):
        super().__init__(lm, mix)
        self.mixer, self.bake = mixer, bake
        if dtype not in (None, "auto") and dtype not in DTYPES:
            raise ExportError(f"Export dtype must be one of {', '.join(DTYPES)}, not {dtype!r}.")
        self.dtype = DTYPES[dtype] if dtype in DTYPES else lm.dtype
        self.max_shard_size = max_shard_size
        self._reference: Optional[torch.Tensor] = None  # the studio's mixed model on a fixed prompt
        self._unsteered: Optional[torch.Tensor] = None  # the same without the steering (when it is baked)
        self._targets: dict[int, tuple[str, float]] = {}  # steered block -> (the bias carrying it, divisor); validate()
        self._written: dict[str, torch.Tensor] = {}  # strided samples of every tensor as it was written

    def validate(self) -> None:
        if self.mix.steering and not self.bake:
            raise ExportError(
                f"The mix includes steering vectors ({names(self.mix.steering)}), which act on activations, not weights. Export them as "
                "llama.cpp control vectors (--format controlvector), set their weights to 0, or bake them into the "
                "checkpoint as an MLP bias (--bake-steering; in the studio, 'Bake steering vectors'), which Llama-style "
                "models can carry.")
        if self.mix.steering:
            self._targets = self._bias_targets()  # refuses an architecture that cannot carry the bias
            self.notes.append("Steering is baked in as the down-projection bias of the steered blocks, so it acts at "
                              "every position (prompt and reply).")
        if self.lm.source.kind in ("gguf", "embedded"):
            self.notes.append("The base model came from a GGUF file: these weights are its de-quantized values.")

    def _bias_targets(self) -> dict[int, tuple[str, float]]:
        """Steered block -> (the bias that writes straight into its residual stream, what to divide the vector by).

        The MLP's output layer (``mlp.down_proj``, GPT-2's ``mlp.c_proj``, GPT-NeoX's ``mlp.dense_4h_to_h``) adds its
        bias to the block's output at every position: its own bias where it has one, else a new one where the
        config can ask for it (``mlp_bias``). Granite scales the MLP's output by ``residual_multiplier`` before the
        residual add, so the bias is the vector divided by it. Refused, with the reason: a norm after the MLP
        (Gemma 2/3, OLMo 2 rescale the bias per token), a mixture-of-experts block, no bias to be had."""
        config, kind = self.lm.config, self.lm.model_type
        blocks = self.lm.decoder_layers()
        prefix = self.lm.decoder_prefix()
        factor = float(getattr(config, "residual_multiplier", None) or 1.0)
        out = {}
        for layer in self.mix.steering.activation_deltas():
            block = blocks[layer]
            if hasattr(block, "post_feedforward_layernorm"):
                raise ExportError(f"A {kind} block normalizes the MLP's output (post_feedforward_layernorm) before adding it "
                                  "to the residual stream, so a bias inside the MLP would be rescaled token by token and "
                                  "would not act as the steering vector does. Export the steering vectors with --format "
                                  "controlvector, or set their weights to 0.")
            mlp = getattr(block, "mlp", None)
            part = next((n for n in ("down_proj", "c_proj", "dense_4h_to_h") if is_linear(getattr(mlp, n, None))), None)
            if part is None:
                raise ExportError(f"Block {layer} of this {kind} model has no single MLP output layer to carry a bias "
                                  f"({type(mlp).__name__}; mixture-of-experts blocks have none); the steering cannot be "
                                  "baked. Export it with --format controlvector instead.")
            if getattr(mlp, part).bias is None and not hasattr(config, "mlp_bias"):
                raise ExportError(f"A {kind} model's MLP has no bias, and its config cannot add one (no mlp_bias), so "
                                  "there is nothing to carry a steering vector; export the steering vectors with "
                                  "--format controlvector instead.")
            out[layer] = (f"{prefix}.{layer}.mlp.{part}.bias", factor)
        return out

    def estimate_bytes(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return int(self.lm.n_params * elem * 1.02) + (64 << 20)

    def _fixed_input(self) -> torch.Tensor:
        return torch.tensor([self.lm.prompt_ids(VERIFY_PROMPT)], device=self.lm.device)

    @torch.no_grad()
    def write(self, tmp: Path, progress: Optional[ProgressFn], stop_check: StopCheck) -> None:
        from transformers import AutoModelForCausalLM

        lm = self.lm
        before_positions = self.mixer.positions
        note(progress, "Applying the mix to the weights...")
        with self.mixer.applied([self.mix.weights], merge=True):  # the weights written are the merged ones
            try:
                self.mixer.positions = "all"  # what a baked bias does
                self._reference = lm.model(self._fixed_input()).logits.float().cpu()
            finally:
                self.mixer.positions = before_positions
            if self.mix.steering:  # what the steering alone does to the logits: the baked bias must do the same
                with self.mixer.applied([self.mix.weight_space.weights], merge=True):
                    self._unsteered = lm.model(self._fixed_input()).logits.float().cpu()
            stop_check("while applying the mix")
            config = copy.deepcopy(lm.config)
            if hasattr(config, "quantization_config"):
                del config.quantization_config
            state = {k: v.detach() for k, v in lm.model.state_dict().items()}
            targets = self._targets
            if any(name not in state for name, _ in targets.values()):
                config.mlp_bias = True  # the architecture's own switch for MLP biases (zeros where not steered)
            with torch.device("meta"):
                plain = AutoModelForCausalLM.from_config(config, dtype=self.dtype)
            wanted = dict(plain.named_parameters(remove_duplicate=False))
            if self.mix.steering:
                for name, p in wanted.items():  # zero biases where the base had none
                    if name not in state and name.endswith(".bias"):
                        state[name] = torch.zeros(p.shape, dtype=self.dtype, device=lm.device)
                deltas = self.mix.steering.activation_deltas()
                for layer, (name, factor) in targets.items():
                    delta = deltas[layer].to(device=lm.device).float() / factor
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
            self._written = {k: sample(v) for k, v in state.items() if v.is_floating_point()}  # what the files must give back
            note(progress, "Writing safetensors shards...")
            stop_check("before writing the weights")
            plain.save_pretrained(str(tmp), max_shard_size=self.max_shard_size)
            del plain, state
        stop_check("after writing the weights")
        note(progress, "Writing the tokenizer and chat template...")
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
                        "tsdpo": {k: v for k, v in d.describe().items() if k in ("objective", "kind", "method", "param")}}
                       for n, d, a in self.mix.weight_space.terms],
        }
        header = ("# theta = theta0 + sum_k weight_k * tau_k  (linear / task arithmetic, no normalization).\n"
                  "# Each `model` here is a tsdpo direction file holding tau_k itself (a weight delta, full or B @ A0),\n"
                  "# not a fine-tuned checkpoint: merge tools that expect checkpoints need theta0 + tau_k per entry.\n")
        if self.mix.steering:
            doc["steering_baked_as_bias"] = [{"name": n, "weight": a, "layers": sv.steered_layers()}
                                             for n, sv, a in self.mix.steering.terms]
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
        read_back = max((max_diff(sample(back[k]), v) for k, v in self._written.items() if k in back), default=0.0)
        del loaded, back
        if read_back > READ_BACK_TOLERANCE:
            raise ExportError(f"The checkpoint read back from disk holds other weights than were written (max |difference| "
                              f"{read_back:.3g}); nothing was kept. The disk or the transformers version may be at fault: try "
                              "again, or export elsewhere.")
        diff = max_diff(got, self._reference)
        dtype = str(self.dtype).replace("torch.", "")
        check = {"what": "logits on a fixed prompt, reloaded with AutoModelForCausalLM vs the studio's mixed model:",
                 "result": f"max |difference| = {diff:.3g}", "max_abs_logit_diff": diff, "read_back_diff": read_back,
                 "prompt": VERIFY_PROMPT, "dtype": dtype}
        if self.dtype == self.lm.dtype:
            tolerance = MIX_TOLERANCE.get(dtype, MIX_TOLERANCE["float32"])
            if self._unsteered is not None:  # a baked bias must move the logits as the steering does, however small
                effect = max_diff(self._reference, self._unsteered)
                tolerance = min(tolerance, max(BAKE_FLOOR, BAKE_RELATIVE * effect))
                check["steering_effect"] = effect
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

{base_lines(manifest)}
## Directions and weights

{mix_lines(manifest)}

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
