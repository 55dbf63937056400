import pytest
import torch

from engine.data import PairSet
from engine.directions import DirectionError, save_direction_file
from engine.loading import load_direction
from engine.errors import Cancelled
from engine.models import load_model
from engine.steering import SteeringVector, candidate_layers, extract


def _manual_vector(lm, pairs: PairSet, layer: int, aggregate: str) -> torch.Tensor:
    """mean over pairs of (aggregate over response tokens of chosen) - (same for rejected), one sequence at a time."""
    diffs = []
    for p in pairs:
        sides = []
        for response in (p.chosen, p.rejected):
            prompt = lm.tokenizer(lm.chat_text(p.prompt), add_special_tokens=False).input_ids[-48:]
            resp = lm.tokenizer(response, add_special_tokens=False).input_ids[:48]
            with torch.no_grad():
                hs = lm.model(torch.tensor([prompt + resp]), output_hidden_states=True).hidden_states[layer + 1][0]
            r = hs[len(prompt):]
            sides.append(r.double().mean(0) if aggregate == "mean" else r[-1].double())
        diffs.append(sides[0] - sides[1])
    return torch.stack(diffs).mean(0).float()


@pytest.mark.parametrize("aggregate", ["mean", "last"])
@pytest.mark.parametrize("batch_size", [5, 1])
def test_vector_is_difference_of_response_means(tiny_lm, tiny_pairs, aggregate, batch_size):
    """The prompt read once per pair (its cache shared by both replies, prompts of a batch padded on the left)
    gives what each whole sequence alone gives."""
    pairs = tiny_pairs.limit(8)
    sv = extract(tiny_lm, pairs, aggregate=aggregate, batch_size=batch_size, activation_dtype="model",
                 val_fraction=0.0, max_response_tokens=48, max_prompt_tokens=48)
    for layer in range(tiny_lm.n_layers - 1):  # the last hidden_states entry is after the final norm
        expected = _manual_vector(tiny_lm, pairs, layer, aggregate)
        torch.testing.assert_close(sv.vectors[layer], expected, atol=2e-5, rtol=1e-4)


