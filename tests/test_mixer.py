import pytest
import torch

from engine.directions import DirectionError
from engine.generation import SamplingParams, decode
from engine.mixer import Mixer
from engine.models import load_model
from engine.steering import SteeringVector


@pytest.fixture
def ids(tiny_lm):
    return tiny_lm.tokenizer(tiny_lm.chat_text("Tell me about the sea."), return_tensors="pt", add_special_tokens=False).input_ids


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(ids).logits


def _block_outputs(lm, ids):
    outs = {}
    handles = [b.register_forward_hook(lambda m, a, o, i=i: outs.__setitem__(i, (o[0] if isinstance(o, tuple) else o).clone()))
               for i, b in enumerate(lm.decoder_layers())]
    with torch.no_grad():
        lm.model(ids)
    for h in handles:
        h.remove()
    return outs


def test_removing_a_mix_restores_bit_identical_logits(tiny_lm, tiny_vector, ids):
    base = _logits(tiny_lm, ids)
    mixer = Mixer(tiny_lm)
    mixer.add(tiny_vector)
    mixer.set_weights({tiny_vector.name: 1.0})
    assert mixer.active and not torch.equal(_logits(tiny_lm, ids), base)
    mixer.set_weights({tiny_vector.name: 0.0})
    assert not mixer.active and torch.equal(_logits(tiny_lm, ids), base)
    mixer.set_weights({tiny_vector.name: -0.5})
    mixer.clear()
    assert torch.equal(_logits(tiny_lm, ids), base)


def test_hook_adds_exactly_the_weighted_delta(tiny_lm, tiny_vector, ids):
    sv = tiny_vector.with_settings(layers=[1])
    base = _block_outputs(tiny_lm, ids)
    mixer = Mixer(tiny_lm)
    mixer.add(sv)
    mixer.set_weights({sv.name: 0.7})
    steered = _block_outputs(tiny_lm, ids)
    mixer.clear()
    torch.testing.assert_close(steered[0], base[0])  # upstream of the steered block: untouched
    diff = steered[1] - base[1]
    torch.testing.assert_close(diff, sv.delta(1, 0.7).expand_as(diff), atol=1e-5, rtol=1e-4)


def test_generated_positions_only(tiny_lm, tiny_vector, ids):
    sv = tiny_vector.with_settings(layers=[1])
    base = _block_outputs(tiny_lm, ids)
    mixer = Mixer(tiny_lm, positions="generated")
    mixer.add(sv)
    mixer.set_weights({sv.name: 1.0})
    assert torch.equal(_block_outputs(tiny_lm, ids)[1], base[1])  # a prompt alone is not steered
    mixer.prompt_len = ids.shape[1] - 2
    out = _block_outputs(tiny_lm, ids)[1]
    mixer.clear()
    assert torch.equal(out[:, :-2], base[1][:, :-2]) and not torch.equal(out[:, -2:], base[1][:, -2:])


def test_hook_accepts_tuple_and_tensor_outputs(tiny_lm, tiny_vector):
    mixer = Mixer(tiny_lm)
    mixer.add(tiny_vector)
    mixer.set_weights({tiny_vector.name: 1.0})
    layer = tiny_vector.layers[0]
    hook = mixer._hook(layer)
    h = torch.zeros(1, 4, tiny_lm.hidden_size)
    as_tensor = hook(None, None, h)
    as_tuple = hook(None, None, (h, "cache"))
    mixer.clear()
    assert isinstance(as_tuple, tuple) and as_tuple[1] == "cache"
    assert torch.equal(as_tuple[0], as_tensor) and not torch.equal(as_tensor, h)


def test_per_row_weights_in_one_batch(tiny_lm, tiny_vector, ids):
    mixer = Mixer(tiny_lm)
    mixer.add(tiny_vector)
    base = _logits(tiny_lm, ids)
    mixer.set_weights({tiny_vector.name: 1.0})
    single = _logits(tiny_lm, ids)
    mixer.set_row_weights([{}, {tiny_vector.name: 1.0}])
    both = _logits(tiny_lm, ids.repeat(2, 1))
    mixer.clear()
    torch.testing.assert_close(both[0], base[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(both[1], single[0], atol=1e-5, rtol=1e-5)


def test_steering_is_consistent_with_the_kv_cache(tiny_lm, tiny_vector, ids):
    """Greedy decoding with the cache equals recomputing the whole sequence at every step."""
    mixer = Mixer(tiny_lm)
    mixer.add(tiny_vector)
    mixer.set_weights({tiny_vector.name: 1.5})
    try:
        cached = decode(tiny_lm, ids[0].tolist(), 1, SamplingParams(max_new_tokens=12), mixer=mixer)[0]
        seq = ids
        toks = []
        for _ in range(12):
            nxt = int(_logits(tiny_lm, seq)[0, -1].argmax())
            if nxt == tiny_lm.tokenizer.eos_token_id:
                break
            toks.append(nxt)
            seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    finally:
        mixer.clear()
    assert cached.text == tiny_lm.tokenizer.decode(toks, skip_special_tokens=True)


def test_interference_flags_aligned_directions(tiny_lm, tiny_vector):
    mixer = Mixer(tiny_lm)
    mixer.add(tiny_vector, name="a")
    twin = SteeringVector("b", tiny_vector.vectors * 3, tiny_vector.norms, tiny_vector.accuracy, tiny_vector.effect,
                          tiny_vector.layers, tiny_vector.model)
    mixer.add(twin, name="b")
    g = torch.Generator().manual_seed(0)
    ortho = torch.randn(tiny_vector.vectors.shape, generator=g)
    v = tiny_vector.vectors
    ortho -= (ortho * v).sum(-1, keepdim=True) / (v * v).sum(-1, keepdim=True) * v
    mixer.add(SteeringVector("c", ortho, tiny_vector.norms, tiny_vector.accuracy, tiny_vector.effect,
                             tiny_vector.layers, tiny_vector.model), name="c")
    flagged = mixer.interference()
    assert [(a, b) for a, b, _ in flagged] == [("a", "b")] and flagged[0][2] == pytest.approx(1.0, abs=1e-3)


def test_errors(tiny_lm, tiny_vector, other_tiny_dir):
    mixer = Mixer(tiny_lm)
    mixer.add(tiny_vector)
    with pytest.raises(DirectionError, match="already loaded"):
        mixer.add(tiny_vector)
    with pytest.raises(DirectionError, match="No loaded direction named nope"):
        mixer.set_weights({"nope": 1.0})
    with pytest.raises(DirectionError, match="not for the loaded model"):
        Mixer(load_model(other_tiny_dir)).add(tiny_vector)
    with pytest.raises(DirectionError, match="positions"):
        Mixer(tiny_lm, positions="some")


def test_full_rank_weight_direction_is_not_changed_by_applying_it(tiny_model_dir, ids):
    from tiny_model import random_tangent

    lm = load_model(tiny_model_dir)
    direction = random_tangent(lm, "helpfulness", 1, param="full")
    stored = {k: v.clone() for k, v in direction.tensors.items()}
    mixer = Mixer(lm)
    mixer.add(direction)
    mixer.set_weights({"helpfulness": 0.5})
    first = _logits(lm, ids)
    for w in (-2.0, 3.0, 0.0, 0.5):
        mixer.set_weights({"helpfulness": w})
    assert all(torch.equal(direction.tensors[k], v) for k, v in stored.items())
    assert torch.equal(_logits(lm, ids), first)
