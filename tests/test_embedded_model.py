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
    from engine.directions import load_direction
    from studio.main_window import DEMO_DIRECTIONS

    lm = load_model()
    files = sorted(DEMO_DIRECTIONS.glob("*.safetensors"))
    assert [f.name for f in files] == ["helpfulness.steer.safetensors", "verbosity.steer.safetensors"]
    for f in files:
        d = load_direction(f, lm)
        assert d.kind == "steering" and d.model["fingerprint"] == lm.fingerprint


def test_first_launch_binds_the_demo_directions(qtbot, cache, tmp_path):
    from PySide6.QtCore import QSettings

    from engine.store import Store
    from studio.main_window import MainWindow

    w = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.IniFormat), store=Store(tmp_path / "s.db"))
    qtbot.addWidget(w)
    w.show()
    w.load_model(None)
    qtbot.waitUntil(lambda: len(w.directions) == 2 and not w.busy_with, timeout=120000)
    assert {w.plane.plane.x.direction, w.plane.plane.y.direction} == {"helpfulness", "verbosity"}
    w.close()
