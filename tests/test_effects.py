"""`tsdpo effects`: each direction alone along its axis, against every objective's held-out pairs."""

import json

import pytest
import torch

from engine.cli import main
from engine.data import Pair, PairSet, load_pairs
from engine.dpo import encode_pairs
from engine.mixer import Mixer
from engine.models import load_model
from engine.sweep import SweepError, monotonicity
from engine.sweep.effects import EffectsConfig, axis_effects, effects_markdown, training_prompts
from engine.tangent import completion_logps
from tiny_model import random_tangent


@pytest.fixture
def setup(tiny_model_dir, tiny_vector, demo_data):
    lm = load_model(tiny_model_dir)
    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    data = {"helpfulness": load_pairs(uf, limit=40).split(0.2)[1],
            "verbosity": load_pairs(uf, objective="verbosity", limit=40).split(0.2)[1]}
    tx = random_tangent(lm, "helpfulness", 1, scale=0.3)
    sv = tiny_vector.with_settings()
    sv.objective, sv.name = "verbosity", "verbosity-steer"
    cfg = EffectsConfig(pairs=6, batch_size=6, max_prompt_tokens=32, max_response_tokens=32, resamples=200)
    return lm, [tx, sv], data, cfg


def test_effects_are_the_margins_a_direct_computation_gives(setup):
    lm, directions, data, cfg = setup
    tx = directions[0]
    result = axis_effects(lm, directions, data, cfg)
    assert list(result["directions"]) == ["helpfulness", "verbosity-steer"]
    assert result["pairs"] == {"helpfulness": 6, "verbosity": 6}
    # The tangent at weight +1, on each objective: beta * [(log pi - log pi0)(y_w) - (log pi - log pi0)(y_l)].
    deltas = {n: tx.weight_delta(n) for n in tx.weight_names()}
    for o in ("helpfulness", "verbosity"):
        pairs = data[o].pairs[:6]
        batch = encode_pairs(lm, pairs, 32, 32)
        with torch.no_grad():
            pol, ref = completion_logps(lm, batch, deltas, "scalarized")
        margins = 0.1 * ((pol[:6] - ref[:6]) - (pol[6:] - ref[6:]))
        entry = result["directions"]["helpfulness"]["objectives"][o]
        assert entry["margin"][cfg.weights.index(1.0)] == pytest.approx(float(margins.mean()), rel=1e-3, abs=1e-5)  # adapter vs merged: fp32 rounding
        assert entry["accuracy"][cfg.weights.index(1.0)] == pytest.approx(float((margins > 0).double().mean()))
    for name, e in result["directions"].items():
        for o, v in e["objectives"].items():
            m = v["margin"]
            assert m[cfg.weights.index(0.0)] == 0.0
            assert v["kendall_tau"] == pytest.approx(monotonicity(m, cfg.weights)["kendall_tau"])
            # Least squares by hand over the five weights.
            w = cfg.weights
            mw, mm = sum(w) / 5, sum(m) / 5
            slope = sum((a - mw) * (b - mm) for a, b in zip(w, m)) / sum((a - mw) ** 2 for a in w)
            assert v["slope"] == pytest.approx(slope)
            lo, hi = v["slope_interval"]
            assert lo <= hi and lo - 1e-9 <= slope <= hi + 1e-9 or abs(slope) < 1e-12
        other = [o for o in e["objectives"] if o != e["objective"]]
        for o in other:
            assert e["cross_effect"][o] == pytest.approx(abs(e["objectives"][o]["slope"]) / abs(e["objectives"][e["objective"]]["slope"]))
    assert len(result["directions"]["helpfulness"]["lin_gap"]) == 5 and "lin_gap" not in result["directions"]["verbosity-steer"]
    assert result["directions"]["helpfulness"]["lin_gap"][cfg.weights.index(1.0)] > 0
    table = effects_markdown(result)
    assert "| helpfulness | tangent | helpfulness (own) |" in table and "Linearization gap" in table


def test_effects_run_at_the_base_and_put_back_what_a_caller_left_applied(setup):
    lm, directions, data, cfg = setup
    cfg.linearization_gap = False
    ids = torch.tensor([[1, 5, 9, 14, 3]])
    with torch.no_grad():
        base = lm.model(input_ids=ids).logits
    caller = Mixer(lm)
    caller.add(random_tangent(lm, "other", 7, scale=0.3), name="other")
    caller.set_weights({"other": 1.0})
    with torch.no_grad():
        mixed = lm.model(input_ids=ids).logits
    assert not torch.allclose(base, mixed)
    first = axis_effects(lm, directions, data, cfg)
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, mixed)  # the caller's mix is back, exactly
    caller.clear()
    with torch.no_grad():
        assert torch.equal(lm.model(input_ids=ids).logits, base)
    second = axis_effects(lm, directions, data, cfg)  # measured from the base either way
    for name in first["directions"]:
        for o in first["directions"][name]["objectives"]:
            assert first["directions"][name]["objectives"][o]["margin"] == pytest.approx(
                second["directions"][name]["objectives"][o]["margin"], abs=1e-6)


