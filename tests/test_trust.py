"""The engine owns the model's state: functions that need the base get it whatever a caller applied; a
failed or invalid mix never leaves a half-edited model; cancels act within a block; nothing non-finite
gets in; no model code runs unless the user turned it on."""

import ast
import json
import math
from pathlib import Path

import pytest
import torch

from engine.directions import DirectionError
from engine.errors import Cancelled, ModelLoadError
from engine.mixer import Mixer
from engine.progress import CancelToken
from engine.steering import extract
from engine.tangent import DirectionModel, linear_weights, linearization_gap
from engine.train import BatchPlan, TrainConfig, train_direction
from tiny_model import random_tangent

SMALL = dict(max_prompt_tokens=32, max_response_tokens=32)
REPO = Path(__file__).resolve().parents[1]


def _params(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


def _strong_mixer(lm, vector):
    """A mix with both kinds applied hard: steering hooks on blocks and weights edited in place."""
    mixer = Mixer(lm)
    mixer.add(vector, name="steer")
    mixer.add(random_tangent(lm, "w", seed=3, param="full", scale=0.5), name="weights")
    mixer.set_weights({"steer": -0.65 * 3, "weights": 0.74 * 3})
    return mixer


def _logits(lm, ids):
    with torch.no_grad():
        return lm.model(ids).logits.clone()


# ----------------------------------------------------------------------------- jobs run at the base

def test_extract_and_training_ignore_a_mix_the_caller_left_applied(tiny_lm, tiny_pairs, tiny_vector):
    pairs = tiny_pairs.limit(8)
    kw = dict(batch_size=4, max_response_tokens=16, max_prompt_tokens=16)
    cfg = TrainConfig(steps=2, param="lowrank", rank=4, **SMALL)
    at_origin = extract(tiny_lm, pairs, **kw)
    trained_at_origin = train_direction(tiny_lm, pairs, cfg).direction
    scal_cfg = TrainConfig(method="scalarized", steps=2, param="lowrank", rank=4, **SMALL)
    scal_at_origin = train_direction(tiny_lm, [(pairs, 0.5), (pairs, 0.5)], scal_cfg).direction

    ids = torch.tensor([[1, 5, 9, 14, 22, 7]])
    mixer = _strong_mixer(tiny_lm, tiny_vector)
    mixed = _logits(tiny_lm, ids)
    rows = [dict(r) for r in mixer.rows]

    under_mix = extract(tiny_lm, pairs, **kw)
    assert torch.equal(under_mix.vectors, at_origin.vectors) and torch.equal(under_mix.norms, at_origin.norms)
    assert under_mix.meta["steerability"] == at_origin.meta["steerability"]
    trained = train_direction(tiny_lm, pairs, cfg).direction
    for k, v in trained_at_origin.tensors.items():
        assert torch.equal(trained.tensors[k], v), k
    scal = train_direction(tiny_lm, [(pairs, 0.5), (pairs, 0.5)], scal_cfg).direction
    for k, v in scal_at_origin.tensors.items():
        assert torch.equal(scal.tensors[k], v), k

    # The caller's mix is back, exactly, and the files say what was applied while they were built: nothing.
    assert mixer.rows == rows and torch.equal(_logits(tiny_lm, ids), mixed)
    assert under_mix.meta["applied_while_built"] == [] and trained.meta["applied_while_built"] == []
    assert trained.meta["model"]["fingerprint"] == tiny_lm.fingerprint and trained.meta["data_hash"]
    assert under_mix.meta["data_hash"] == pairs.data_hash() and under_mix.meta["method"]["strength"] == under_mix.strength


def test_linearization_gap_and_margin_gradients_see_the_base(tiny_lm, tiny_pairs, tiny_vector):
    from engine.dpo import encode_pairs
    from engine.sweep import margin_gradients

    d = random_tangent(tiny_lm, "h", seed=5, scale=0.3)
    batch = encode_pairs(tiny_lm, tiny_pairs.pairs[:2], 16, 16)
    gap0 = linearization_gap(tiny_lm, batch, d * 1.0)
    g0 = margin_gradients(tiny_lm, tiny_pairs.pairs[:2], {"h": d}, max_tokens=16)
    _strong_mixer(tiny_lm, tiny_vector)
    gap = linearization_gap(tiny_lm, batch, d * 1.0)
    assert torch.equal(gap["linearized"], gap0["linearized"]) and torch.equal(gap["ordinary"], gap0["ordinary"])
    assert torch.equal(margin_gradients(tiny_lm, tiny_pairs.pairs[:2], {"h": d}, max_tokens=16), g0)


def test_a_kernel_switch_for_the_jvp_is_put_back(tiny_lm, tiny_pairs):
    from engine.dpo import encode_pairs
    from engine.tangent import completion_logp_derivative

    tiny_lm.model.set_attn_implementation("sdpa")
    d = random_tangent(tiny_lm, "h", seed=5)
    batch = encode_pairs(tiny_lm, tiny_pairs.pairs[:2], 16, 16)
    completion_logp_derivative(tiny_lm, batch, {n: d.weight_delta(n) for n in d.weight_names()})
    assert tiny_lm.model.config._attn_implementation == "sdpa"
    train_direction(tiny_lm, tiny_pairs.limit(4), TrainConfig(steps=1, **SMALL))
    assert tiny_lm.model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- applying a mix

def test_a_failure_while_applying_leaves_the_exact_base(tiny_lm, tiny_vector, monkeypatch):
    base = _params(tiny_lm)
    mixer = Mixer(tiny_lm)
    good = random_tangent(tiny_lm, "good", seed=1, param="full", scale=0.5)
    bad = random_tangent(tiny_lm, "bad", seed=2, param="full", scale=0.5)
    mixer.add(good, name="good")
    mixer.add(bad, name="bad")
    mixer.add(tiny_vector, name="steer")
    mixer.set_weights({"good": 0.7, "steer": 1.0})
    names, real = bad.weight_names(), bad.weight_delta

    def failing(n):  # the third weight of "bad" cannot be read (a device error, a damaged tensor, ...)
        if n == names[2]:
            raise RuntimeError("simulated failure in the middle of applying")
        return real(n)

    monkeypatch.setattr(bad, "weight_delta", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        mixer.set_weights({"good": 0.7, "bad": 0.9, "steer": 1.0})
    for n, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, base[n]), n
    assert mixer.rows == [{}] and not mixer.active and tiny_lm.applied() == []
    mixer.clear()  # the old bug: clear() returned early and left the edited weights
    for n, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_weights_must_be_finite_and_an_overflow_is_refused(tiny_lm, tiny_vector):
    base = _params(tiny_lm)
    mixer = Mixer(tiny_lm)
    mixer.add(tiny_vector, name="steer")
    mixer.add(random_tangent(tiny_lm, "w", seed=1, scale=0.5), name="w")
    mixer.set_weights({"w": 0.5})
    before = _params(tiny_lm)
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(DirectionError, match="finite"):
            mixer.set_weights({"steer": bad})
        assert mixer.rows == [{"w": 0.5}]  # an invalid request changes nothing
    for n, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, before[n])
    with pytest.raises(DirectionError, match="overflow"):
        mixer.set_weights({"w": 1e308})
    for n, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, base[n]), n  # failed while applying: the exact base
    with pytest.raises(DirectionError, match="too large"):
        mixer.set_weights({"steer": 1e308})


