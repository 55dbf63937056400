"""The sweep: metrics checked against hand computations, a tiny-model sweep, stop and resume, outputs, CLI."""

import json
import math

import pytest
import torch

from engine.cli import main
from engine.data import load_pairs
from engine.errors import Cancelled
from engine.models import load_model
from engine.sweep import (Method, Sweep, SweepConfig, SweepError, canonical_correlations, distinct_n, hypervolume,
                          monotonicity, pareto_front, write_outputs)
from tiny_model import random_tangent


def test_pareto_front_and_hypervolume_by_hand():
    pts = [(0.0, 3.0), (1.0, 2.0), (2.0, 2.5), (3.0, 0.5), (1.5, 1.0), (2.0, 2.5)]
    front = pareto_front(pts)
    assert [pts[i] for i in front] == [(0.0, 3.0), (2.0, 2.5), (2.0, 2.5), (3.0, 0.5)]
    # Against (0, 0): the union of the rectangles [0,3]x[0,0.5], [0,2]x[0,2.5], [0,0]x[..] = 1.5 + 2*2 = 5.5
    assert hypervolume(pts, (0.0, 0.0)) == pytest.approx(3 * 0.5 + 2 * 2.0)
    assert hypervolume(pts, (-1.0, 0.0)) == pytest.approx(4 * 0.5 + 3 * 2.0 + 1 * 0.5)
    assert hypervolume(pts, (5.0, 5.0)) == 0.0


def test_monotonicity_and_distinct_and_cca():
    c = [-1, -0.5, 0, 0.5, 1]
    assert monotonicity([1, 2, 3, 4, 5], c) == {"kendall_tau": 1.0, "tv_ratio": 1.0}
    assert monotonicity([5, 4, 3, 2, 1], c)["kendall_tau"] == -1.0
    wiggly = monotonicity([0, 2, 1, 3, 2], c)
    assert wiggly["tv_ratio"] == pytest.approx(2 / 6) and 0 < wiggly["kendall_tau"] < 1
    assert distinct_n(["a b a b", "a b c"]) == pytest.approx(3 / 5)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(400, 4, generator=g) * 5  # a 4-dimensional signal both sides share, seen through other maps
    a = z @ torch.randn(4, 32, generator=g) + 0.1 * torch.randn(400, 32, generator=g)
    b = z @ torch.randn(4, 32, generator=g) + 0.1 * torch.randn(400, 32, generator=g)
    corr = canonical_correlations(a, b, dims=8)
    assert len(corr) == 8 and min(corr[:4]) > 0.95 and max(corr[4:]) < 0.5
    assert canonical_correlations(a, a, dims=8)[0] == pytest.approx(1.0)
    unrelated = canonical_correlations(a, torch.randn(400, 32, generator=g), dims=8)
    assert max(unrelated) < 0.35


@pytest.fixture
def setup(tiny_model_dir, tiny_vector, demo_data):
    lm = load_model(tiny_model_dir)
    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    data = {"helpfulness": load_pairs(uf, limit=40).split(0.2)[1], "verbosity": load_pairs(uf, objective="verbosity", limit=40).split(0.2)[1]}
    tx, ty = random_tangent(lm, "helpfulness", 1, scale=0.3), random_tangent(lm, "verbosity", 2, scale=0.3)
    sx = tiny_vector.with_settings()
    sy = tiny_vector.with_settings(layers=[1])
    sy.objective = sy.name = "verbosity"
    scal = [(f"s{w}", random_tangent(lm, "mix", 10 + i, scale=0.3), w) for i, w in enumerate((0.25, 0.5, 0.75))]
    for _, d, _ in scal:
        d.method = "scalarized"
    methods = [Method("tangent", "tangent", tx, ty), Method("steering", "steering", sx, sy),
               Method("scalarized", "scalarized", points=scal)]
    cfg = SweepConfig(grid=3, pairs=4, batch_size=4, prompts=["Say hi.", "Name a colour."], max_new_tokens=6,
                      max_prompt_tokens=32, max_response_tokens=32)
    return lm, methods, data, cfg


