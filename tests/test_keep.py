"""Training a direction that keeps another objective's margins where they are (`engine.keep`, `tsdpo train
--keep-unchanged`): checked with forward-mode derivatives (a JVP along the trained direction), not with the
backward gradients the basis was made from."""

import json

import pytest
import torch

from engine.data import PairSet, load_pairs
from engine.directions import DirectionError
from engine.dpo import encode_pairs
from engine.errors import Cancelled
from engine.keep import orthonormal_rows
from engine.tangent import completion_logp_derivative
from engine.train import TrainConfig, kept_margins, train_direction
from tiny_model import applied_full_mix

from conftest import DEMO_DATA

CFG = TrainConfig(param="lowrank", rank=4, steps=4, batch_size=4, lr=2e-2, val_fraction=0.3, max_prompt_tokens=24,
                  max_response_tokens=24)


@pytest.fixture(scope="module")
def two_objectives():
    helpful = load_pairs(DEMO_DATA / "ultrafeedback_helpfulness_400.jsonl", limit=14)
    verbose = load_pairs(DEMO_DATA / "ultrafeedback_helpfulness_400.jsonl", objective="verbosity", limit=40).limit(14)
    return PairSet("helpfulness", helpful.pairs[:14], source=helpful.source), verbose


def _margin_derivatives(lm, direction, pairs) -> torch.Tensor:
    """d/de [log p(chosen) - log p(rejected)] at theta0 along the direction, per pair (one JVP)."""
    deltas = {n: direction.weight_delta(n) for n in direction.weight_names()}
    batch = encode_pairs(lm, pairs, CFG.max_prompt_tokens, CFG.max_response_tokens)
    _, d = completion_logp_derivative(lm, batch, deltas)
    return d[: len(pairs)] - d[len(pairs):]


def test_a_direction_that_keeps_pairs_leaves_their_margins_unchanged_to_first_order(tiny_lm, two_objectives):
    helpful, verbose = two_objectives
    kept_train, kept_heldout = verbose.split(CFG.val_fraction, CFG.seed)
    free = train_direction(tiny_lm, helpful, CFG).direction
    kept = train_direction(tiny_lm, helpful, CFG, keep=verbose).direction
    moved = _margin_derivatives(tiny_lm, free, kept_train.pairs)
    still = _margin_derivatives(tiny_lm, kept, kept_train.pairs)
    assert moved.abs().max() > 1e-2  # without the constraint the helpfulness direction moves these margins
    assert still.abs().max() < 1e-4 * moved.abs().max(), (still, moved)
    # It is still a helpfulness direction: it moves its own training pairs, and most of the free direction remains
    own = _margin_derivatives(tiny_lm, kept, helpful.split(CFG.val_fraction, CFG.seed)[0].pairs)
    assert own.mean() > 0
    info = kept.meta["kept_unchanged"]
    assert info["objective"] == "verbosity" and info["pairs"] == len(kept_train) and info["basis"] <= len(kept_train)
    assert info["share_in_span"] < 1e-5 and info["data_hash"] == verbose.data_hash()
    assert 0 < kept.meta["final_train"]["kept/removed_share"] < 1  # part of each step lay in the kept span: taken out
    assert 0 < info["removed_share"] < 1
    # the held-out verbosity pairs were not part of the basis: they stay a fair test of what it does to verbosity
    assert not {p.key() for p in kept_heldout.pairs} & {p.key() for p in kept_train.pairs}


def test_keeping_pairs_with_a_learning_rate_grid_builds_the_basis_once(tiny_lm, two_objectives, monkeypatch):
    from engine import keep as keep_module
    from engine.train import train_with_lr_search

    helpful, verbose = two_objectives
    builds = []
    original = keep_module.KeptMargins.build.__func__
    monkeypatch.setattr(keep_module.KeptMargins, "build",
                        classmethod(lambda cls, *a, **k: builds.append(1) or original(cls, *a, **k)))
    result = train_with_lr_search(tiny_lm, helpful, CFG, [1e-2, 2e-2], keep=verbose)
    assert len(builds) == 1
    d = result.direction
    assert d.meta["kept_unchanged"]["share_in_span"] < 1e-5 and len(d.meta["lr_search"]["runs"]) == 2


