"""The architecture matrix: every engine capability on tiny random models of the architectures users bring.

Each model is built from its transformers config with a fixed seed (tests/architectures.py), loaded once per
architecture, and put back as it was after each test. Every check compares with what plain transformers (or
PEFT) computes from the same weights, or with central differences in float64.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from architectures import ARCHITECTURES, build_architecture
from engine.dpo import encode_pairs
from engine.hooks import add_to_block_output, block_output
from engine.mixer import Mixer
from engine.models import load_model

ARCHS = list(ARCHITECTURES)
DEMO_PAIRS = Path(__file__).resolve().parents[1] / "assets" / "data" / "ultrafeedback_helpfulness_400.jsonl"
PROMPT = [5, 17, 42, 99, 3, 250, 7, 64, 128, 31]


@pytest.fixture(scope="module", params=ARCHS)
def arch(request, tmp_path_factory):
    folder = build_architecture(request.param, tmp_path_factory.mktemp(request.param) / request.param)
    lm = load_model(folder)
    snapshot = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    return request.param, folder, lm, snapshot


@pytest.fixture
def alm(arch, request):
    """(model type, folder, LoadedModel), its weights checked and put back after the test."""
    model_type, folder, lm, snapshot = arch
    yield model_type, folder, lm
    for m in list(lm.mixers):
        m.clear()
    lm.mixers.clear()
    changed = [n for n, p in lm.model.named_parameters() if not torch.equal(p, snapshot[n])]
    with torch.no_grad():
        for n in changed:
            lm.model.get_parameter(n).copy_(snapshot[n])
    assert not changed or request.node.get_closest_marker("edits_weights"), \
        f"the test left weights changed: {changed[:3]}"


@pytest.fixture(scope="module")
def arch_vector(arch, tiny_pairs):
    from engine.steering import extract

    return extract(arch[2], tiny_pairs, batch_size=6, max_response_tokens=24, max_prompt_tokens=24, strength=2.0,
                   steer_pairs=2)


@pytest.fixture(scope="module")
def arch_directions(arch, tiny_pairs):
    """One TS-DPO step per parameterization (low-rank and full), as the CLI and the studio train them."""
    from engine.train import TrainConfig, train_direction

    lm = arch[2]
    out = {}
    for param in ("lowrank", "full"):
        cfg = TrainConfig(param=param, rank=4, steps=1, batch_size=2, max_prompt_tokens=24, max_response_tokens=24,
                          lr=5e-2 if param == "lowrank" else 1e-2, warmup_ratio=0.0)
        out[param] = train_direction(lm, tiny_pairs, cfg, objective=f"helpfulness-{param}").direction
        out[param].name = param
    return out


@torch.no_grad()
def logits(lm, ids=PROMPT):
    return lm.model(torch.tensor([ids])).logits.float()


def test_steering_adds_exactly_alpha_times_its_delta_to_the_block_output(alm, arch_vector):
    _, _, lm = alm
    v = arch_vector
    assert torch.isfinite(v.vectors).all() and v.vectors.shape == (lm.n_layers, lm.hidden_size)
    layer = min(v.steered_layers())
    block = lm.decoder_layers()[layer]
    mixer = Mixer(lm)
    mixer.add(v, name="s")
    seen = []
    with mixer.applied([{"s": 0.0}]):
        logits(lm)
    with mixer.applied([{"s": 0.7}]):  # its hook is on the block now: one added after it sees what leaves the block
        handle = block.register_forward_hook(lambda m, a, out: seen.append(block_output(out).detach().clone()))
        try:
            logits(lm)
        finally:
            handle.remove()
    handle = block.register_forward_hook(lambda m, a, out: seen.append(block_output(out).detach().clone()))
    try:
        logits(lm)
    finally:
        handle.remove()
    steered, base = seen
    want = v.activation_delta(layer, 0.7).to(base.dtype)
    assert float((steered - base - want).abs().max()) <= 1e-5 * max(1.0, float(want.abs().max()))


def test_activations_with_the_prompt_read_once_are_each_whole_sequences_own(alm, tiny_pairs):
    """Extraction reads a pair's prompt once and continues both replies from its cache, several pairs a pass
    (prompts left-padded, replies right-padded, sliding windows included): every block's mean over the reply,
    and the reply's token norms, are what the sequence alone through plain transformers gives."""
    from engine.steering import _encode, response_activations

    _, _, lm = alm
    pairs = list(tiny_pairs)[:4]
    items = [_encode(lm, p.prompt, p.chosen, p.rejected, 40, 24) for p in pairs]
    vecs, norms = response_activations(lm, items, batch_size=3)
    for i, (prompt, *replies) in enumerate(items):
        for side, reply in enumerate(replies):
            with torch.no_grad():
                hs = lm.model(torch.tensor([prompt + reply]), output_hidden_states=True).hidden_states
            for layer in range(lm.n_layers - 1):  # the last hidden state is after the final norm
                r = hs[layer + 1][0, len(prompt):].double()
                torch.testing.assert_close(vecs[2 * i + side, layer].double(), r.mean(0), atol=1e-4, rtol=1e-4)
                torch.testing.assert_close(norms[2 * i + side, layer].double(), r.norm(dim=-1).mean(), atol=1e-4,
                                           rtol=1e-4)