def test_sweep_measures_every_point(setup, tmp_path):
    lm, methods, data, cfg = setup
    result = Sweep(lm, methods, data, cfg, tmp_path / "s").run()
    tangent, steering, scal = (result["methods"][k] for k in ("tangent", "steering", "scalarized"))
    assert len(tangent["points"]) == len(steering["points"]) == 9 and len(scal["points"]) == 3
    origin = next(e for e in tangent["points"] if e["x"] == 0 and e["y"] == 0)
    assert origin["helpfulness/margin"] == 0.0 and origin["helpfulness/accuracy"] == 0.5 and origin["lin_gap"] == 0.0
    for e in tangent["points"]:
        assert all(math.isfinite(e[k]) for k in ("helpfulness/margin", "verbosity/accuracy", "length", "distinct2", "lin_gap"))
        if (e["x"], e["y"]) != (0, 0):
            assert e["lin_gap"] > 0  # the ordinary model is not exactly linear in the weights
    corner = next(e for e in tangent["points"] if e["x"] == 1 and e["y"] == 1)
    # A direction alone on its own axis: zero disentanglement error for its own objective, so only the other term.
    alone = next(e for e in tangent["points"] if e["x"] == 1 and e["y"] == 0)
    assert 0 < alone["disentanglement"] and corner["disentanglement"] > 0
    assert all("lin_gap" not in e for e in steering["points"] if (e["x"], e["y"]) != (0, 0))
    # Smoothness of the x objective: the mean over the grid's rows of the monotonicity of its margin along x.
    grid = {(e["x"], e["y"]): e for e in tangent["points"]}
    rows = [monotonicity([grid[(x, y)]["helpfulness/margin"] for x in (-1, 0, 1)], [-1, 0, 1]) for y in (-1, 0, 1)]
    sm = tangent["smoothness"]["helpfulness"]
    assert sm["lines"] == 3 and sm["along"] == "x"
    assert sm["kendall_tau"] == pytest.approx(sum(r["kendall_tau"] for r in rows) / 3)
    assert sm["tv_ratio"] == pytest.approx(sum(r["tv_ratio"] for r in rows) / 3)
    for info in result["methods"].values():
        assert info["hypervolume"] >= 0 and info["pareto"]
    assert set(result["cca"]) == {"tangent", "steering"} and 0 <= result["cca"]["tangent"]["mean"] <= 1

    files = write_outputs(result, tmp_path / "s")
    assert {f.name for f in files} == {"sweep.json", "pareto.png", "heatmaps-tangent.png", "heatmaps-steering.png", "report.md"}
    assert all(f.stat().st_size > 0 for f in files)
    assert json.loads((tmp_path / "s" / "sweep.json").read_text())["objectives"] == ["helpfulness", "verbosity"]
    report = (tmp_path / "s" / "report.md").read_text()
    assert "| tangent (tangent) | 9 |" in report and "reference point" in report


def test_a_stopped_sweep_resumes_to_the_same_result(setup, tmp_path):
    lm, methods, data, cfg = setup
    cfg.prompts = []
    methods = methods[:1]
    full = Sweep(lm, methods, data, cfg, tmp_path / "full").run()
    reported = []  # the sweep reports a point before measuring it: stop once three are measured
    stopping = Sweep(lm, methods, data, cfg, tmp_path / "part", progress=lambda p: reported.append(p.metrics.get("point", "")),
                     should_stop=lambda: len([w for w in reported if w.startswith("tangent|")]) > 3)
    with pytest.raises(Cancelled, match="resume"):
        stopping.run()
    # Each point is one appended line; the state file stays small (it used to be rewritten whole per point).
    lines = (tmp_path / "part" / "sweep-points.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "points" not in json.loads((tmp_path / "part" / "sweep-state.json").read_text())
    seen = []
    resumed = Sweep(lm, methods, data, cfg, tmp_path / "part", progress=lambda p: seen.append(p.metrics.get("point", ""))).run()
    assert "base model" not in seen and len([w for w in seen if w.startswith("tangent|")]) == 8 - 3
    for a, b in zip(full["methods"]["tangent"]["points"], resumed["methods"]["tangent"]["points"]):
        a.pop("seconds", None), b.pop("seconds", None)
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)

    cfg.beta = 0.5
    with pytest.raises(SweepError, match="other settings"):
        Sweep(lm, methods, data, cfg, tmp_path / "part")


def test_sweep_refuses_bad_grids_and_missing_data(setup, tmp_path):
    lm, methods, data, cfg = setup
    for grid, low in ((4, -1.0), (1, -1.0), (3, 0.0)):
        with pytest.raises(SweepError):
            SweepConfig(grid=grid, low=low).coords()
    with pytest.raises(SweepError, match="No held-out data for objective"):
        Sweep(lm, methods, {"helpfulness": data["helpfulness"]}, cfg, tmp_path / "x")