def test_a_direction_whose_layers_are_out_of_range_is_refused(tiny_lm, tiny_vector, tmp_path):
    from engine.loading import load_direction

    bad = tiny_vector.with_settings()
    bad.layers = [7]
    bad.save(tmp_path / "bad.safetensors")
    with pytest.raises(DirectionError, match="layers"):
        load_direction(tmp_path / "bad.safetensors", tiny_lm)
    with pytest.raises(DirectionError, match="layers 0 to 2"):
        Mixer(tiny_lm).add(bad)


# ----------------------------------------------------------------------------- cancel

def _count_blocks(lm):
    calls = []
    handles = [b.register_forward_pre_hook(lambda *_: calls.append(1)) for b in lm.decoder_layers()]
    return calls, handles


def test_a_cancel_during_layer_ranking_stops_within_a_block(tiny_lm, tiny_pairs):
    token = CancelToken()
    after = []

    def progress(p):
        if p.phase == "ranking layers" and p.done == 1:
            token.set()
            after.clear()  # count block calls from the moment of the cancel

    calls, handles = _count_blocks(tiny_lm)
    try:
        def counting(*_):
            after.append(1)

        extra = [b.register_forward_pre_hook(counting) for b in tiny_lm.decoder_layers()]
        with pytest.raises(Cancelled):
            extract(tiny_lm, tiny_pairs.limit(8), batch_size=4, max_response_tokens=16, progress=progress,
                    should_stop=token)
    finally:
        for h in handles + extra:
            h.remove()
    # Before, the check was once per layer: the other sign's whole forward pass (3 blocks) ran first.
    assert len(after) <= 1


