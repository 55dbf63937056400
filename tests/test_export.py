"""Export: each format is loaded by its own ecosystem's loader and compared with the studio's mixed model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from engine.cli import main
from engine.errors import Cancelled
from engine.export import MANIFEST, ExportError, export_mix
from engine.hooks import add_to_block_output
from engine.mixer import Mixer
from engine.models import load_model
from tiny_model import random_tangent

PROMPT_IDS = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31]

FRESH_PROCESS = r"""
import sys, torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, out, ids = sys.argv[1], sys.argv[2], [int(x) for x in sys.argv[3].split(",")]
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
AutoTokenizer.from_pretrained(folder)  # the tokenizer must load too
with torch.no_grad():
    save_file({"logits": model(torch.tensor([ids])).logits.contiguous()}, out)
"""


def fresh_process_logits(folder: Path, tmp_path: Path, ids=PROMPT_IDS) -> torch.Tensor:
    """Logits of an exported folder loaded by plain transformers in another Python process."""
    out = tmp_path / "fresh-logits.safetensors"
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder), str(out), ",".join(map(str, ids))],
                   check=True, capture_output=True, text=True, timeout=300)
    return load_file(str(out))["logits"]


@torch.no_grad()
def mixed_logits(mixer: Mixer, weights: dict, ids=PROMPT_IDS) -> torch.Tensor:
    with mixer.applied([weights]):
        return mixer.lm.model(torch.tensor([ids])).logits


@pytest.fixture
def lm(tiny_model_dir):
    return load_model(tiny_model_dir)  # a model of its own: exports apply mixes to its weights


@pytest.fixture
def saved_pair(lm, tmp_path):
    """Two low-rank tangent directions saved to files, sharing A0."""
    paths = []
    for obj, seed in (("helpfulness", 1), ("verbosity", 2)):
        paths.append(random_tangent(lm, obj, seed).save(tmp_path / f"{obj}.tangent.safetensors"))
    return paths


@pytest.fixture
def steer(tiny_vector):
    """The tiny steering vector under a name of its own (its objective is helpfulness, like the tangents)."""
    v = tiny_vector.with_settings()
    v.name = "steer"
    return v


def _mixer(lm, *directions) -> Mixer:
    m = Mixer(lm)
    for d in directions:
        m.add(d)
    return m


# ------------------------------------------------------------------------------------------ hf

def test_hf_checkpoint_loads_in_a_fresh_process_with_the_mixed_logits(lm, tmp_path):
    base_before = {n: p.clone() for n, p in lm.model.named_parameters()}
    mixer = _mixer(lm, random_tangent(lm, "helpfulness", 1), random_tangent(lm, "verbosity", 2, param="full", scale=0.5))
    weights = {"helpfulness": 0.8, "verbosity": -0.6}
    want = mixed_logits(mixer, weights)
    result = export_mix(lm, mixer, weights, tmp_path / "export", max_shard_size="40KB", point=(0.8, -0.6))

    out = tmp_path / "export"
    assert len(list(out.glob("model-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "README.md", "mix.yaml", MANIFEST):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(tmp_path.glob(".export.*"))
    got = fresh_process_logits(out, tmp_path)
    assert float((got - want).abs().max()) <= 1e-4
    assert float((want - mixed_logits(mixer, {})).abs().max()) > 1e-2  # the mix really changes the model
    assert result.check["max_abs_logit_diff"] <= 1e-4

    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == \
        lm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)

    card = (out / "README.md").read_text()
    assert lm.fingerprint in card and "helpfulness" in card and "+0.8" in card and "from_pretrained" in card
    assert "(+0.800, -0.600)" in card
    doc = yaml.safe_load((out / "mix.yaml").read_text())
    assert doc["merge_method"] == "task_arithmetic"
    assert {m["tsdpo"]["objective"]: m["parameters"]["weight"] for m in doc["models"]} == weights
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["weights"] == weights and manifest["base_model"]["fingerprint"] == lm.fingerprint
    # The live model is back at its base weights after the export.
    assert all(torch.equal(p, base_before[n]) for n, p in lm.model.named_parameters())


def test_hf_export_records_direction_files_by_hash(lm, saved_pair, tmp_path):
    from engine.directions import file_sha256
    from engine.loading import load_direction

    mixer = _mixer(lm, *(load_direction(p, lm) for p in saved_pair))
    export_mix(lm, mixer, {"helpfulness": 0.5, "verbosity": 0.0}, tmp_path / "e")
    manifest = json.loads((tmp_path / "e" / MANIFEST).read_text())
    assert [d["name"] for d in manifest["directions"]] == ["helpfulness"]  # zero weights are not part of the mix
    assert manifest["directions"][0]["sha256"] == file_sha256(saved_pair[0])


def test_steering_baked_as_mlp_bias_gives_the_steered_logits(lm, steer, tmp_path):
    mixer = _mixer(lm, steer, random_tangent(lm, "helpfulness", 1))
    weights = {steer.name: 0.9, "helpfulness": 0.4}
    want = mixed_logits(mixer, weights)
    assert float((want - mixed_logits(mixer, {"helpfulness": 0.4})).abs().max()) > 1e-3  # the steering matters
    with pytest.raises(ExportError, match="--bake-steering"):
        export_mix(lm, mixer, weights, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    export_mix(lm, mixer, weights, tmp_path / "baked", bake_steering=True)
    config = json.loads((tmp_path / "baked" / "config.json").read_text())
    assert config["mlp_bias"] is True
    got = fresh_process_logits(tmp_path / "baked", tmp_path)
    assert float((got - want).abs().max()) <= 1e-4


def test_a_bake_that_misses_the_steering_fails_the_export(lm, steer, tmp_path, monkeypatch):
    """The reload check is relative to what the steering does to the logits: a bias reaching the residual stream
    scaled (what Granite's residual_multiplier does to a naive bake) is an error, not a note, and nothing is kept,
    however small the model's logits."""
    from engine.export.hf import HFWriter

    targets = HFWriter._bias_targets
    monkeypatch.setattr(HFWriter, "_bias_targets", lambda self: {l: (n, f / 0.22) for l, (n, f) in targets(self).items()})
    mixer = _mixer(lm, steer)
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    with pytest.raises(ExportError, match="does not reproduce") as info:
        export_mix(lm, mixer, {steer.name: 0.001}, tmp_path / "wrong", bake_steering=True)
    assert not (tmp_path / "wrong").exists()
    import re

    from engine.export.hf import MIX_TOLERANCE

    missed = float(re.search(r"differ by up to ([0-9.e+-]+)", str(info.value)).group(1))
    assert missed < MIX_TOLERANCE["float32"]  # a weight this small passed the absolute bound alone
    assert not mixer.active and all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())


