import json
import subprocess
import sys
from pathlib import Path

from engine.cli import main


def run(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_info_names_versions_and_locations(capsys, tmp_path):
    code, out, _ = run(capsys, "info", "--json")
    assert code == 0
    info = json.loads(out)
    assert info["torch"].startswith("2.") and info["device (auto)"] in ("cpu", "cuda", "mps")
    assert info["model cache"] == str(tmp_path / "cache" / "models")
    assert info["database"] == str(tmp_path / "data" / "studio.sqlite3")


def test_model_load_prints_layers_and_fingerprint(capsys, tiny_model_dir, tiny_lm):
    code, out, _ = run(capsys, "model", "load", str(tiny_model_dir))
    assert code == 0
    assert "layers        3" in out and "hidden size   32" in out
    assert f"fingerprint   {tiny_lm.fingerprint}" in out


def test_model_load_errors_are_one_line(capsys, tmp_path):
    code, out, err = run(capsys, "model", "load", str(tmp_path / "nowhere"))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("tsdpo: error: No model at")


def test_data_inspect_demo_files(capsys, demo_data):
    code, out, _ = run(capsys, "data", "inspect", str(demo_data / "ultrafeedback_helpfulness_400.jsonl"))
    assert code == 0 and "format     ultrafeedback" in out and "objective  helpfulness" in out
    code, out, _ = run(capsys, "data", "inspect", str(demo_data / "hh_rlhf_harmless_600.jsonl"), "--json")
    info = json.loads(out)
    assert info["format"] == "hh-rlhf" and info["pairs"] + len(info["problems"]) == 600


def test_data_select_writes_the_kept_rows_as_they_were(capsys, demo_data, tmp_path):
    """The shipped length-matched and length-balanced files are `tsdpo data select` of the source rows: reading the
    file back gives exactly the selection's pairs, and the rows are the source's own lines."""
    from engine.data import load_pairs

    hh = demo_data / "hh_rlhf_harmless_600.jsonl"
    out = tmp_path / "hh_bal.jsonl"
    code, stdout, _ = run(capsys, "data", "select", str(hh), "--length-balanced", "2", "--out", str(out))
    assert code == 0 and "length-balanced within 2x" in stdout
    picked = load_pairs(hh, length_balanced=2)
    again = load_pairs(out)
    assert [(p.prompt, p.chosen, p.rejected) for p in again] == [(p.prompt, p.chosen, p.rejected) for p in picked]
    source_rows = [json.loads(line) for line in hh.read_text().splitlines()]
    assert [json.loads(line) for line in out.read_text().splitlines()] == [source_rows[p.line - 1] for p in picked]
    code, _, err = run(capsys, "data", "select", str(hh), "--length-balanced", "2", "--out", str(out))
    assert code == 2 and "already exists" in err
    code, _, err = run(capsys, "data", "select", str(hh), "--out", str(tmp_path / "other.jsonl"))
    assert code == 2 and "--length-matched RATIO or --length-balanced RATIO" in err
    code, stdout, _ = run(capsys, "data", "inspect", str(hh), "--length-balanced", "2")
    assert code == 0 and f"pairs                    {len(picked)}" in stdout


def test_data_select_by_score_gap(capsys, demo_data, tmp_path):
    """--min-score-gap alone is a selection; with a length option the clear pairs are then balanced; data inspect
    reports the gaps; unrated data is an error that writes nothing."""
    from engine.data import load_pairs

    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    out = tmp_path / "uf_clear.jsonl"
    code, stdout, err = run(capsys, "data", "select", str(uf), "--min-score-gap", "2", "--length-balanced", "2",
                            "--out", str(out))
    assert code == 0 and "score gap 2 or more" in stdout and "length-balanced within 2x" in stdout
    picked = load_pairs(uf, min_score_gap=2, length_balanced=2)
    assert [p.line for p in load_pairs(out)] == list(range(1, len(picked) + 1))
    assert [(p.chosen, p.score_gap) for p in load_pairs(out)] == [(p.chosen, p.score_gap) for p in picked]
    assert f"{len(picked)} rows written" in err
    code, stdout, _ = run(capsys, "data", "inspect", str(uf), "--min-score-gap", "3", "--json")
    stats = json.loads(stdout)
    assert code == 0 and stats["pairs"] == len(load_pairs(uf, min_score_gap=3)) and stats["score_gap_median"] >= 3
    code, _, err = run(capsys, "data", "select", str(demo_data / "hh_rlhf_harmless_600.jsonl"), "--min-score-gap", "1",
                       "--out", str(tmp_path / "hh.jsonl"))
    assert code == 2 and "carries no scores" in err and not (tmp_path / "hh.jsonl").exists()


def test_data_inspect_names_a_broken_row(capsys, demo_data, tmp_path):
    lines = (demo_data / "ultrafeedback_helpfulness_400.jsonl").read_text().splitlines()[:50]
    lines[11] = lines[11][: len(lines[11]) // 2]  # line 12 cut in half
    damaged = tmp_path / "damaged.jsonl"
    damaged.write_text("\n".join(lines) + "\n")
    code, out, _ = run(capsys, "data", "inspect", str(damaged), "--format", "ultrafeedback")
    assert code == 0
    assert "line 12: not valid JSON" in out


def test_data_inspect_unknown_format_is_an_error(capsys, tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"text": "a"}\n')
    code, _, err = run(capsys, "data", "inspect", str(f))
    assert code == 2 and "Pass --format" in err


def test_entry_points_are_installed():
    bin_dir = Path(sys.executable).parent
    r = subprocess.run([str(bin_dir / "tsdpo"), "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "model" in r.stdout and "data" in r.stdout
    assert (bin_dir / "tsdpo-studio").is_file()


def test_steer_extract_then_generate_by_name(capsys, tiny_model_dir, demo_data, tmp_path):
    out = tmp_path / "verb.safetensors"
    code, stdout, err = run(capsys, "steer", "extract", "--data", str(demo_data / "ultrafeedback_helpfulness_400.jsonl"),
                            "--objective", "verbosity", "--limit", "20", "--out", str(out), "--model", str(tiny_model_dir),
                            "--max-response-tokens", "32", "--strength", "2")
    assert code == 0, err
    assert out.is_file() and "layer ranking" in stdout and "stored as     'verbosity'" in stdout
    code, _, err = run(capsys, "steer", "extract", "--data", str(demo_data / "ultrafeedback_helpfulness_400.jsonl"),
                       "--limit", "20", "--out", str(out), "--model", str(tiny_model_dir))
    assert code == 2 and "already exists" in err
    code, stdout, err = run(capsys, "generate", "--prompt", "Tell me about the sea.", "--mix", "verbosity=1",
                            "--mix", f"{out}=-1", "--compare", "base", "--model", str(tiny_model_dir),
                            "--max-new-tokens", "8")
    assert code == 0, err
    header = stdout.splitlines()[0]
    assert "+1 verbosity" in header and "-1 verbosity" in header and "base" in header  # one file, two references
    assert stdout.count("tokens/s") == 3 and "one batch" in err
    from engine.store import Store

    (comp,) = [c for s in Store().sessions() for c in Store().history(s.id)]
    assert [g.label for g in comp.generations] == ["+1 verbosity", "-1 verbosity", "base"]
    code, stdout, _ = run(capsys, "directions")
    assert "verbosity" in stdout and "steering" in stdout


def test_generate_refuses_a_vector_for_another_model(capsys, tiny_vector, other_tiny_dir, tmp_path):
    path = tiny_vector.save(tmp_path / "v.safetensors")
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--mix", f"{path}=1", "--model", str(other_tiny_dir))
    assert code == 2 and "not for the loaded model tiny-other" in err
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--mix", "nothing-here=1", "--model", str(other_tiny_dir))
    assert code == 2 and "No direction file or stored direction named 'nothing-here'" in err
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--mix", "v.safetensors")
    assert code == 2 and "no '=WEIGHT'" in err


def test_steer_lengths_reports_each_weight(capsys, tiny_vector, tiny_model_dir, tmp_path):
    path = tiny_vector.save(tmp_path / "v.safetensors")
    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell me about the sea.\nWrite a poem.\n")
    code, stdout, err = run(capsys, "lengths", "--direction", str(path), "--prompts", str(prompts),
                            "--weights", "-1,0,1", "--max-new-tokens", "6", "--model", str(tiny_model_dir),
                            "--json-out", str(tmp_path / "lengths.json"))
    assert code == 0, err
    lines = stdout.splitlines()
    assert lines[0].split() == ["weight", "mean", "tokens", "median", "at", "limit", "distinct-2"]
    assert [l.split()[0] for l in lines[1:4]] == ["-1", "0", "1"] and "vs -1:" in lines[4]
    assert "monotonic increasing" in lines[5]
    import json

    from engine.sweep.metrics import distinct_n

    saved = json.loads((tmp_path / "lengths.json").read_text())
    assert [r["weight"] for r in saved["rows"]] == [-1, 0, 1] and len(saved["texts"]["1.0"]) == 2
    for r in saved["rows"]:  # the distinct-2 printed is that of the replies saved
        assert r["distinct2"] == round(distinct_n(saved["texts"][str(float(r["weight"]))]), 4)
        assert f"{r['distinct2']:.3f}" in stdout
    assert saved["repetition_penalty"] == 1.0 and "(2 prompts, greedy," in stdout
    # a repetition penalty reaches the decoding (greedy still) and is recorded
    code, stdout, err = run(capsys, "lengths", "--direction", str(path), "--prompts", str(prompts),
                            "--weights", "-1,0,1", "--max-new-tokens", "6", "--model", str(tiny_model_dir),
                            "--repetition-penalty", "3", "--json-out", str(tmp_path / "penalized.json"))
    assert code == 0, err
    penalized = json.loads((tmp_path / "penalized.json").read_text())
    assert penalized["repetition_penalty"] == 3.0 and "greedy, repetition penalty 3," in stdout
    assert penalized["texts"] != saved["texts"]
    code, _, err = run(capsys, "lengths", "--direction", str(path), "--prompts", str(prompts), "--model",
                       str(tiny_model_dir), "--repetition-penalty", "0")
    assert code == 2 and "repetition penalty must be positive" in err


def test_train_then_generate_with_the_direction_file(capsys, tiny_model_dir, demo_data, tmp_path):
    out = tmp_path / "help.safetensors"
    code, stdout, err = run(capsys, "train", "--objective", "helpfulness", "--data",
                            str(demo_data / "ultrafeedback_helpfulness_400.jsonl"), "--limit", "16",
                            "--param", "full", "--steps", "3", "--out", str(out), "--model", str(tiny_model_dir),
                            "--max-prompt-tokens", "24", "--max-response-tokens", "24")
    assert code == 0, err
    assert "tangent direction 'helpfulness' (full" in stdout and "final: step 3 loss" in stdout
    assert "held-out: accuracy" in stdout
    code, stdout, err = run(capsys, "generate", "--prompt", "Hi.", "--mix", f"{out}=2", "--compare", "base",
                            "--model", str(tiny_model_dir), "--max-new-tokens", "6")
    assert code == 0, err
    assert "+2 helpfulness" in stdout.splitlines()[0] and "one after another" in err
    code, stdout, err = run(capsys, "train-scalarized", "--data", f"helpfulness={demo_data / 'ultrafeedback_helpfulness_400.jsonl'}",
                            "--data", f"harmlessness={demo_data / 'hh_rlhf_harmless_600.jsonl'}", "--weight", "0.3",
                            "--limit", "16", "--steps", "2", "--out", str(tmp_path / "s.safetensors"),
                            "--model", str(tiny_model_dir), "--max-prompt-tokens", "24", "--max-response-tokens", "24")
    assert code == 0, err
    assert "scalarized direction 'scalarized helpfulness=0.3'" in stdout
    code, _, err = run(capsys, "train-scalarized", "--data", "a=x.jsonl", "--weight", "0.3", "--out", "y")
    assert code == 2 and "two --data" in err