def test_steerability_is_what_the_models_own_logits_say(alm, arch_vector, tiny_pairs):
    from engine.dpo import completion_sums, token_logps
    from engine.steering import steerability

    _, _, lm = alm
    v = arch_vector
    layer = v.steered_layers()[0]
    pairs = list(tiny_pairs)[:3]
    got = steerability(lm, v.vectors, v.norms, pairs, [layer], v.strength, max_prompt_tokens=24,
                       max_response_tokens=24)[layer]
    batch = encode_pairs(lm, pairs, 24, 24)
    mask = batch.target_mask.bool()
    n = batch.n_pairs

    def margin(sign):
        add = sign * v.delta(layer, 1.0).to(lm.dtype)
        handle = add_to_block_output(lm.decoder_layers()[layer], add)
        try:
            with torch.no_grad():
                out = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids).logits  # the model's own head, whatever it does
        finally:
            handle.remove()
        seq = completion_sums(token_logps(out[mask], batch.targets[mask]), mask) / mask.sum(-1).float()
        return float((seq[:n] - seq[n:]).mean())

    want = (margin(1.0) - margin(-1.0)) / 2
    assert abs(float(got) - want) <= 1e-4 * max(1.0, abs(want)), (float(got), want)


@pytest.mark.parametrize("param", ["lowrank", "full"])
def test_training_gives_a_finite_direction_over_what_it_says_it_covers(alm, arch_directions, param):
    _, _, lm = alm
    d = arch_directions[param]
    names = d.weight_names()
    assert names and all(torch.isfinite(t).all() for t in d.tensors.values())
    assert d.max_abs() > 0  # one step moved it
    params = dict(lm.model.named_parameters())
    for w in names:
        assert d.weight_delta(w).shape == params[w].shape, w


@pytest.mark.edits_weights
def test_a_low_rank_mix_as_adapter_is_the_merged_model(alm, arch_directions):
    _, _, lm = alm
    mixer = Mixer(lm)
    mixer.add(arch_directions["lowrank"], name="low")
    mixer.add(arch_directions["full"], name="full")
    w = {"low": 2.0}
    with mixer.applied([w]):
        assert not mixer.merged
        adapter = logits(lm)
    with mixer.applied([w], merge=True):
        merged = logits(lm)
    assert float((adapter - logits(lm)).abs().max()) > 1e-6  # the mix changes the model
    assert float((adapter - merged).abs().max()) <= 1e-5
    with mixer.applied([{"low": 1.0, "full": -1.5}]):
        both = logits(lm)
    params = dict(lm.model.named_parameters())
    with torch.no_grad():  # theta0 + sum alpha tau, written by hand (the fixture puts theta0 back)
        for d, a in ((arch_directions["lowrank"], 1.0), (arch_directions["full"], -1.5)):
            for n in d.weight_names():
                params[n].add_(a * d.weight_delta(n).to(params[n].dtype))
    by_hand = logits(lm)
    assert float((both - by_hand).abs().max()) <= 1e-5