def test_pairs_whose_prompt_a_direction_was_trained_on_are_left_out_of_its_figures(setup, demo_data):
    """Files built from the same prompts (UltraFeedback's verbosity and helpfulness pairs) put a direction's own
    training prompts among another objective's held-out pairs; there the margin reads what it learned of that prompt."""
    lm, directions, data, cfg = setup
    cfg.linearization_gap = False
    train, held = load_pairs(demo_data / "ultrafeedback_helpfulness_400.jsonl", limit=40).split(0.2)
    # Verbosity pairs: 3 on prompts the helpfulness direction was trained on (responses swapped), then 5 unseen.
    shared = [Pair(p.prompt, p.rejected, p.chosen) for p in train.pairs[:3]]
    known = training_prompts(train)
    unseen = [p for p in data["verbosity"].pairs if not training_prompts(PairSet("verbosity", [p])) & known][:5]
    assert len(unseen) == 5
    mixed = {"helpfulness": held, "verbosity": PairSet("verbosity", shared[:2] + unseen[:2] + shared[2:] + unseen[2:])}
    cfg.pairs = 8
    result = axis_effects(lm, directions, mixed, cfg, seen={"helpfulness": known})
    clean = axis_effects(lm, directions, {"helpfulness": held, "verbosity": PairSet("verbosity", unseen)}, cfg)
    tx = result["directions"]["helpfulness"]
    assert tx["left_out"] == {"helpfulness": 0, "verbosity": 3}
    assert tx["objectives"]["verbosity"]["pairs"] == 5
    for o in ("helpfulness", "verbosity"):
        for key in ("margin", "accuracy", "slope"):
            assert tx["objectives"][o][key] == pytest.approx(clean["directions"]["helpfulness"]["objectives"][o][key], abs=1e-6)
    assert tx["cross_effect"]["verbosity"] == pytest.approx(clean["directions"]["helpfulness"]["cross_effect"]["verbosity"])
    # The verbosity vector was not trained on those prompts: it is measured on all 8.
    steer = result["directions"]["verbosity-steer"]
    assert steer["left_out"] == {"helpfulness": 0, "verbosity": 0} and steer["objectives"]["verbosity"]["pairs"] == 8
    assert "left out because the direction was trained on their prompt: helpfulness: verbosity 3" in effects_markdown(result)
    # Too few unseen pairs left: refused, saying what to do.
    only_shared = {"helpfulness": held, "verbosity": PairSet("verbosity", shared + unseen[:1])}
    with pytest.raises(SweepError, match="Only 1 of the 4 held-out verbosity pairs"):
        axis_effects(lm, directions, only_shared, cfg, seen={"helpfulness": known})


def test_effects_refuse_bad_weights_and_missing_data(setup):
    lm, directions, data, cfg = setup
    for weights in ([-1.0, 1.0], [-1.0, 0.5, 1.0], [1.0, 0.0, -1.0]):
        with pytest.raises(SweepError, match="weights"):
            axis_effects(lm, directions, data, EffectsConfig(weights=weights))
    with pytest.raises(SweepError, match="No held-out data for objective"):
        axis_effects(lm, directions, {"helpfulness": data["helpfulness"]}, cfg)


def test_cli_effects(tiny_model_dir, demo_data, tmp_path, capsys):
    lm = load_model(tiny_model_dir)
    paths = [random_tangent(lm, o, s, scale=0.3).save(tmp_path / f"{o}.safetensors") for o, s in (("helpfulness", 1), ("verbosity", 2))]
    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    hh = demo_data / "hh_rlhf_harmless_600.jsonl"
    out = tmp_path / "effects.json"
    args = ["effects", "--model", str(tiny_model_dir), "--direction", str(paths[0]), "--direction", str(paths[1]),
            "--data", f"helpfulness={uf}", "--data", f"verbosity={hh}", "--limit", "40", "--pairs", "3",
            "--weights", "-1,0,1", "--max-prompt-tokens", "32", "--max-response-tokens", "32", "--no-store", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert set(result["directions"]) == {"helpfulness", "verbosity"} and result["config"]["weights"] == [-1, 0, 1]
    assert out.with_suffix(".md").read_text() in printed
    assert main(args) == 2 and "exists" in capsys.readouterr().err  # nothing overwritten unasked
    # Verbosity pairs cut from the same UltraFeedback rows: the held-out ones all have prompts the helpfulness
    # direction was trained on (the two objectives' splits differ), so nothing fair is left to measure.
    shared = [a if a != f"verbosity={hh}" else f"verbosity={uf}" for a in args[:-1]] + [str(tmp_path / "d.json")]
    assert main(shared) == 2
    assert "Only 0 of the 3 held-out verbosity pairs have a prompt the helpfulness direction was not trained on" in capsys.readouterr().err
    assert main(args[:-2] + ["--out", str(tmp_path / "b.json"), "--weights", "0,1"]) == 2
    assert "at least 3" in capsys.readouterr().err
    same = args[:5] + ["--direction", str(paths[0])] + args[7:-1] + [str(tmp_path / "c.json")]
    assert main(same) == 2 and "share a name" in capsys.readouterr().err
