import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.errors import ModelLoadError
from engine.models import (ModelSource, gguf_cache_folder, load_model, pick_device, pick_dtype, resolve_source,
                           weights_fingerprint)

VENV_BIN = Path(sys.executable).parent


def test_resolve_source_kinds(tiny_model_dir, tmp_path):
    assert resolve_source(None).kind == "embedded"
    assert resolve_source(tiny_model_dir) == ModelSource("folder", str(tiny_model_dir.resolve()))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert resolve_source(gguf).kind == "gguf"
    assert resolve_source("HuggingFaceTB/SmolLM2-135M-Instruct") == ModelSource("hub", "HuggingFaceTB/SmolLM2-135M-Instruct")


@pytest.mark.parametrize("bad, words", [
    ("/no/such/model", "does not exist"),
    ("./missing-folder", "does not exist"),
    ("weights.gguf", "does not exist"),
])
def test_missing_paths_are_named(bad, words):
    with pytest.raises(ModelLoadError, match=words):
        resolve_source(bad)


def test_wrong_kind_of_path(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelLoadError, match="not a .gguf model"):
        resolve_source(tmp_path / "notes.txt")
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_source(tmp_path)


def test_load_folder_describes_model(tiny_lm):
    info = tiny_lm.describe()
    assert (info["layers"], info["hidden_size"], info["model_type"]) == (3, 32, "llama")
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert len(tiny_lm.decoder_layers()) == 3
    assert not any(p.requires_grad for p in tiny_lm.model.parameters())
    assert tiny_lm.chat_text("hi").endswith("<|im_start|>assistant\n")


def test_fingerprint_is_stable_and_dtype_independent(tiny_model_dir, tiny_lm):
    again = load_model(tiny_model_dir)
    assert again.fingerprint == tiny_lm.fingerprint
    bf16 = load_model(tiny_model_dir, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    assert bf16.fingerprint == tiny_lm.fingerprint


def test_fingerprint_changes_when_weights_change(tiny_lm):
    model = tiny_lm.model
    before = weights_fingerprint(model)
    w = model.model.layers[1].mlp.down_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w.add_(1e-2 * torch.randn_like(w))
    try:
        assert weights_fingerprint(model) != before
    finally:
        with torch.no_grad():
            w.copy_(saved)
    assert weights_fingerprint(model) == before


def test_pickle_only_folder_is_refused(tiny_model_dir, tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="only pickle weights"):
        load_model(folder)


def test_corrupt_weights_give_clear_error(tiny_model_dir, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ModelLoadError, match="Could not load corrupt"):
        load_model(folder)


def test_remote_code_stays_off(tiny_model_dir, tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    (folder / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tsdpo-custom", auto_map={"AutoConfig": "modeling_custom.C",
                                                       "AutoModelForCausalLM": "modeling_custom.M"})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(folder)
    assert not marker.exists()


def test_device_and_dtype_choice():
    assert pick_device("auto").type in ("cpu", "cuda", "mps")
    assert pick_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="no CUDA GPU"):
            pick_device("cuda")
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(ModelLoadError, match="Unknown dtype"):
        pick_dtype("int3", torch.device("cpu"))


def test_gguf_cache_key_follows_file_content(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF" + b"\x01" * 1000)
    first = gguf_cache_folder(f)
    assert gguf_cache_folder(f) == first
    f.write_bytes(b"GGUF" + b"\x02" * 1000)
    assert gguf_cache_folder(f) != first


def test_damaged_gguf_gives_clear_error(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + os.urandom(256))
    with pytest.raises(ModelLoadError, match="Could not read .*broken.gguf as a GGUF model"):
        load_model(f)
    assert not any((tmp_path / "cache").rglob("config.json")), "nothing half-converted may be left in the cache"


def _hub_cache_with(tiny_model_dir: Path, root: Path, repo: str) -> Path:
    """Lay out a Hugging Face hub cache holding ``repo``, as a download would leave it."""
    base = root / f"models--{repo.replace('/', '--')}"
    snap = base / "snapshots" / "0123456789abcdef"
    shutil.copytree(tiny_model_dir, snap)
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text("0123456789abcdef")
    return root


def _cli(args, env_extra=None, **kw):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([str(VENV_BIN / "tsdpo"), *args], capture_output=True, text=True, env=env, timeout=300, **kw)


def test_hub_id_loads_through_the_hub_cache(tiny_model_dir, tmp_path):
    hub = _hub_cache_with(tiny_model_dir, tmp_path / "hub", "tiny-org/tiny-llama")
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    r = _cli(["model", "load", "tiny-org/tiny-llama", "--json"], env)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["source"] == {"kind": "hub", "ref": "tiny-org/tiny-llama"}
    assert info["layers"] == 3
    r = _cli(["model", "load", "tiny-org/not-there"], env)
    assert r.returncode == 2
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("tsdpo: error:") and "not reachable on the model hub" in last