def test_hf_export_in_bfloat16(lm, tmp_path):
    mixer = _mixer(lm, random_tangent(lm, "helpfulness", 1))
    result = export_mix(lm, mixer, {"helpfulness": 1.0}, tmp_path / "bf16", dtype="bfloat16")
    tensors = load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert result.check["dtype"] == "bfloat16" and result.check["max_abs_logit_diff"] < 0.5


# ------------------------------------------------------------------------------------------ peft

def test_peft_adapter_reproduces_the_lowrank_mix(lm, tiny_model_dir, saved_pair, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from engine.loading import load_direction

    mixer = _mixer(lm, *(load_direction(p, lm) for p in saved_pair))
    weights = {"helpfulness": 0.7, "verbosity": -1.3}
    want = mixed_logits(mixer, weights)
    result = export_mix(lm, mixer, weights, tmp_path / "adapter", format="peft")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == 4
    assert result.check["max_abs_weight_diff"] < 1e-6

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter")
    with torch.no_grad():
        got = model(torch.tensor([PROMPT_IDS])).logits
        assert float((got - want).abs().max()) <= 1e-5
        merged = model.merge_and_unload()
        assert float((merged(torch.tensor([PROMPT_IDS])).logits - want).abs().max()) <= 1e-5


def test_peft_refuses_what_one_adapter_cannot_hold(lm, steer, tmp_path):
    cases = [
        (random_tangent(lm, "full", 1, param="full"), "full-rank"),
        (random_tangent(lm, "other", 2, a0_seed=7), "another shared A0"),
        (steer, "steering vectors"),
    ]
    for direction, message in cases:
        mixer = _mixer(lm, random_tangent(lm, "helpfulness", 1), direction)
        with pytest.raises(ExportError, match=message):
            export_mix(lm, mixer, {"helpfulness": 1.0, direction.name: 0.5}, tmp_path / "x", format="peft")
        assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------ control vectors

def test_control_vector_gguf_reads_back_and_steers_like_the_mixer(lm, steer, tmp_path):
    import gguf

    second = steer.with_settings(layers=[1, 2])
    second.name = "other"
    mixer = _mixer(lm, steer, second)
    weights = {steer.name: 0.8, "other": -0.5}
    export_mix(lm, mixer, weights, tmp_path / "cv", format="controlvector")

    reader = gguf.GGUFReader(str(tmp_path / "cv" / "mix.gguf"))
    assert reader.get_field("general.architecture").contents() == "controlvector"
    assert reader.get_field("controlvector.model_hint").contents() == "llama"
    assert reader.get_field("controlvector.layer_count").contents() == 2
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {"direction.1", "direction.2"}
    for t in tensors.values():
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and t.data.shape == (lm.hidden_size,)
    values = {int(n.split(".")[1]): torch.from_numpy(t.data.copy()) for n, t in tensors.items()}

    # Each single vector at weight 1, scaled as llama.cpp's --control-vector-scaled would, sums to the mix.
    singles = {}
    for name, w in weights.items():
        r = gguf.GGUFReader(str(tmp_path / "cv" / f"{name}.gguf"))
        for t in r.tensors:
            l = int(t.name.split(".")[1])
            singles[l] = singles.get(l, 0) + w * torch.from_numpy(t.data.copy())
    assert all(torch.allclose(singles[l], values[l], atol=1e-6) for l in values)
    st = load_file(str(tmp_path / "cv" / "mix.safetensors"))
    assert all(torch.equal(st[f"direction.{l}"], values[l]) for l in values)

    # direction.N added to the output of block N gives the mixer's logits: the block mapping is right.
    want = mixed_logits(mixer, weights)
    blocks = lm.decoder_layers()
    handles = [add_to_block_output(blocks[l], v) for l, v in values.items()]
    try:
        with torch.no_grad():
            got = lm.model(torch.tensor([PROMPT_IDS])).logits
    finally:
        for h in handles:
            h.remove()
    assert float((got - want).abs().max()) <= 1e-5


def test_control_vector_refuses_block_zero_and_weight_directions(lm, steer, tmp_path):
    at_zero = steer.with_settings(layers=[0])
    with pytest.raises(ExportError, match="block 0"):
        export_mix(lm, _mixer(lm, at_zero), {at_zero.name: 1.0}, tmp_path / "a", format="controlvector")
    mixer = _mixer(lm, steer, random_tangent(lm, "helpfulness", 1))
    with pytest.raises(ExportError, match="steering vectors only"):
        export_mix(lm, mixer, {steer.name: 1.0, "helpfulness": 1.0}, tmp_path / "b", format="controlvector")
    with pytest.raises(ExportError, match="no steering vector"):
        export_mix(lm, mixer, {steer.name: 0.0}, tmp_path / "c", format="controlvector")


# ------------------------------------------------------------------------------------------ safety

def test_exports_and_direction_files_are_readable_as_plain_files_would_be(lm, steer, tmp_path, monkeypatch):
    """safetensors writes its files 0600; an export or a direction in a shared folder must be readable by whoever
    the umask lets read a plain file (a server run as another user), as every other file of the export is."""
    import os
    import stat

    from engine.paths import current_umask

    old = os.umask(0o022)
    try:
        assert current_umask() == 0o022
        tangent = random_tangent(lm, "helpfulness", 1)
        mixer = _mixer(lm, tangent)
        export_mix(lm, mixer, {"helpfulness": 1.0}, tmp_path / "hf")
        export_mix(lm, mixer, {"helpfulness": 1.0}, tmp_path / "peft", format="peft")
        export_mix(lm, _mixer(lm, steer), {steer.name: 1.0}, tmp_path / "cv", format="controlvector")
        saved = tangent.save(tmp_path / "d.tsdpo.safetensors")
        files = [saved, *(f for d in ("hf", "peft", "cv") for f in (tmp_path / d).rglob("*"))]
        weights = [f for f in files if f.suffix == ".safetensors"]
        assert len(weights) >= 4  # model, adapter, control-vector mix, direction
        for f in files:
            want = 0o755 if f.is_dir() else 0o644
            assert stat.S_IMODE(f.stat().st_mode) == want, f
        for d in ("hf", "peft", "cv"):
            assert stat.S_IMODE((tmp_path / d).stat().st_mode) == 0o755
        # a file system that refuses chmod (FAT, some shares) still gets the export, whole
        monkeypatch.setattr(os, "chmod", lambda *a, **k: (_ for _ in ()).throw(PermissionError(1, "not supported")))
        export_mix(lm, mixer, {"helpfulness": 1.0}, tmp_path / "nochmod", format="peft")
        assert (tmp_path / "nochmod" / "adapter_model.safetensors").is_file()
        monkeypatch.undo()
        os.umask(0o077)  # a user who wants private files still gets them
        private = tangent.save(tmp_path / "private.tsdpo.safetensors")
        assert stat.S_IMODE(private.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_existing_folder_is_refused_unless_overwrite_and_replaced_whole(lm, tmp_path):
    mixer = _mixer(lm, random_tangent(lm, "helpfulness", 1))
    out = tmp_path / "e"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists and is not empty"):
        export_mix(lm, mixer, {"helpfulness": 1.0}, out)
    assert (out / "keep.txt").read_text() == "mine"
    export_mix(lm, mixer, {"helpfulness": 1.0}, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["e"]  # no temporary or old folder left
    (tmp_path / "empty").mkdir()
    export_mix(lm, mixer, {"helpfulness": 1.0}, tmp_path / "empty")  # an empty folder is fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_mix(lm, mixer, {"helpfulness": 1.0}, tmp_path / "file")


def test_a_failed_or_stopped_export_leaves_nothing_and_keeps_the_old_export(lm, tmp_path, monkeypatch):
    mixer = _mixer(lm, random_tangent(lm, "helpfulness", 1))
    out = tmp_path / "e"
    export_mix(lm, mixer, {"helpfulness": 1.0}, out)
    before = (out / "model.safetensors").read_bytes()

    with pytest.raises(Cancelled):
        export_mix(lm, mixer, {"helpfulness": -1.0}, out, overwrite=True, should_stop=lambda: True)
    from transformers import PreTrainedModel

    def no_space(self, *a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", no_space)
    with pytest.raises(ExportError, match="ran out of space"):
        export_mix(lm, mixer, {"helpfulness": -1.0}, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]
    assert all(torch.equal(p, q) for p, q in zip(lm.model.parameters(), load_model(lm.folder).model.parameters()))


def test_too_little_free_space_is_reported_before_writing(lm, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    mixer = _mixer(lm, random_tangent(lm, "helpfulness", 1))
    with pytest.raises(ExportError, match=r"needs about .* but .* has 1.0 MB free"):
        export_mix(lm, mixer, {"helpfulness": 1.0}, tmp_path / "e")
    assert not (tmp_path / "e").exists()


# ------------------------------------------------------------------------------------------ CLI

def test_cli_export_from_files_and_from_a_session_point(tiny_model_dir, saved_pair, tmp_path, capsys):
    from engine.plane import Axis, PreferencePlane
    from engine.store import Store

    db = tmp_path / "s.db"
    code = main(["export", "--model", str(tiny_model_dir), "--mix", f"{saved_pair[0]}=0.5,{saved_pair[1]}=-1",
                 "--out", str(tmp_path / "a"), "--format", "peft", "--db", str(db)])
    assert code == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "format   peft" in out and "max |difference|" in out
    assert json.loads((tmp_path / "a" / MANIFEST).read_text())["weights"] == {"helpfulness": 0.5, "verbosity": -1.0}

    assert main(["export", "--model", str(tiny_model_dir), "--mix", f"{saved_pair[0]}=1", "--out", str(tmp_path / "a"),
                 "--db", str(db)]) == 2
    assert "already exists" in capsys.readouterr().err

    lm = load_model(tiny_model_dir)
    store = Store(db)
    plane = PreferencePlane(Axis("helpfulness", scale=2.0), Axis("verbosity"))
    s = store.create_session("mine", lm.source.to_json(), lm.fingerprint,
                             {"directions": [{"name": "helpfulness", "path": str(saved_pair[0])},
                                             {"name": "verbosity", "path": str(saved_pair[1])}],
                              "plane": plane.to_json(), "point": [0.1, 0.2]})
    assert main(["export", "--session", str(s.id), "--point", "0.25,-0.5", "--out", str(tmp_path / "b"),
                 "--db", str(db), "--model", str(tiny_model_dir)]) == 0
    manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    assert manifest["point"] == [0.25, -0.5] and manifest["weights"] == {"helpfulness": 0.5, "verbosity": -0.5}
    assert main(["export", "--session", str(s.id), "--out", str(tmp_path / "c"), "--db", str(db),
                 "--model", str(tiny_model_dir)]) == 0  # the session's saved point
    assert json.loads((tmp_path / "c" / MANIFEST).read_text())["point"] == [0.1, 0.2]
    capsys.readouterr()

    assert main(["export", "--out", str(tmp_path / "d")]) == 2
    assert "either --mix" in capsys.readouterr().err


def test_cli_export_refuses_a_session_of_another_model(tiny_model_dir, other_tiny_dir, saved_pair, tmp_path, capsys):
    from engine.store import Store

    db = tmp_path / "s.db"
    lm = load_model(tiny_model_dir)
    s = Store(db).create_session("mine", lm.source.to_json(), lm.fingerprint,
                                 {"directions": [{"name": "helpfulness", "path": str(saved_pair[0])}]})
    assert main(["export", "--session", str(s.id), "--out", str(tmp_path / "x"), "--db", str(db),
                 "--model", str(other_tiny_dir)]) == 2
    assert "made with another model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
