"""Integration: the embedded SmolLM2-135M-Instruct GGUF, converted once, then served from the cache."""

import pytest

from engine.cli import main
from engine.generation import SamplingParams, generate
from engine.models import load_model

pytestmark = pytest.mark.embedded


def test_embedded_model_converts_once_then_loads_from_cache(capsys):
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