def test_bfloat16_activation_pass_is_close_and_leaves_the_model_as_it_was(tiny_lm, tiny_pairs, monkeypatch):
    """On a CPU with bfloat16 matrix units "auto" reads the activations through a bfloat16 copy of the decoder
    (elsewhere through the model itself); the vectors stay close to float32's and the model is not touched."""
    import engine.steering as steering

    pairs = tiny_pairs.limit(8)
    before = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    kw = dict(val_fraction=0.0, max_response_tokens=48, max_prompt_tokens=48)
    exact = extract(tiny_lm, pairs, activation_dtype="model", **kw)
    monkeypatch.setattr(steering, "_cpu_runs_bfloat16_matmuls", lambda: False)
    plain = extract(tiny_lm, pairs, activation_dtype="auto", **kw)
    monkeypatch.setattr(steering, "_cpu_runs_bfloat16_matmuls", lambda: True)
    fast = extract(tiny_lm, pairs, activation_dtype="auto", **kw)
    assert plain.meta["method"]["activation_dtype"] == "float32" and torch.equal(plain.vectors, exact.vectors)
    assert fast.meta["method"]["activation_dtype"] == "bfloat16" and fast.vectors.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity(fast.vectors.double(), exact.vectors.double(), dim=-1)
    assert float(cos.min()) > 0.99, cos
    assert not torch.equal(fast.vectors, exact.vectors)  # it did run in bfloat16
    assert all(p.dtype == torch.float32 and torch.equal(p, before[n]) for n, p in tiny_lm.model.named_parameters())
    with pytest.raises(DirectionError, match="activation dtype"):
        extract(tiny_lm, pairs, activation_dtype="fp8")

    # Stop is looked at before every block of the copy too (one block's wait, not one pass's)
    calls, phases = [0], []

    def should_stop():
        calls[0] += phases[-1] == "forward passes" if phases else 0
        return False

    extract(tiny_lm, pairs, activation_dtype="bfloat16", batch_size=8, progress=lambda p: phases.append(p.phase),
            should_stop=should_stop, **kw)
    passes = 1 + -(-16 // 4)  # the 8 prompts' pass, then 16 replies 4 a pass
    assert calls[0] >= passes * tiny_lm.n_layers


def test_extracted_vector_metadata(tiny_lm, tiny_pairs, tiny_vector):
    sv = tiny_vector
    assert sv.vectors.shape == (3, 32) and sv.norms.shape == (3,)
    assert (sv.norms > 0).all() and ((sv.accuracy >= 0) & (sv.accuracy <= 1)).all()
    assert sv.layers == sv.ranking[:1] and set(sv.ranking) == set(candidate_layers(3))
    assert sv.model["fingerprint"] == tiny_lm.fingerprint
    assert sv.meta["data_hash"] == tiny_pairs.data_hash()
    assert sv.meta["heldout_pairs"] + sv.meta["train_pairs"] == len(tiny_pairs)


def test_candidate_layers_skip_first_and_last():
    assert candidate_layers(30) == list(range(1, 24))
    assert candidate_layers(3) == [0, 1, 2]


def test_user_override_of_layers_and_strength(tiny_lm, tiny_pairs, tiny_vector):
    sv = tiny_vector.with_settings(layers=[0, 2], strength=1.5)
    assert sv.layers == [0, 2] and sv.strength == 1.5
    torch.testing.assert_close(sv.delta(2, 2.0).norm(), torch.tensor(2.0 * 1.5 * float(sv.norms[2])))
    with pytest.raises(DirectionError, match="between 0 and 2"):
        tiny_vector.with_settings(layers=[3])


def test_progress_and_cancel(tiny_lm, tiny_pairs):
    """Every phase reports, in order, from 0 to its total (the layer ranking used to sit silent at 100%)."""
    seen = []
    extract(tiny_lm, tiny_pairs.limit(6), batch_size=4, progress=seen.append, max_response_tokens=16)
    phases = list(dict.fromkeys(p.phase for p in seen))
    assert phases == ["tokenizing", "forward passes", "ranking layers"]
    for phase in phases:
        mine = [p for p in seen if p.phase == phase]
        assert mine[0].done == 0 and mine[-1].done == mine[-1].total > 0
        assert [p.done for p in mine] == sorted(p.done for p in mine)
        assert all(p.eta_s is not None for p in mine if p.done)
    with pytest.raises(Cancelled):
        extract(tiny_lm, tiny_pairs.limit(6), batch_size=2, should_stop=lambda: True)


def test_save_load_round_trip(tmp_path, tiny_lm, tiny_vector):
    path = tiny_vector.save(tmp_path / "v.safetensors")
    back = SteeringVector.load(path, tiny_lm)
    assert torch.equal(back.vectors, tiny_vector.vectors) and back.layers == tiny_vector.layers
    assert back.meta["ranking"] == tiny_vector.ranking and back.strength == tiny_vector.strength
    assert load_direction(path, tiny_lm).name == tiny_vector.name


def test_vector_for_another_model_is_refused(tmp_path, tiny_vector, other_tiny_dir, wide_tiny_dir):
    path = tiny_vector.save(tmp_path / "v.safetensors")
    other = load_model(other_tiny_dir)
    with pytest.raises(DirectionError, match=r"made for tiny-llama \(fingerprint .*not for the loaded model tiny-other"):
        load_direction(path, other)
    with pytest.raises(DirectionError, match="another shape"):
        load_direction(path, load_model(wide_tiny_dir))


def test_nan_corrupt_and_foreign_files_are_refused(tmp_path, tiny_lm, tiny_vector):
    bad = tiny_vector.vectors.clone()
    bad[1, 3] = float("nan")
    meta = {**tiny_vector.meta, "objective": "x", "layers": [1], "model": tiny_vector.model}
    save_direction_file(tmp_path / "nan.safetensors", "steering",
                        {"vectors": bad, "norms": tiny_vector.norms, "accuracy": tiny_vector.accuracy,
                         "effect": tiny_vector.effect}, meta)
    with pytest.raises(DirectionError, match="NaN or infinite"):
        load_direction(tmp_path / "nan.safetensors", tiny_lm)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01junk" * 50)
    with pytest.raises(DirectionError, match="not a readable safetensors"):
        load_direction(tmp_path / "junk.safetensors", tiny_lm)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(DirectionError, match="not a tsdpo-studio direction"):
        load_direction(tmp_path / "plain.safetensors", tiny_lm)
    with pytest.raises(DirectionError, match="No direction file or stored direction"):
        load_direction(tmp_path / "missing.safetensors", tiny_lm)


def test_too_few_pairs(tiny_lm, tiny_pairs):
    with pytest.raises(DirectionError, match="too few"):
        extract(tiny_lm, tiny_pairs.limit(1))


def test_first_order_steerability_is_the_derivative_of_the_measured_one(tiny_lm, tiny_pairs, tiny_vector):
    """The ranking's one backward pass gives, for every layer, the slope of steerability's +-a measurement at a = 0."""
    from engine.steering import first_order_steerability, steerability

    v = tiny_vector
    pairs = list(tiny_pairs)[:3]
    layers = candidate_layers(tiny_lm.n_layers)
    before = [set(m._forward_hooks) for m in tiny_lm.decoder_layers()]
    estimate = first_order_steerability(tiny_lm, v.vectors, v.norms, pairs, layers, 1.0, pairs_per_pass=2)
    # the slope of the measurement at 0 from two step sizes (Richardson: the a^2 term cancels; a large enough step
    # keeps float32's rounding of the margins out of it)
    a = 0.1
    slope = {k: steerability(tiny_lm, v.vectors, v.norms, pairs, layers, k) / k for k in (a, 2 * a)}
    measured = (4 * slope[a] - slope[2 * a]) / 3
    scale = max(abs(float(measured[l])) for l in layers)
    for l in layers:  # (the one-sided slope at a = 0.1 is already 2.5% off: the check tells them apart)
        assert abs(float(estimate[l]) - float(measured[l])) <= 5e-3 * scale, l
    assert all(float(estimate[l]) != 0 for l in layers)
    assert [set(m._forward_hooks) for m in tiny_lm.decoder_layers()] == before  # its hooks are gone


def test_extraction_measures_the_best_first_order_layers_exactly(tiny_lm, tiny_vector):
    meta = tiny_vector.meta
    measured = meta["steerability_measured"]
    assert measured and tiny_vector.ranking[: len(measured)] == sorted(
        measured, key=lambda l: meta["steerability"][l], reverse=True)
    assert tiny_vector.layers == tiny_vector.ranking[:1]


def test_a_stop_during_the_first_order_backward_pass_stops_it(tiny_lm, tiny_pairs, tiny_vector):
    from engine.errors import Cancelled
    from engine.steering import first_order_steerability

    v = tiny_vector
    before = [set(m._forward_hooks) for m in tiny_lm.decoder_layers()]
    calls = []

    def stop():  # False until the backward pass asks (the first question is before the forward pass)
        calls.append(torch.is_grad_enabled())
        return len(calls) > 1

    with pytest.raises(Cancelled, match="ranking layers"):
        first_order_steerability(tiny_lm, v.vectors, v.norms, list(tiny_pairs)[:2], [0, 1, 2], 1.0, should_stop=stop)
    assert len(calls) == 2  # asked once before the pass and once in the backward, which it ended
    assert [set(m._forward_hooks) for m in tiny_lm.decoder_layers()] == before


def test_the_pca_estimator_is_the_first_component_of_the_paired_differences():
    from engine.steering import pca_directions

    g = torch.Generator().manual_seed(0)
    axis = torch.tensor([3.0, -4.0, 0.0, 0.0]) / 5
    rejected = torch.randn(64, 2, 4, generator=g)
    along = 2.0 + 0.3 * torch.randn(64, generator=g)  # most pairs differ along +axis, with spread along it
    chosen = rejected + along[:, None, None] * axis + 0.05 * torch.randn(64, 2, 4, generator=g)
    v = pca_directions(chosen, rejected)
    for l in range(2):
        unit = v[l] / v[l].norm()
        assert float(unit @ axis) > 0.99  # the axis, signed the way most pairs point
        d = (chosen - rejected)[:, l].double()
        assert float(v[l].norm()) == pytest.approx(float((d @ unit.double()).mean()), rel=1e-5)
    flipped = pca_directions(rejected, chosen)
    assert torch.allclose(flipped, -v, atol=1e-5)


def test_a_band_of_layers_splits_the_strength(tiny_lm, tiny_pairs, tiny_vector):
    from engine.steering import extract, layer_band

    assert layer_band(5, 3, 30) == [4, 5, 6] and layer_band(1, 3, 30) == [1, 2, 3] and layer_band(29, 4, 30) == [26, 27, 28, 29]
    sv = extract(tiny_lm, tiny_pairs, batch_size=6, max_response_tokens=48, max_prompt_tokens=48, strength=2.0, band=2,
                 estimator="pca")
    assert sv.layers == layer_band(sv.ranking[0], 2, tiny_lm.n_layers) and len(sv.layers) == 2
    assert sv.strength == pytest.approx(1.0) and sv.meta["method"]["strength"] == 2.0
    assert sv.meta["method"]["estimator"] == "pca" and sv.meta["method"]["band"] == 2
    with pytest.raises(DirectionError, match="not both"):
        extract(tiny_lm, tiny_pairs, layers=[1], band=2)
    with pytest.raises(DirectionError, match="estimator"):
        extract(tiny_lm, tiny_pairs, estimator="median")
