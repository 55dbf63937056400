import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.directions import DirectionError
from engine.loading import load_direction
from engine.dpo import completion_sums, dpo_loss, encode_pairs, token_logps
from engine.errors import Cancelled
from engine.mixer import Mixer
from engine.models import load_model
from engine.tangent import completion_logps, linear_weights, linearization_gap, shared_A0
from engine.train import BatchPlan, TrainConfig, train_direction
from engine.weight_delta import WeightDelta

SMALL = dict(max_prompt_tokens=32, max_response_tokens=32)


def test_dpo_loss_matches_the_published_formula_by_hand():
    pi_c, pi_r = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-12.0, -19.0, -9.0])
    ref_c, ref_r = torch.tensor([-11.0, -18.0, -6.0]), torch.tensor([-11.5, -18.5, -8.0])
    beta = 0.2
    loss, m = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "sigmoid")
    by_hand, rc, rr = [], [], []
    for a, b, c, d in zip(pi_c.tolist(), pi_r.tolist(), ref_c.tolist(), ref_r.tolist()):
        z = beta * ((a - c) - (b - d))
        by_hand.append(-math.log(1 / (1 + math.exp(-z))))
        rc.append(beta * (a - c))
        rr.append(beta * (b - d))
    assert float(loss) == pytest.approx(sum(by_hand) / 3, rel=1e-6)
    assert float(m["rewards/chosen"]) == pytest.approx(sum(rc) / 3, rel=1e-6)
    assert float(m["rewards/rejected"]) == pytest.approx(sum(rr) / 3, rel=1e-6)
    assert float(m["rewards/accuracies"]) == pytest.approx(sum(x > y for x, y in zip(rc, rr)) / 3)
    assert float(m["rewards/margins"]) == pytest.approx(sum(x - y for x, y in zip(rc, rr)) / 3, rel=1e-6)
    # IPO averages the log-ratios per completion token inside the loss; its metrics are the summed ones above.
    len_c, len_r = torch.tensor([4.0, 10.0, 2.0]), torch.tensor([5.0, 8.0, 3.0])
    ipo, m_ipo = dpo_loss(pi_c, pi_r, ref_c, ref_r, beta, "ipo", lengths=(len_c, len_r))
    expected = sum((((a - c) / lc - (b - d) / lr) - 1 / (2 * beta)) ** 2
                   for a, b, c, d, lc, lr in zip(pi_c.tolist(), pi_r.tolist(), ref_c.tolist(), ref_r.tolist(),
                                                 len_c.tolist(), len_r.tolist())) / 3
    assert float(ipo) == pytest.approx(expected, rel=1e-6)
    for k, v in m.items():
        if k != "loss":
            assert float(m_ipo[k]) == pytest.approx(float(v), rel=1e-6), k


def test_completion_logps_by_hand():
    logits = torch.tensor([[[0.0, 1.0, 2.0], [1.0, 1.0, 1.0], [5.0, 0.0, 0.0]]])
    labels = torch.tensor([[2, 0, 1]])
    mask = torch.tensor([[True, True, False]])  # the third position is not part of the completion
    lse = math.log(1 + math.e + math.e ** 2)
    expected = (2.0 - lse) + (1.0 - math.log(3 * math.e))
    per_token = token_logps(logits[mask], labels[mask])
    assert float(completion_sums(per_token, mask)[0]) == pytest.approx(expected, rel=1e-6)