def test_greedy_generation_with_the_cache_is_the_no_cache_forward(alm, arch_directions, arch_vector):
    from engine.generation import SamplingParams, decode

    _, _, lm = alm
    mixer = Mixer(lm)
    mixer.add(arch_directions["lowrank"], name="low")
    mixer.add(arch_vector, name="s")
    w = {"low": 1.5, "s": 0.5}
    ids = lm.prompt_ids("Write a short poem about the sea.")
    with mixer.applied([w]):
        out = decode(lm, ids, 1, SamplingParams(max_new_tokens=8), mixer=mixer)[0]
        tokens = lm.tokenizer(out.text, add_special_tokens=False).input_ids if out.text else []
    # the reply again, one full forward per token, no cache
    seq = list(ids)
    want = []
    with mixer.applied([w]):
        for _ in range(out.n_tokens):
            nxt = int(logits(lm, seq)[0, -1].argmax())
            want.append(nxt)
            seq.append(nxt)
    assert lm.tokenizer.decode(want, skip_special_tokens=True) == out.text, (want, tokens)


def test_hf_peft_and_control_vector_exports_reload_as_the_mix(alm, arch_directions, arch_vector, tmp_path):
    import gguf
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from engine.export import export_mix

    model_type, folder, lm = alm
    mixer = Mixer(lm)
    mixer.add(arch_directions["lowrank"], name="low")
    mixer.add(arch_directions["full"], name="full")
    mixer.add(arch_vector, name="s")
    weights = {"low": 1.5, "full": -0.8}
    with mixer.applied([weights]):
        want = logits(lm)
    export_mix(lm, mixer, weights, tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    with torch.no_grad():
        assert float((plain(torch.tensor([PROMPT])).logits - want).abs().max()) <= 1e-5

    with mixer.applied([{"low": 1.5}]):
        want_low = logits(lm)
    export_mix(lm, mixer, {"low": 1.5}, tmp_path / "peft", format="peft")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        peft_model = PeftModel.from_pretrained(base, tmp_path / "peft")
        assert float((peft_model(torch.tensor([PROMPT])).logits - want_low).abs().max()) <= 1e-5

    layers = [l for l in arch_vector.steered_layers() if l > 0]
    if not layers:  # llama.cpp's control vectors start at block 1: steer block 1 then
        layers = [1]
    steer = arch_vector.with_settings(layers=layers)
    mixer.add(steer, name="s1")
    with mixer.applied([{"s1": 0.8}]):
        want_cv = logits(lm)
    export_mix(lm, mixer, {"s1": 0.8}, tmp_path / "cv", format="controlvector")
    reader = gguf.GGUFReader(str(tmp_path / "cv" / "mix.gguf"))
    values = {int(t.name.split(".")[1]): torch.from_numpy(t.data.copy()) for t in reader.tensors}
    st = load_file(str(tmp_path / "cv" / "mix.safetensors"))
    assert set(values) == set(layers) and all(torch.equal(st[f"direction.{l}"], values[l]) for l in values)
    blocks = lm.decoder_layers()
    handles = [add_to_block_output(blocks[l], v.to(lm.dtype)) for l, v in values.items()]  # llama.cpp adds it here
    try:
        got = logits(lm)
    finally:
        for h in handles:
            h.remove()
    assert float((got - want_cv).abs().max()) <= 1e-5


@pytest.mark.parametrize("param", ["lowrank", "full"])
def test_the_tangent_pass_is_the_derivative_by_central_differences(alm, tiny_pairs, param):
    """f(theta0 + e tau) - f(theta0 - e tau) over 2e, in float64, against the tangent of the training pass (the
    dual branches for low rank, jvp for full rank) on this architecture's own attention and MLP code."""
    from engine.tangent import DirectionModel, completion_logits, linear_weights

    _, folder, _ = alm
    lm = load_model(folder, dtype=torch.float64)
    dm = DirectionModel(lm, linear_weights(lm), param=param, rank=4)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in dm.tau.values():
            t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * (0.5 if param == "lowrank" else 0.05))
    tau = {n: tuple(t.detach().double() for t in f) if isinstance(f, tuple) else f.detach().double()
           for n, f in dm.factors().items()}
    batch = encode_pairs(lm, list(tiny_pairs)[:2], 16, 16)
    mask = batch.target_mask.bool()
    with torch.no_grad():
        pol, ref = completion_logits(lm, batch, tau, "tangent")
    tangent = pol - ref  # J tau at the completion positions
    scale = 1.0 / float(tangent.abs().max())  # tau scaled so that J tau is O(1) (Granite's logits are scaled down 8x)
    tangent = tangent * scale
    params = dict(lm.model.named_parameters())
    deltas = {n: d.double() * scale for n, d in dm.deltas().items()}

    def at(eps):
        saved = {n: params[n].detach().clone() for n in deltas}
        try:  # (the eager experts: grouped_mm has no float64 kernel)
            with torch.no_grad(), lm.forward_ad_kernels():
                for n, d in deltas.items():
                    params[n].add_(eps * d)
                return lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                position_ids=batch.position_ids).logits[mask]
        finally:
            with torch.no_grad():
                for n in deltas:
                    params[n].copy_(saved[n])

    # Most families compute their norms and softmax in float32 even in a float64 model (~1e-7 relative noise),
    # which rules out a tiny step, and how far the logits stay quadratic differs (Granite's multipliers, Gemma's
    # soft-capping): the usual V-shaped error over the step, so the best of a few steps, each with Richardson's
    # extrapolation (which cancels the h^2 term). A wrong tangent is off at every step. Mixture-of-experts models
    # route each token to its top-k experts, a choice that flips under all but the smallest steps (the derivative
    # is the one at fixed routing), and there the float32 noise leaves ~5e-4.
    model_type = alm[0]
    tolerance = 1e-3 if model_type in ("qwen2_moe", "mixtral") else 1e-4
    errors = {}
    for h in (1e-2, 4e-3, 1e-3, 2.5e-4, 1e-4):
        c1, c2 = ((at(k) - at(-k)) / (2 * k) for k in (h, h / 2))
        errors[h] = float(((4 * c2 - c1) / 3 - tangent).abs().max())
    assert pol.dtype == torch.float64
    assert min(errors.values()) <= tolerance, errors  # |J tau| is 1 at most: relative


