"""The direction protocol: a direction times a weight is a Mix, mixes add, and the mixer, the export's adapter and
the linearization gap all read the same sum_k alpha_k delta_k from it."""

import json

import pytest
import torch
from safetensors.torch import save_file

from engine.directions import FORMAT_KEY, META_KEY, DirectionError, Mix
from engine.loading import open_direction
from engine.mixer import Mixer
from tiny_model import random_tangent


def test_mix_arithmetic(tiny_lm, tiny_vector):
    a = random_tangent(tiny_lm, "a", seed=1)
    b = random_tangent(tiny_lm, "b", seed=2)
    m = a * 0.5 + b * -1.0 + 0.25 * a
    assert m.weights == {"a": 0.75, "b": -1.0}
    assert (m + a * -0.75).weights == {"b": -1.0}  # a term that cancels leaves the mix
    assert (2 * m).weights == {"a": 1.5, "b": -2.0} and not (a * 0.0)
    assert m.weight_space.weights == m.weights and not m.steering
    both = m + tiny_vector * 1.0
    assert both.steering.names() == [tiny_vector.name] and both.weight_space.names() == ["a", "b"]
    twin = random_tangent(tiny_lm, "a", seed=3)  # another direction under a name already in the mix
    with pytest.raises(DirectionError, match="both named 'a'"):
        m + twin * 1.0
    with pytest.raises(DirectionError, match="finite"):
        Mix.of({"a": a}, {"a": float("nan")})
    with pytest.raises(DirectionError, match="No loaded direction named z"):
        Mix.of({"a": a}, {"z": 1.0})


def test_the_sum_is_the_same_for_the_mixer_the_adapter_and_by_hand(tiny_lm):
    a = random_tangent(tiny_lm, "a", seed=1)
    b = random_tangent(tiny_lm, "b", seed=2)
    m = a * 0.7 + b * -0.4
    name = a.weight_names()[3]
    by_hand = 0.7 * (a.tensors[name + ":B"] @ a.tensors[name + ":A"]) - 0.4 * (b.tensors[name + ":B"] @ b.tensors[name + ":A"])
    torch.testing.assert_close(m.weight_delta(name), by_hand, rtol=1e-6, atol=1e-8)
    B, A = m.adapter()[name]  # (sum_k alpha_k B_k) A0: exact because A0 is shared
    torch.testing.assert_close(B @ A, by_hand, rtol=1e-5, atol=1e-7)
    base = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    mixer = Mixer(tiny_lm)
    mixer.add(a)
    mixer.add(b)
    mixer.set_row_weights([{"a": 0.7, "b": -0.4}], merge=True)
    for n in m.weight_names():  # what the mixer merges is theta0 + the mix's delta, to the bit
        assert torch.equal(tiny_lm.model.get_parameter(n), base[n] + m.weight_delta(n)), n
    assert mixer.mix({"a": 0.7, "b": -0.4}).weights == m.weights
    mixer.clear()


def test_an_adapter_needs_low_rank_terms_with_one_A0(tiny_lm):
    low = random_tangent(tiny_lm, "low", seed=1)
    with pytest.raises(DirectionError, match="full-rank"):
        (low * 1.0 + random_tangent(tiny_lm, "full", seed=2, param="full") * 1.0).adapter()
    with pytest.raises(DirectionError, match="another shared A0"):
        (low * 1.0 + random_tangent(tiny_lm, "other", seed=2, a0_seed=7) * 1.0).adapter()


def test_steering_and_weight_space_do_not_compare(tiny_lm, tiny_vector):
    w = random_tangent(tiny_lm, "w", seed=1)
    assert tiny_vector.cosine(w) is None and w.cosine(tiny_vector) is None
    assert w.cosine(w) == pytest.approx(1.0) and tiny_vector.cosine(tiny_vector) == pytest.approx(1.0)
    assert w.cosine(random_tangent(tiny_lm, "w2", seed=1, scale=-0.05)) == pytest.approx(-1.0)
    layer = tiny_vector.steered_layers()[0]
    torch.testing.assert_close((tiny_vector * 2.0).activation_deltas()[layer], tiny_vector.delta(layer, 2.0))


def test_a_file_from_an_earlier_version_still_loads(tiny_lm, tmp_path):
    """Before the vocabulary was settled a weight delta's file said 'tangent' and a scalarized run 'ordinary'."""
    d = random_tangent(tiny_lm, "old", seed=1)
    meta = {"objective": "old", "param": "lowrank", "method": "ordinary", "model": tiny_lm.identity(), "name": "old"}
    save_file(d.tensors, str(tmp_path / "old.safetensors"), metadata={FORMAT_KEY: "tangent", META_KEY: json.dumps(meta)})
    back = open_direction(tmp_path / "old.safetensors")
    assert back.kind == "weights" and back.method == "scalarized" and back.label == "scalarized"
    saved = back.save(tmp_path / "new.safetensors")
    again = open_direction(saved)
    assert again.kind == "weights" and again.method == "scalarized"
    for n in d.weight_names():
        assert torch.equal(again.weight_delta(n), d.weight_delta(n))