def test_jvp_primal_is_the_reference_model(tiny_lm, tiny_pairs):
    batch = encode_pairs(tiny_lm, tiny_pairs.pairs[:2], **SMALL)
    names = linear_weights(tiny_lm)
    deltas = {n: 1e-3 * torch.randn_like(dict(tiny_lm.model.named_parameters())[n]) for n in names}
    _, ref = completion_logps(tiny_lm, batch, deltas, "tangent")
    with torch.no_grad():
        logits = tiny_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                               position_ids=batch.position_ids).logits
    mask = batch.target_mask.bool()
    direct = completion_sums(token_logps(logits[mask], batch.targets[mask]), mask)
    torch.testing.assert_close(ref, direct, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("param", ["full", "lowrank"])
def test_linearized_and_ordinary_agree_to_second_order(tiny_lm, tiny_pairs, param):
    """For tau -> eps tau, |f_lin - f| shrinks like eps^2 (halving eps divides the error by about 4): full deltas
    through the jvp, low-rank ones through the adapter's dual tangent and the LoRA branch."""
    batch = encode_pairs(tiny_lm, tiny_pairs.pairs[:2], **SMALL)
    g = torch.Generator().manual_seed(0)
    names = linear_weights(tiny_lm)
    params = dict(tiny_lm.model.named_parameters())
    if param == "full":
        tau = {n: torch.randn(params[n].shape, generator=g) * params[n].detach().std() * 0.5 for n in names}
    else:
        tau = {}
        for n in names:
            A = shared_A0(n, 4, params[n].shape[1], seed=0)
            tau[n + ":B"] = torch.randn(params[n].shape[0], 4, generator=g) * params[n].detach().std() * 2.0
            tau[n + ":A"] = A
    d = WeightDelta("x", param, tau, tiny_lm.identity())
    errors = []
    for eps in (0.4, 0.2, 0.1):
        gap = linearization_gap(tiny_lm, batch, d * eps)
        errors.append(gap["gap_mean"])
    ratios = [errors[i] / errors[i + 1] for i in range(2)]
    assert all(3.0 < r < 5.5 for r in ratios), (errors, ratios)


def test_lowrank_mix_is_exact_and_restores_bit_identical(tiny_lm, tiny_pairs):
    names = linear_weights(tiny_lm, layers=[0, 2], modules=["mlp"])
    g = torch.Generator().manual_seed(1)
    dirs = []
    for k in range(2):
        tensors = {}
        for n in names:
            w = dict(tiny_lm.model.named_parameters())[n]
            tensors[n + ":B"] = torch.randn(w.shape[0], 4, generator=g) * 0.01
            tensors[n + ":A"] = shared_A0(n, 4, w.shape[1], seed=0)
        dirs.append(WeightDelta(f"obj{k}", "lowrank", tensors, tiny_lm.identity(), name=f"d{k}"))
    params = dict(tiny_lm.model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    ids = tiny_lm.tokenizer("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = tiny_lm.model(ids).logits
    mixer = Mixer(tiny_lm)
    for d in dirs:
        mixer.add(d)
    mixer.set_row_weights([{"d0": 0.7, "d1": -1.3}], merge=True)  # merged: the adapter path leaves the weights
    for n in names:
        B = 0.7 * dirs[0].tensors[n + ":B"] - 1.3 * dirs[1].tensors[n + ":B"]
        torch.testing.assert_close(params[n].detach(), before[n] + B @ dirs[0].tensors[n + ":A"], atol=1e-6, rtol=1e-5)
    mixer.set_weights({"d0": 0.2})
    mixer.clear()
    assert all(torch.equal(params[n].detach(), before[n]) for n in params)
    with torch.no_grad():
        assert torch.equal(tiny_lm.model(ids).logits, base_logits)


@pytest.fixture(scope="module")
def trained(_tiny_lm_and_snapshot, tiny_pairs):
    cfg = TrainConfig(steps=6, param="lowrank", rank=4, **SMALL)
    return train_direction(_tiny_lm_and_snapshot[0], tiny_pairs, cfg)


def test_training_records_trl_metrics_and_a_loadable_direction(tiny_lm, trained, tmp_path):
    h = trained.history
    assert [r["step"] for r in h] == list(range(1, 7))
    assert h[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # tau = 0 at the start: policy = reference
    assert {"rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "eta_s", "lr"} <= set(h[0])
    assert "rewards/accuracies" in trained.val_metrics
    d = trained.direction
    assert d.kind == "weights" and d.method == "tangent" and d.param == "lowrank" and d.norm() > 0
    path = d.save(tmp_path / "t.safetensors")
    loaded = load_direction(path, tiny_lm)
    assert isinstance(loaded, WeightDelta) and loaded.meta["hyperparameters"]["steps"] == 6
    mixer = Mixer(tiny_lm)
    mixer.add(loaded)
    mixer.set_weights({loaded.name: 1.0})
    assert mixer.active
    mixer.clear()


def test_direction_for_another_model_or_nan_is_refused(trained, tmp_path, other_tiny_dir, tiny_lm):
    path = trained.direction.save(tmp_path / "t.safetensors")
    with pytest.raises(DirectionError, match="not for the loaded model tiny-other"):
        load_direction(path, load_model(other_tiny_dir))
    bad = dict(trained.direction.tensors)
    key = next(iter(bad))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("inf")
    WeightDelta("x", "lowrank", bad, tiny_lm.identity()).save(tmp_path / "inf.safetensors")
    with pytest.raises(DirectionError, match="NaN or infinite"):
        load_direction(tmp_path / "inf.safetensors", tiny_lm)


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_lm, tiny_pairs, tmp_path):
    cfg = TrainConfig(steps=6, param="full", checkpoint_every=2, **SMALL)
    whole = train_direction(tiny_lm, tiny_pairs, cfg)
    steps = []  # stop once three steps are done; the cancel may land inside the fourth, which is then dropped
    with pytest.raises(Cancelled):
        train_direction(tiny_lm, tiny_pairs, cfg, progress=lambda p: steps.append(p.done),
                        should_stop=lambda: max(steps, default=0) >= 3, checkpoint_dir=tmp_path / "ck")
    assert json.loads((tmp_path / "ck" / "state.json").read_text())["step"] == 3
    resumed = train_direction(tiny_lm, tiny_pairs, cfg, checkpoint_dir=tmp_path / "ck")
    for n in whole.direction.weight_names():
        torch.testing.assert_close(resumed.direction.weight_delta(n), whole.direction.weight_delta(n), atol=1e-7, rtol=1e-5)
    with pytest.raises(DirectionError, match="other settings or data"):
        train_direction(tiny_lm, tiny_pairs, TrainConfig(steps=7, param="full", **SMALL), checkpoint_dir=tmp_path / "ck")


def test_scalarized_baseline_mixes_sources_by_weight(tiny_lm, tiny_pairs, demo_data):
    from engine.data import load_pairs

    other = load_pairs(demo_data / "hh_rlhf_harmless_600.jsonl", limit=24)
    plan = BatchPlan([(tiny_pairs.pairs, 0.25), (other.pairs, 0.75)], 4, seed=0)
    counts = [sum(plan.counts(s)[k] for s in range(400)) for k in range(2)]
    assert counts[0] / 1600 == pytest.approx(0.25, abs=0.03)
    assert plan.batch(5) == plan.batch(5)
    res = train_direction(tiny_lm, [(tiny_pairs, 0.3), (other, 0.7)], TrainConfig(method="scalarized", steps=3, **SMALL))
    assert res.direction.kind == "weights" and res.direction.method == "scalarized" and res.direction.norm() > 0
    assert [s["weight"] for s in res.direction.meta["objective_sources"]] == [0.3, 0.7]


@pytest.mark.parametrize("param", ["full", "lowrank"])
def test_two_processes_match_one(tiny_model_dir, demo_data, tmp_path, param):
    """DDP over two CPU processes (gloo) gives the same direction as one process on the same data: full rank
    through the jvp, low rank through the adapter's dual tangent."""
    bin_dir = Path(sys.executable).parent
    common = ["train", "--data", str(demo_data / "ultrafeedback_helpfulness_400.jsonl"), "--limit", "24",
              "--objective", "help", "--model", str(tiny_model_dir), "--steps", "4", "--param", param,
              "--max-prompt-tokens", "32", "--max-response-tokens", "32", "--no-store"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([str(bin_dir / "tsdpo"), *common, "--out", str(tmp_path / "one.safetensors")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", str(29517 + (param == "lowrank")),
                          "-m", "engine.cli", *common, "--out", str(tmp_path / "two.safetensors")],
                         capture_output=True, text=True, env=env, timeout=600, cwd=str(Path(__file__).parents[1]))
    assert two.returncode == 0, two.stderr[-2000:]
    a = WeightDelta.load(tmp_path / "one.safetensors")
    b = WeightDelta.load(tmp_path / "two.safetensors")
    assert a.meta["processes"] == 1 and b.meta["processes"] == 2
    for n in a.weight_names():
        torch.testing.assert_close(b.weight_delta(n), a.weight_delta(n), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("command", ["train", "train-scalarized"])
def test_a_learning_rate_grid_keeps_the_lowest_held_out_loss(tiny_model_dir, demo_data, tmp_path, capsys, command):
    """The same care for TS-DPO and the scalarized baseline: one run per rate, the rest of the settings alike,
    the direction with the lowest held-out DPO loss kept, and every run's metrics in its file."""
    from engine.cli import main

    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    data = ["--data", str(uf), "--objective", "help"] if command == "train" else \
        ["--data", f"help={uf}", "--data", f"verbosity={uf}", "--weight", "0.5"]
    common = [command, "--model", str(tiny_model_dir), *data, "--limit", "30", "--steps", "3", "--batch-size", "2",
              "--val-fraction", "0.3", "--max-prompt-tokens", "32", "--max-response-tokens", "32", "--no-store"]
    grid = [1e-4, 3e-2, 3.0]
    assert main([*common, "--lr-grid", ",".join(map(str, grid)), "--out", str(tmp_path / "grid.safetensors")]) == 0
    out = capsys.readouterr().out
    d = load_direction(tmp_path / "grid.safetensors", load_model(tiny_model_dir))
    search = d.meta["lr_search"]
    runs = {r["lr"]: r["val_loss"] for r in search["runs"]}
    assert search["grid"] == grid and set(runs) == set(grid)
    assert search["chosen"] == min(runs, key=runs.get) == d.meta["hyperparameters"]["lr"]
    assert len(set(runs.values())) == 3  # the rates did train differently
    assert f"lr {search['chosen']:<10g}" in out and "<- kept" in out
    # the kept direction is the one a plain run at that rate gives
    assert main([*common, "--lr", str(search["chosen"]), "--out", str(tmp_path / "plain.safetensors")]) == 0
    plain = load_direction(tmp_path / "plain.safetensors", load_model(tiny_model_dir))
    for n in d.weight_names():
        assert torch.equal(d.weight_delta(n), plain.weight_delta(n)), n
    assert main([*common, "--lr-grid", "1e-3", "--out", str(tmp_path / "x.safetensors")]) == 2
    assert "two or more" in capsys.readouterr().err


@pytest.mark.parametrize("method,param", [("tangent", "lowrank"), ("tangent", "full"), ("scalarized", "lowrank")])
def test_one_plain_step_scores_every_learning_rate_from_one_run(tiny_lm, demo_data, monkeypatch, method, param):
    """One SGD step from tau = 0 is the rate times one vector, so a grid trains once and scores each rate's multiple
    (one forward-mode pass per batch for TS-DPO): the same held-out losses and the same kept direction as one
    run per rate."""
    from dataclasses import replace

    from engine import train as train_module
    from engine.data import load_pairs

    pairs = load_pairs(demo_data / "ultrafeedback_helpfulness_400.jsonl", limit=16)
    data = pairs if method == "tangent" else [(pairs, 1.0)]
    cfg = TrainConfig(method=method, param=param, rank=4, steps=1, batch_size=11, grad_accum=1, optimizer="sgd",
                      val_fraction=0.3, max_prompt_tokens=24, max_response_tokens=24, max_grad_norm=0.0)
    grid = [0.3, 3.0, 30.0] if param == "lowrank" else [3e-3, 3e-2, 3e-1]
    runs = []
    original = train_module._train
    monkeypatch.setattr(train_module, "_train", lambda *a: runs.append(a[-1]) or original(*a))
    phases = []
    best = train_module.train_with_lr_search(tiny_lm, data, cfg, grid, progress=lambda p: phases.append(p))
    assert runs == [tuple(lr / grid[0] for lr in grid)]  # one training run, scored at every rate
    assert [p.phase for p in phases if "val_loss" in (p.metrics or {})] == [
        f"scored at lr {lr:g} ({i + 1} of 3)" for i, lr in enumerate(grid)]
    assert any(p.phase == "one step for 3 learning rates" for p in phases)
    search = best.direction.meta["lr_search"]
    losses = {r["lr"]: r["val_loss"] for r in search["runs"]}
    assert len({round(v, 6) for v in losses.values()}) == 3  # the rates are told apart
    one_by_one = {lr: train_module.train_direction(tiny_lm, data, replace(cfg, lr=lr)) for lr in grid}
    assert len(runs) == 1 + len(grid)
    for lr, result in one_by_one.items():
        assert losses[lr] == pytest.approx(result.val_metrics["loss"], rel=1e-5, abs=1e-6), lr
    chosen = search["chosen"]
    assert chosen == min(losses, key=losses.get) == best.direction.meta["hyperparameters"]["lr"]
    assert best.direction.meta["final_train"]["lr"] == pytest.approx(chosen)
    plain = one_by_one[chosen].direction
    for n in plain.weight_names():
        torch.testing.assert_close(best.direction.weight_delta(n), plain.weight_delta(n), rtol=1e-5, atol=1e-8)
    # more than one step does not scale with the rate: one run per rate, as before
    runs.clear()
    train_module.train_with_lr_search(tiny_lm, data, replace(cfg, steps=2), grid[:2])
    assert runs == [(1.0,), (1.0,)]