def test_the_coverage_report_says_what_a_direction_covers_and_skips(alm):
    from engine.tangent import coverage, linear_weights

    model_type, _, lm = alm
    report = coverage(lm)
    assert report["weights"] == linear_weights(lm) and report["tensors"] == len(report["weights"])
    params = dict(lm.model.named_parameters())
    assert report["params"] == sum(params[w].numel() for w in report["weights"])
    blocks = sum(p.numel() for n, p in params.items() if n.startswith(lm.decoder_prefix() + "."))
    assert report["params"] + sum(s["params"] for s in report["skipped"]) == report["block_params"] == blocks
    skipped = {s["what"]: s for s in report["skipped"]}
    if model_type in ("qwen2_moe", "mixtral"):  # never silently: the experts and the router are said
        experts = [s for w, s in skipped.items() if w.startswith("fused expert tensors")]
        assert experts and "mixture-of-experts" in experts[0]["why"]
        assert any("Router" in w for w in skipped)
    else:
        assert not any(w.startswith("fused expert") for w in skipped)


# what baking a steering vector into an HF checkpoint does per architecture: the bias it uses, or why it refuses
BAKES = {"llama": "down_proj", "granite": "down_proj", "smollm3": "down_proj", "gpt2": "c_proj", "gpt_neox": "dense_4h_to_h",
         "gemma2": "post_feedforward_layernorm", "gemma3_text": "post_feedforward_layernorm",
         "olmo2": "post_feedforward_layernorm", "mistral": "no bias", "qwen2": "no bias", "qwen3": "no bias",
         "phi3": "no bias", "qwen2_moe": "mixture-of-experts", "mixtral": "mixture-of-experts"}


def test_steering_is_baked_exactly_or_refused_with_the_reason(alm, arch_directions, arch_vector, tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.export import ExportError, export_mix

    model_type, _, lm = alm
    mixer = Mixer(lm)
    mixer.add(arch_directions["lowrank"], name="low")
    mixer.add(arch_vector, name="s")
    weights = {"low": 1.0, "s": 0.8}
    expected = BAKES[model_type]
    if expected in ("post_feedforward_layernorm", "no bias", "mixture-of-experts"):
        with pytest.raises(ExportError, match=expected) as info:
            export_mix(lm, mixer, weights, tmp_path / "baked", bake_steering=True)
        assert "--format controlvector" in str(info.value) and not (tmp_path / "baked").exists()
        return
    with mixer.applied([weights]):
        want = logits(lm)
    with mixer.applied([{"low": 1.0}]):
        effect = float((want - logits(lm)).abs().max())
    result = export_mix(lm, mixer, weights, tmp_path / "baked", bake_steering=True)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "baked", dtype=torch.float32)
    assert any(n.endswith(f"mlp.{expected}.bias") for n, _ in plain.named_parameters())
    with torch.no_grad():
        got = plain(torch.tensor([PROMPT])).logits
    assert effect > 0 and float((got - want).abs().max()) <= 1e-3 * effect  # the steering's own effect, reproduced
    assert result.check["steering_effect"] > 0