def test_cli_sweep(tiny_model_dir, demo_data, tmp_path, capsys):
    lm = load_model(tiny_model_dir)
    paths = [random_tangent(lm, o, s, scale=0.3).save(tmp_path / f"{o}.safetensors") for o, s in (("helpfulness", 1), ("verbosity", 2))]
    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    args = ["sweep", "--model", str(tiny_model_dir), "--x", str(paths[0]), "--y", str(paths[1]), "--data", f"helpfulness={uf}",
            "--data", f"verbosity={uf}", "--max-prompt-tokens", "24", "--max-response-tokens", "16",
            "--limit", "40", "--pairs", "2", "--grid", "3", "--out", str(tmp_path / "sw"), "--no-store"]
    assert main(args) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "tangent" in out and "CCA tangent" in out and (tmp_path / "sw" / "pareto.png").is_file()
    config = json.loads((tmp_path / "sw" / "sweep.json").read_text())["config"]
    assert (config["max_prompt_tokens"], config["max_response_tokens"]) == (24, 16)  # the pairs cut as in training
    assert main(args) == 0  # everything measured already: only the outputs are rewritten
    assert main(args[:-5] + ["--grid", "4", "--out", str(tmp_path / "x")]) == 2
    assert "must be odd" in capsys.readouterr().err


def test_margins_match_a_direct_dpo_computation_and_the_prediction_is_exact_for_the_linearized_model(setup, tmp_path):
    from engine.dpo import encode_pairs
    from engine.sweep import margin_gradients, predicted_maps
    from engine.tangent import completion_logps

    lm, methods, data, cfg = setup
    cfg.prompts, cfg.linearization_gap = [], False
    tx, ty = methods[0].x, methods[0].y
    result = Sweep(lm, methods[:1], data, cfg, tmp_path / "s").run()
    pairs = data["helpfulness"].pairs[:4]
    batch = encode_pairs(lm, pairs, 32, 32)
    deltas = {n: tx.weight_delta(n) for n in tx.weight_names()}
    with torch.no_grad():
        pol, ref = completion_logps(lm, batch, deltas, "scalarized")
    n = len(pairs)
    margins = 0.1 * ((pol[:n] - ref[:n]) - (pol[n:] - ref[n:]))
    point = next(e for e in result["methods"]["tangent"]["points"] if (e["x"], e["y"]) == (1, 0))
    assert point["helpfulness/margin"] == pytest.approx(float(margins.mean()), rel=1e-4, abs=1e-6)
    assert point["helpfulness/accuracy"] == pytest.approx(float((margins > 0).double().mean()))
    # Without the gap measured, no point claims one (the origin used to say 0) and the report says it was not measured.
    assert all("lin_gap" not in e for e in result["methods"]["tangent"]["points"])
    from engine.sweep.report import report
    row = next(line for line in report(result).splitlines() if line.startswith("| tangent"))
    assert row.split("|")[7].strip() == "-"

    g = margin_gradients(lm, pairs, {"x": tx, "y": ty}, beta=0.1, max_tokens=32)
    # First order: the derivative of the margins along 0.7 tau_x - 0.4 tau_y, by finite differences in float64.
    combo = {n: 0.7 * tx.weight_delta(n).double() - 0.4 * ty.weight_delta(n).double() for n in tx.weight_names()}
    predicted = g @ torch.tensor([0.7, -0.4], dtype=torch.float64)
    assert torch.allclose(predicted, torch.tensor(margins_grad(lm, batch, combo, n), dtype=torch.float64), atol=5e-4)
    maps = predicted_maps(g, ["x", "y"], lambda x, y: {"x": x, "y": y}, [0.0, 0.7], [-0.4, 0.0])
    assert maps["margin"][0][1] == pytest.approx(float(predicted.mean()))
    assert maps["accuracy"][0][1] == pytest.approx(float((predicted > 0).double().mean()))
    assert maps["margin"][1][0] == 0.0 and maps["accuracy"][1][0] == 0.5


