"""`engine.signal`: per-pair margin gradients, exactly, and the verdict on data whose held-out pairs agree, or
disagree, with the training pairs."""

import json

import pytest
import torch

from engine.data import Pair, PairSet
from engine.dpo import encode_pairs
from engine.errors import Cancelled
from engine.signal import SignalConfig, SignalError, data_signal, pair_gradients, signal_between, verdict_of
from engine.tangent import completion_logps, linear_weights, shared_A0
from tiny_model import applied_full_mix

CFG = SignalConfig(rank=4, max_prompt_tokens=24, max_response_tokens=24, resamples=200)
GOOD = "Rinse the rice, add water, and simmer for fifteen minutes."
BAD = "The quick brown fox jumps over the lazy dog."


def _pairs(n, chosen=GOOD, rejected=BAD, start=0):
    return [Pair([{"role": "user", "content": f"Question {i}: how do I cook rice?"}], chosen, rejected, line=i + 1)
            for i in range(start, start + n)]


def test_each_pairs_gradient_is_its_own_margin_gradient(tiny_lm, tiny_pairs):
    """One batched pass gives every pair the gradient it has alone (autograd through an ordinary low-rank branch at
    B = 0), replies of different lengths and padding included."""
    pairs = tiny_pairs.pairs[:3]
    names = linear_weights(tiny_lm)
    params = dict(tiny_lm.model.named_parameters())
    A = {n: shared_A0(n, CFG.rank, params[n].shape[1], 0) for n in names}
    together = pair_gradients(tiny_lm, pairs, names, A, CFG)
    assert together.shape == (3, sum(params[n].shape[0] * CFG.rank for n in names))
    for i, p in enumerate(pairs):
        B = {n: torch.zeros(params[n].shape[0], CFG.rank, requires_grad=True) for n in names}
        batch = encode_pairs(tiny_lm, [p], CFG.max_prompt_tokens, CFG.max_response_tokens)
        policy, _ = completion_logps(tiny_lm, batch, {n: (B[n], A[n]) for n in names}, "scalarized")
        alone = torch.cat([g.reshape(-1) for g in torch.autograd.grad(CFG.beta * (policy[0] - policy[1]),
                                                                      [B[n] for n in names])])
        assert torch.allclose(together[i], alone, rtol=1e-4, atol=1e-7), i
    assert all(p.grad is None for p in tiny_lm.model.parameters())


def test_held_out_pairs_that_agree_are_signal_and_ones_that_contradict_are_reversed(tiny_lm):
    same = signal_between(tiny_lm, _pairs(8), _pairs(6, start=8), CFG)
    assert same["verdict"] == "signal" and same["effect_interval"][0] > 0 and same["raised"] == 1.0
    assert same["alignment"] > 0.5 and same["train_alignment"] > 0.5
    flipped = signal_between(tiny_lm, _pairs(8), _pairs(6, chosen=BAD, rejected=GOOD, start=8), CFG)
    assert flipped["verdict"] == "reversed" and flipped["effect_interval"][1] < 0 and flipped["raised"] == 0.0
    assert flipped["effect"] == pytest.approx(-same["effect"], rel=0.2)


def test_the_verdict_reads_the_mean_then_the_share_raised():
    assert verdict_of([0.01, 0.2], [0.4, 0.7]) == "signal"
    assert verdict_of([-0.2, -0.01], [0.3, 0.6]) == "reversed"
    assert verdict_of([-0.03, 0.07], [0.53, 0.78]) == "weak"  # most pairs raised, a few strongly lowered
    assert verdict_of([-0.04, 0.08], [0.36, 0.61]) == "none"


def test_signal_runs_at_the_base_whatever_is_applied_and_stops(tiny_lm, tiny_pairs):
    ps = PairSet("helpfulness", tiny_pairs.pairs[:10])
    cfg = SignalConfig(rank=4, max_prompt_tokens=16, max_response_tokens=16, resamples=100, heldout=3)
    clean = data_signal(tiny_lm, ps, cfg)
    # 35% of 10 held out (4), of which --heldout 3 are measured
    assert (clean["train_pairs"], clean["heldout_pairs"], clean["objective"]) == (6, 3, "helpfulness")
    mixer, ids, mixed = applied_full_mix(tiny_lm)
    under_mix = data_signal(tiny_lm, ps, cfg)
    for k in ("effect", "alignment", "train_alignment", "effect_interval"):
        assert under_mix[k] == pytest.approx(clean[k], rel=1e-5, abs=1e-9), k
    with torch.no_grad():
        assert torch.equal(tiny_lm.model(ids).logits, mixed)
    calls = iter(range(100))
    with pytest.raises(Cancelled):
        data_signal(tiny_lm, ps, cfg, should_stop=lambda: next(calls) >= 1)
    with torch.no_grad():
        assert torch.equal(tiny_lm.model(ids).logits, mixed)
    mixer.clear()
    with pytest.raises(SignalError, match="at least 2 of each"):
        data_signal(tiny_lm, PairSet("helpfulness", tiny_pairs.pairs[:2]), cfg)


def test_cli_data_signal(capsys, tiny_model_dir, tmp_path):
    from engine.cli import main

    rows = [{"prompt": p.prompt[0]["content"], "chosen": p.chosen, "rejected": p.rejected} for p in _pairs(12)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["data", "signal", str(data), "--model", str(tiny_model_dir), "--rank", "4", "--max-prompt-tokens", "24",
            "--max-response-tokens", "24"]
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verdict"] == "signal" and out["train_pairs"] + out["heldout_pairs"] == 12
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "verdict: signal" in text and "held-out pairs whose margin it raises" in text
    assert main(args + ["--limit", "2"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tsdpo: error: 2 pairs give 1 to train on") and "at least 2 of each" in err
    assert err.count("\n") == 1  # said before the model loads


def test_one_sgd_step_over_every_training_pair_is_the_direction_the_check_measures(tiny_lm, tiny_pairs):
    """`tsdpo train --optimizer sgd --steps 1 --batch-size N` (no clipping) gives B = lr * beta/2 * mean grad of the
    margins, that is lr/2 times the mean of `pair_gradients` over the training split: the step `data signal` scores."""
    from engine.directions import DirectionError
    from engine.train import TrainConfig, train_direction

    ps = PairSet("helpfulness", tiny_pairs.pairs[:10])
    train, _ = ps.split(0.3, 0)
    cfg = TrainConfig(param="lowrank", rank=4, steps=1, batch_size=len(train), lr=0.5, optimizer="sgd",
                      max_grad_norm=0.0, val_fraction=0.3, max_prompt_tokens=24, max_response_tokens=24)
    direction = train_direction(tiny_lm, ps, cfg).direction
    names = linear_weights(tiny_lm)
    params = dict(tiny_lm.model.named_parameters())
    A = {n: shared_A0(n, 4, params[n].shape[1], 0) for n in names}
    for n in names:
        assert torch.equal(direction.tensors[n + ":A"], A[n])
    trained = torch.cat([direction.tensors[n + ":B"].reshape(-1) for n in names])
    expected = 0.5 * cfg.lr * pair_gradients(tiny_lm, train.pairs, names, A, CFG).mean(0)
    assert torch.allclose(trained, expected, rtol=1e-3, atol=1e-7)
    with pytest.raises(DirectionError, match="optimizer must be one of"):
        TrainConfig(optimizer="lion").validate()
