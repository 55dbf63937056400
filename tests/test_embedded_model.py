"""Integration: the embedded SmolLM2-135M-Instruct GGUF, converted once, then served from the cache."""

import pytest

from engine.cli import main
from engine.generation import SamplingParams, generate
from engine.models import load_model

pytestmark = pytest.mark.embedded


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("embedded-cache")


@pytest.fixture
def cache(embedded_cache, monkeypatch):
    monkeypatch.setenv("TSDPO_CACHE_DIR", str(embedded_cache))
    return embedded_cache


def test_embedded_model_converts_once_then_loads_from_cache(capsys, cache):
    first = load_model()
    assert not first.from_cache
    assert (first.n_layers, first.hidden_size, first.model_type) == (30, 576, "llama")
    cached = first.folder
    assert (cached / "config.json").is_file() and list(cached.glob("*.safetensors"))
    assert not list(cached.glob("*.bin"))

    assert main(["model", "load"]) == 0
    out = capsys.readouterr().out
    assert f"fingerprint   {first.fingerprint}" in out and "from cache" in out
    second = load_model()
    assert second.from_cache and second.fingerprint == first.fingerprint
    assert second.load_seconds < 10

    result = generate(second, "What is the capital of France?", SamplingParams(max_new_tokens=16))
    assert result.n_tokens > 0 and "Paris" in result.text


def test_demo_directions_belong_to_the_embedded_model(cache):
    from engine.loading import load_direction
    from studio.main_window import DEMO_DIRECTIONS, DEMO_TANGENTS

    lm = load_model()
    files = sorted(DEMO_DIRECTIONS.glob("*.safetensors"))
    assert [f.name for f in files] == sorted([*(f"{n}.tsdpo.safetensors" for n in DEMO_TANGENTS),
                                               *(f"{n}.steer.safetensors" for n in DEMO_TANGENTS)])
    for f in files:
        d = load_direction(f, lm)
        assert d.model["fingerprint"] == lm.fingerprint
        assert d.label == ("steering" if f.name.endswith(".steer.safetensors") else "tangent")
        assert d.name == (d.objective if d.label == "tangent" else f"{d.objective}-steer")


def test_first_launch_binds_the_tangent_directions_and_their_gap_map(qtbot, cache, tmp_path):
    """At first launch the plane carries TS-DPO directions (helpfulness x, verbosity y; all three in the anchor
    layout), the linearization gap map shipped for them is drawn, and the steering vectors are a click away."""
    from PySide6.QtCore import QSettings

    from engine.store import Store
    from studio.main_window import MainWindow

    w = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.IniFormat), store=Store(tmp_path / "s.db"))
    qtbot.addWidget(w)
    w.show()
    w.load_model(None)
    qtbot.waitUntil(lambda: len(w.directions) == 3 and not w.busy_with, timeout=120000)
    assert {d.label for d in w.directions.values()} == {"tangent"}
    assert (w.plane_view.plane.x.direction, w.plane_view.plane.y.direction) == ("helpfulness", "verbosity")
    assert len(w.plane_view.trust_curve.getData()[0]) > 0  # the shipped gap map matches these directions
    assert "linearization gap · share of the change" in w.plane_view.layers
    w.plane_view.anchor_mode.setChecked(True)
    assert set(w.plane_view.plane.anchors) == {"helpfulness", "verbosity", "harmlessness"}
    w.plane_view.anchor_mode.setChecked(False)
    w.demo_steering_action.trigger()
    qtbot.waitUntil(lambda: len(w.directions) == 6 and not w.busy_with, timeout=120000)
    assert {n for n, d in w.directions.items() if d.label == "steering"} == {
        "helpfulness-steer", "verbosity-steer", "harmlessness-steer"}
    w.close()


def test_export_from_the_gguf_base_loads_in_a_fresh_process(cache, tmp_path):
    """The embedded model comes from a GGUF file: the export is de-quantized, with a tangent direction mixed
    in and a demo steering vector baked in as a bias, and plain transformers reproduces the mixed logits."""
    import json

    from engine.loading import load_direction
    from engine.export import export_mix
    from engine.mixer import Mixer
    from studio.main_window import DEMO_DIRECTIONS
    from test_export import fresh_process_logits, mixed_logits
    from tiny_model import random_tangent

    lm = load_model()
    mixer = Mixer(lm)
    mixer.add(random_tangent(lm, "tangent", 1, scale=0.02))
    mixer.add(load_direction(DEMO_DIRECTIONS / "verbosity.steer.safetensors", lm), name="verbosity")
    ids = lm.tokenizer(lm.chat_text("Name three colours."), add_special_tokens=False).input_ids
    cases = [({"tangent": 1.0}, {}, 1e-4),
             # The bias is added inside the MLP's sum, the hook after the residual add: another rounding order,
             # measured at 4.8e-5 here; the bound leaves room for another CPU's kernels.
             ({"tangent": 1.0, "verbosity": 0.8}, {"bake_steering": True}, 5e-4)]
    for i, (weights, options, bound) in enumerate(cases):
        want = mixed_logits(mixer, weights, ids)
        out = tmp_path / f"export-{i}"
        result = export_mix(lm, mixer, weights, out, **options)
        assert result.check["max_abs_logit_diff"] <= bound
        got = fresh_process_logits(out, tmp_path, ids)
        # Across processes this 30-layer fp32 model's logits now and then differ by ~5e-3 even for the base
        # weights (CPU kernels pick another code path in a fresh process; seen in 3 of ~35 runs): the exactness
        # of the files is the in-process check above; this one checks that a plain process loads them.
        assert float((got - want).abs().max()) <= max(bound, 1e-2)
        assert "de-quantized" in (out / "README.md").read_text()
        assert json.loads((out / "config.json").read_text()).get("mlp_bias", False) is bool(options)