def margins_grad(lm, batch, deltas, n):
    """The same derivative by central finite differences in float64 (a hand check of the JVP)."""
    model64 = __import__("copy").deepcopy(lm.model).double()
    params = dict(model64.named_parameters())

    def margins(e):
        with torch.no_grad():
            for name, delta in deltas.items():
                params[name].copy_(base[name] + e * delta)
            logits = model64(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             position_ids=batch.position_ids).logits
            lp = torch.log_softmax(logits, -1).gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1) * batch.target_mask
            seq = lp.sum(-1)
        return 0.1 * (seq[:n] - seq[n:])

    base = {name: params[name].detach().clone() for name in deltas}
    h = 1e-4
    return ((margins(h) - margins(-h)) / (2 * h)).tolist()


def test_reward_model_scores_the_replies(setup, tiny_model_dir, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    config = AutoConfig.from_pretrained(tiny_model_dir, num_labels=1)
    torch.manual_seed(0)
    rm = AutoModelForSequenceClassification.from_config(config)
    rm.save_pretrained(tmp_path / "rm")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "rm")
    lm, methods, data, cfg = setup
    cfg.reward_model, cfg.linearization_gap = str(tmp_path / "rm"), False
    result = Sweep(lm, methods[1:2], data, cfg, tmp_path / "s").run()
    rewards = [e["reward"] for e in result["methods"]["steering"]["points"]]
    assert len(rewards) == 9 and all(math.isfinite(r) for r in rewards) and len(set(rewards)) > 1

    cfg.reward_model = str(tmp_path / "missing")
    with pytest.raises(SweepError, match="Could not load the reward model"):
        Sweep(lm, methods[1:2], data, cfg, tmp_path / "s2").run()