def test_tsdpo_model_load_prints_what_a_direction_covers(alm, capsys, tmp_path):
    import json

    from engine.cli import main

    model_type, folder, lm = alm
    assert main(["model", "load", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"A direction on this {model_type} model covers" in out and "Steering vectors act on" in out
    if model_type in ("qwen2_moe", "mixtral"):
        assert "Skipped: fused expert tensors" in out
    assert main(["model", "load", str(folder), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["direction_coverage"]
    assert report["tensors"] == len(report["weights"]) > 0
    if model_type == "mixtral":  # training says it too, and the direction file keeps it
        from engine.loading import load_direction

        out = tmp_path / "d.tsdpo.safetensors"
        assert main(["train", "--model", str(folder), "--data", str(DEMO_PAIRS), "--limit", "8", "--steps", "1",
                     "--batch-size", "2", "--no-store", "--out", str(out)]) == 0
        assert "Skipped: fused expert tensors" in capsys.readouterr().err
        kept = load_direction(out, lm).meta["coverage"]
        assert kept["tensors"] == report["tensors"] and kept["skipped"] == report["skipped"]


def test_a_selection_with_no_linear_weight_says_why(alm):
    from engine.directions import DirectionError
    from engine.tangent import linear_weights

    model_type, _, lm = alm
    with pytest.raises(DirectionError, match=f"this {model_type} model .* linear layers only") as info:
        linear_weights(lm, modules=["no_such_module"])
    assert "not selected by modules=['no_such_module']" in str(info.value)


def test_bfloat16_on_cpu_trains_mixes_generates_and_exports(alm, tiny_pairs, tmp_path):
    """The same model loaded in bfloat16 (what a GPU user runs): a TS-DPO step per parameterization stays finite,
    the adapter and the merged weights agree to bf16 rounding, the KV cache changes no greedy token, and the HF
    export's own reload check passes."""
    from engine.export import export_mix
    from engine.generation import SamplingParams, decode
    from engine.train import TrainConfig, train_direction

    _, folder, _ = alm
    lm = load_model(folder, dtype="bfloat16")
    assert lm.dtype == torch.bfloat16
    ds = {}
    for param in ("lowrank", "full"):
        cfg = TrainConfig(param=param, rank=4, steps=1, batch_size=2, max_prompt_tokens=16, max_response_tokens=16,
                          lr=5e-2 if param == "lowrank" else 1e-2, warmup_ratio=0.0)
        ds[param] = train_direction(lm, tiny_pairs, cfg, objective=param).direction
        assert all(torch.isfinite(t).all() for t in ds[param].tensors.values()) and ds[param].max_abs() > 0
    mixer = Mixer(lm)
    mixer.add(ds["lowrank"], name="low")
    mixer.add(ds["full"], name="full")
    with mixer.applied([{"low": 2.0}]):
        adapter = logits(lm)
        ids = lm.prompt_ids("Write a short poem about the sea.")
        out = decode(lm, ids, 1, SamplingParams(max_new_tokens=6), mixer=mixer)[0]
        seq, want = list(ids), []
        for _ in range(out.n_tokens):
            want.append(int(logits(lm, seq)[0, -1].argmax()))
            seq.append(want[-1])
    assert lm.tokenizer.decode(want, skip_special_tokens=True) == out.text
    with mixer.applied([{"low": 2.0}], merge=True):
        merged = logits(lm)
    assert float((adapter - merged).abs().max()) <= 0.05 * float(merged.abs().max())  # bf16 rounding of W + delta
    result = export_mix(lm, mixer, {"low": 1.5, "full": -0.8}, tmp_path / "hf")
    assert result.check["dtype"] == "bfloat16" and result.check["max_abs_logit_diff"] <= result.check["tolerance"]