def test_keeping_is_refused_for_full_rank_and_stops_at_once_leaving_the_model_as_it_was(tiny_lm, two_objectives):
    from dataclasses import replace

    helpful, verbose = two_objectives
    with pytest.raises(DirectionError, match="low-rank direction"):
        train_direction(tiny_lm, helpful, replace(CFG, param="full"), keep=verbose)
    mixer, ids, mixed = applied_full_mix(tiny_lm)
    calls = iter(range(1000))
    with pytest.raises(Cancelled):
        kept_margins(tiny_lm, verbose, CFG, should_stop=lambda: next(calls) >= 2)
    with torch.no_grad():
        assert torch.equal(tiny_lm.model(ids).logits, mixed)
    # the basis does not depend on what the caller had applied
    under_mix = kept_margins(tiny_lm, verbose, CFG)
    mixer.clear()
    at_base = kept_margins(tiny_lm, verbose, CFG)
    assert torch.allclose(under_mix.Q, at_base.Q, atol=1e-6)


def test_a_direction_left_with_nothing_but_rounding_is_refused(tiny_lm, two_objectives):
    """Plain gradient steps on pairs whose margins are to be kept (here the training pairs themselves) lie wholly in
    their gradients' span: what projection leaves is rounding, and saying so beats saving it as a direction."""
    from dataclasses import replace

    helpful, _ = two_objectives
    with pytest.raises(DirectionError, match=r"took out (99\.\d\d|100\.00)% of every training step"):
        train_direction(tiny_lm, helpful, replace(CFG, optimizer="sgd", steps=2), keep=helpful)


def test_orthonormal_rows_drop_what_adds_nothing():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(5, 300, generator=g, dtype=torch.float64)
    G = torch.cat([G, G[1:2] * 3.0, G[0:1] + G[2:3]])  # two rows inside the span of the others
    Q, dropped = orthonormal_rows(G)
    assert dropped == 2 and Q.shape == (5, 300)
    assert torch.allclose(Q.double() @ Q.double().T, torch.eye(5, dtype=torch.float64), atol=1e-5)
    # every original row lies in the span of Q
    residual = G - (G @ Q.double().T) @ Q.double()
    assert residual.norm() < 1e-4 * G.norm()


def test_a_checkpoint_is_not_resumed_with_other_kept_pairs(tiny_lm, two_objectives, tmp_path):
    from dataclasses import replace

    helpful, verbose = two_objectives
    cfg = replace(CFG, steps=2, checkpoint_every=1)
    first = train_direction(tiny_lm, helpful, cfg, keep=verbose, checkpoint_dir=tmp_path).direction
    assert json.loads((tmp_path / "state.json").read_text())["step"] == 2
    with pytest.raises(DirectionError, match="other settings or data"):
        train_direction(tiny_lm, helpful, cfg, checkpoint_dir=tmp_path)
    other = PairSet("verbosity", verbose.pairs[:-2], source=verbose.source)
    with pytest.raises(DirectionError, match="other settings or data"):
        train_direction(tiny_lm, helpful, cfg, keep=other, checkpoint_dir=tmp_path)
    resumed = train_direction(tiny_lm, helpful, cfg, keep=verbose, checkpoint_dir=tmp_path).direction
    for n in first.tensors:
        assert torch.equal(first.tensors[n], resumed.tensors[n])


def test_cli_train_keep_unchanged(capsys, tiny_model_dir, tmp_path):
    from engine.cli import main

    rows = [json.loads(line) for line in (DEMO_DATA / "ultrafeedback_helpfulness_400.jsonl").read_text().splitlines()[:20]]
    data = tmp_path / "uf.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "help.safetensors"
    args = ["train", "--data", str(data), "--objective", "helpfulness", "--model", str(tiny_model_dir), "--no-store",
            "--rank", "4", "--steps", "2", "--batch-size", "2", "--max-prompt-tokens", "24",
            "--max-response-tokens", "24", "--val-fraction", "0.3", "--out", str(out),
            "--keep-unchanged", f"verbosity={data}"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "kept unchanged: verbosity" in text and "share of the direction in their span" in text
    from engine.loading import open_direction

    assert open_direction(out).meta["kept_unchanged"]["objective"] == "verbosity"
    assert main(args + ["--overwrite", "--param", "full"]) == 2
    assert "low-rank direction" in capsys.readouterr().err
    assert main(args[:-1] + [str(data), "--overwrite"]) == 2  # no OBJECTIVE=
    assert "--keep-unchanged takes OBJECTIVE=FILE" in capsys.readouterr().err