def test_a_cancel_inside_a_training_step_drops_that_step(tiny_lm, tiny_pairs, tmp_path):
    token = CancelToken()
    blocks_seen = []

    def pre(*_):
        blocks_seen.append(1)
        if len(blocks_seen) == 2:  # inside the forward pass of the first step
            token.set()

    handles = [b.register_forward_pre_hook(pre) for b in tiny_lm.decoder_layers()]
    try:
        with pytest.raises(Cancelled):
            train_direction(tiny_lm, tiny_pairs.limit(8), TrainConfig(steps=50, param="full", **SMALL),
                            should_stop=token, checkpoint_dir=tmp_path / "ck")
    finally:
        for h in handles:
            h.remove()
    assert len(blocks_seen) <= 3  # no block ran after the one where it was cancelled (the hook raises before it)
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["step"] == 0


def test_only_the_main_process_writes_the_cancel_checkpoint(tiny_lm, tiny_pairs, tmp_path, monkeypatch):
    import accelerate

    monkeypatch.setattr(accelerate.Accelerator, "is_main_process", property(lambda self: False))
    with pytest.raises(Cancelled):
        train_direction(tiny_lm, tiny_pairs.limit(8), TrainConfig(steps=5, param="full", **SMALL),
                        should_stop=lambda: True, checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


def test_loading_a_model_can_be_cancelled(tiny_model_dir):
    from engine.models import load_model

    with pytest.raises(Cancelled):
        load_model(tiny_model_dir, should_stop=lambda: True)


# ----------------------------------------------------------------------------- DPO metrics and batches

def test_ipo_metrics_are_computed_from_summed_logps_like_trl(tiny_lm, tiny_pairs):
    from engine.dpo import encode_pairs

    names = linear_weights(tiny_lm)
    batch = encode_pairs(tiny_lm, tiny_pairs.pairs[:3], 16, 24)
    module = DirectionModel(tiny_lm, names, "full")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.tau.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    _, sig = module(batch, 0.1, "sigmoid")
    loss, ipo = module(batch, 0.1, "ipo")
    for k in ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected"):
        assert float(ipo[k]) == pytest.approx(float(sig[k]), rel=1e-6), k
    assert abs(float(sig["logps/chosen"])) > 5  # sums over the completion, not per-token means


def test_batch_plan_walks_the_steps_in_linear_time(tiny_pairs, monkeypatch):
    plan = BatchPlan([(tiny_pairs.pairs, 0.6), (tiny_pairs.pairs[::-1], 0.4)], batch_size=4, seed=1)
    fresh = BatchPlan([(tiny_pairs.pairs, 0.6), (tiny_pairs.pairs[::-1], 0.4)], batch_size=4, seed=1)
    calls = []
    real = plan.counts
    monkeypatch.setattr(plan, "counts", lambda s: calls.append(s) or real(s))
    batches = [plan.batch(s) for s in range(300)]
    assert len(calls) <= 2 * 300  # replaying every earlier step made this 300 * 301 / 2 + 300
    assert batches[250] == fresh.batch(250) and plan.batch(10) == fresh.batch(10)  # still a pure function of the step


# ----------------------------------------------------------------------------- test isolation

def _left_behind(*_):
    return None


def test_isolation_a_test_that_leaves_the_model_changed(tiny_lm):
    with torch.no_grad():
        next(tiny_lm.model.parameters()).add_(1.0)
    tiny_lm.decoder_layers()[0].register_forward_hook(_left_behind)
    tiny_lm.model.set_attn_implementation("eager")
    Mixer(tiny_lm)


def test_isolation_the_next_test_gets_it_back(tiny_lm, tiny_model_dir):
    from engine.models import load_model

    fresh = load_model(tiny_model_dir)
    for (n, p), q in zip(tiny_lm.model.named_parameters(), fresh.model.parameters()):
        assert torch.equal(p, q), n
    assert _left_behind not in tiny_lm.decoder_layers()[0]._forward_hooks.values()
    assert tiny_lm.model.config._attn_implementation == fresh.model.config._attn_implementation
    assert not list(tiny_lm.mixers)


# ----------------------------------------------------------------------------- no custom code by accident

def _remote_code_folder(tmp_path, tiny_model_dir, model_type: str) -> tuple[Path, Path]:
    import shutil

    folder = tmp_path / f"custom-{model_type}"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / f"ran-{model_type}"
    code = f"open({str(marker)!r}, 'w').write('custom code ran')\n"
    (folder / "modeling_custom.py").write_text(code + "from transformers import LlamaForCausalLM as CustomModel\n"
                                               "from transformers import LlamaForSequenceClassification as CustomClassifier\n")
    (folder / "configuration_custom.py").write_text(code + "from transformers import LlamaConfig as CustomConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForCausalLM": "modeling_custom.CustomModel",
                          "AutoModelForSequenceClassification": "modeling_custom.CustomClassifier"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_a_folder_with_custom_code_is_refused_everywhere_a_model_is_loaded(tiny_lm, tiny_model_dir, tmp_path,
                                                                           monkeypatch, demo_data):
    import builtins

    from engine.data import load_pairs
    from engine.models import load_model
    from engine.sweep import Method, Sweep, SweepConfig, SweepError

    monkeypatch.setattr(builtins, "input", lambda *a, **k: "y")  # a user who answers transformers' prompt with "y"
    folder, marker = _remote_code_folder(tmp_path, tiny_model_dir, "tsdpo-custom")
    with pytest.raises(ModelLoadError, match="trust_remote_code"):
        load_model(folder)
    assert not marker.exists()

    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    data = {"helpfulness": load_pairs(uf, limit=20).split(0.2)[1],
            "verbosity": load_pairs(uf, objective="verbosity", limit=20).split(0.2)[1]}
    tx, ty = random_tangent(tiny_lm, "helpfulness", 1), random_tangent(tiny_lm, "verbosity", 2)
    cfg = SweepConfig(grid=3, pairs=2, prompts=["Hi"], max_new_tokens=2, reward_model=str(folder), linearization_gap=False)
    sweep = Sweep(tiny_lm, [Method("tangent", "tangent", tx, ty)], data, cfg, tmp_path / "sweep")
    with pytest.raises(SweepError, match="reward model"):
        sweep._score([("Hi", "Hello")])
    assert not marker.exists()


def test_every_from_pretrained_passes_the_users_choice_of_remote_code():
    """A static check over the project's own code: no loader relies on transformers' default (which asks on stdin)."""
    missing = []
    for path in list((REPO / "engine").rglob("*.py")) + list((REPO / "studio").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                if not any(k.arg in ("trust_remote_code", None) for k in node.keywords):
                    missing.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not missing, missing