def test_a_sweep_sharded_over_two_processes_gives_the_one_process_result(tiny_model_dir, demo_data, tmp_path):
    """torchrun --nproc_per_node 2: each process measures every other point of the plan, the first gathers
    them, and sweep.json is the one-process sweep.json (timings aside)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    lm = load_model(tiny_model_dir)
    paths = [random_tangent(lm, o, s, scale=0.3).save(tmp_path / f"{o}.safetensors") for o, s in (("helpfulness", 1), ("verbosity", 2))]
    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    common = ["sweep", "--model", str(tiny_model_dir), "--x", str(paths[0]), "--y", str(paths[1]),
              "--data", f"helpfulness={uf}", "--data", f"verbosity={uf}", "--limit", "40", "--pairs", "2", "--grid", "3",
              "--no-store"]
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun gives each process: the same arithmetic in both
    repo = str(Path(__file__).parents[1])
    one = subprocess.run([str(bin_dir / "tsdpo"), *common, "--out", str(tmp_path / "one")], capture_output=True,
                         text=True, env=env, timeout=600, cwd=repo)
    assert one.returncode == 0, one.stderr[-2000:]
    two = subprocess.run([str(bin_dir / "torchrun"), "--nproc_per_node", "2", "--master_port", "29533", "-m", "engine.cli",
                          *common, "--out", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=600,
                         cwd=repo)
    assert two.returncode == 0, two.stderr[-2000:]
    shards = sorted(p.name for p in (tmp_path / "two").glob("sweep-points*.jsonl"))
    assert shards == ["sweep-points.1.jsonl", "sweep-points.jsonl"]  # both processes measured points
    counts = [len((tmp_path / "two" / s).read_text().splitlines()) for s in shards]
    assert sum(counts) == 8 and min(counts) >= 3  # the 3 x 3 grid less the base, shared out

    def without_timings(obj):
        if isinstance(obj, dict):
            return {k: without_timings(v) for k, v in obj.items() if k != "seconds"}
        if isinstance(obj, list):
            return [without_timings(v) for v in obj]
        return obj

    a = without_timings(json.loads((tmp_path / "one" / "sweep.json").read_text()))
    b = without_timings(json.loads((tmp_path / "two" / "sweep.json").read_text()))
    assert a == b


def test_the_bootstrap_intervals_come_from_the_held_out_pairs(setup, tmp_path):
    from engine.data import PairSet

    lm, methods, data, cfg = setup
    result = Sweep(lm, methods, data, cfg, tmp_path / "s").run()
    boot = result["bootstrap"]
    assert boot["resamples"] == 1000 and boot["pairs"] == {"helpfulness": 4, "verbosity": 4}
    for name, (lo, hi) in boot["hypervolume"].items():
        assert 0 <= lo < hi  # four different pairs: the resamples differ
    pair = boot["ratios"]["tangent/scalarized"]
    assert pair["value"] == pytest.approx(result["methods"]["tangent"]["hypervolume"] / result["methods"]["scalarized"]["hypervolume"])
    assert pair["interval"][0] < pair["interval"][1]
    write_outputs(result, tmp_path / "s")
    assert "| hypervolume ratio tangent/scalarized |" in (tmp_path / "s" / "report.md").read_text()

    # Four copies of one pair per objective: every resample is the data itself, so each interval is the value
    same = {o: PairSet(o, [ps.pairs[0]] * 4) for o, ps in data.items()}
    one = Sweep(lm, methods, same, cfg, tmp_path / "same").run()
    for name, (lo, hi) in one["bootstrap"]["hypervolume"].items():
        assert lo == pytest.approx(one["methods"][name]["hypervolume"], abs=1e-12)
        assert hi == pytest.approx(one["methods"][name]["hypervolume"], abs=1e-12)
    for r in one["bootstrap"]["ratios"].values():
        assert r["interval"] == pytest.approx([r["value"]] * 2)


def test_the_gap_map_is_the_sweeps_linearization_gap_at_every_point(setup):
    """One JVP per direction and one forward per point give, at each point, what `linearization_gap` measures with
    a JVP of its own; the gap grows away from the origin."""
    from engine.directions import Mix
    from engine.dpo import encode_pairs
    from engine.sweep import linearization_gap_map
    from engine.tangent import linearization_gap

    lm, methods, data, cfg = setup
    tx, ty = methods[0].x, methods[0].y
    dirs = {"x": tx, "y": ty}
    pairs = data["helpfulness"].pairs[:3]
    xs, ys = [-1.0, 0.0, 0.5, 2.0], [-1.0, 0.0, 1.0]
    result = linearization_gap_map(lm, pairs, dirs, lambda x, y: {"x": x, "y": 0.5 * y}, xs, ys, max_tokens=32)
    batch = encode_pairs(lm, pairs, 32, 32)
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            want = 0.0 if x == y == 0 else linearization_gap(lm, batch, Mix.of(dirs, {"x": x, "y": 0.5 * y}), average=True)["gap_mean"]
            assert result["gap"][j][i] == pytest.approx(want, rel=1e-3, abs=1e-6)
    row = result["gap"][ys.index(0.0)]
    assert row[xs.index(0.5)] < row[xs.index(-1.0)] and row[xs.index(0.5)] < row[xs.index(2.0)]
    rel = result["relative"][ys.index(0.0)]
    assert 0 < rel[xs.index(0.5)] < rel[xs.index(2.0)]


def test_cli_gap_map_measures_trained_directions_on_their_held_out_pairs(tiny_model_dir, demo_data, tmp_path, capsys):
    from engine.loading import load_direction
    from engine.plane import Axis, PreferencePlane
    from engine.sweep import gap_map_key, heldout_pairs_of

    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    files = {}
    for objective in ("helpfulness", "verbosity"):
        files[objective] = tmp_path / f"{objective}.safetensors"
        assert main(["train", "--model", str(tiny_model_dir), "--data", str(uf), "--objective", objective, "--limit", "12",
                     "--steps", "2", "--lr", "0.05", "--max-prompt-tokens", "16", "--max-response-tokens", "16",
                     "--out", str(files[objective]), "--no-store"]) == 0
    out = tmp_path / "gap.json"
    args = ["gap-map", "--model", str(tiny_model_dir), "--x", str(files["helpfulness"]), "--y", str(files["verbosity"]),
            "--grid", "3", "--range", "-2,2", "--pairs", "2", "--max-tokens", "16", "--no-store", "--out", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    assert "relative linearization gap" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["xs"] == [-2, 0, 2] and result["ys"] == [-2, 0, 2]
    assert result["relative"][1][1] == 0.0 and result["gap"][0][0] > 0
    lm = load_model(tiny_model_dir)
    d = load_direction(files["helpfulness"], lm)
    pairs = next(iter(heldout_pairs_of(d, limit=2).values()))
    plane = PreferencePlane(Axis("helpfulness", 1.0, -2, 2), Axis("verbosity", 1.0, -2, 2))
    from engine.directions import file_sha256
    shas = {n: file_sha256(f) for n, f in files.items()}
    assert result["key"] == gap_map_key(lm.fingerprint, plane, shas)
    assert result["pairs"] == len(pairs) >= 1  # the held-out split of 12 pairs has one
    assert main(args) == 2 and "exists" in capsys.readouterr().err
    assert main(args[:-2] + ["--grid", "4", "--out", str(tmp_path / "g.json")]) == 2
    assert "odd" in capsys.readouterr().err
