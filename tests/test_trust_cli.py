"""Nothing bad gets in, and nothing made is lost: every error a user can cause is one `tsdpo: error:` line
with exit 2; a locked database keeps the work; exports with non-finite values or failed checks leave nothing."""

import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
import torch

import engine.store
from engine import cli
from engine.export import ExportError, export_mix
from engine.mixer import Mixer
from engine.store import Store, ratings_to_trl
from tiny_model import random_tangent

UF = "assets/data/ultrafeedback_helpfulness_400.jsonl"


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_error_line(err: str) -> str:
    lines = [l for l in err.splitlines() if l.startswith("tsdpo:")]
    assert len(lines) == 1 and lines[0].startswith("tsdpo: error:") and "unexpected" not in err, err
    return lines[0]


@pytest.fixture
def vec_file(tiny_vector, tmp_path):
    return tiny_vector.save(tmp_path / "vec.safetensors")


# ----------------------------------------------------------------------------- user errors are clear

def test_malformed_numbers_and_prompts_are_clear_errors(capsys, tiny_model_dir, vec_file, tmp_path, demo_data):
    m = str(tiny_model_dir)
    cases = [
        (["steer", "extract", "--data", str(demo_data / "ultrafeedback_helpfulness_400.jsonl"), "--layers", "abc",
          "--out", str(tmp_path / "x.safetensors"), "--no-store", "--model", m], "--layers"),
        (["lengths", "--direction", str(vec_file), "--prompts", str(demo_data / "eval_prompts.jsonl"), "--weights", "a,b",
          "--no-store", "--model", m], "--weights"),
        (["generate", "--prompt", "bad \udcff bytes", "--no-store", "--model", m], "UTF-8"),
        (["generate", "--prompt", "   ", "--no-store", "--model", m], "empty"),
        (["generate", "--prompt", "hi", "--mix", f"{vec_file}=nan", "--no-store", "--model", m], "finite"),
        (["generate", "--prompt", "hi", "--mix", f"{vec_file}=inf", "--no-store", "--model", m], "finite"),
        (["generate", "--prompt", "hi", "--mix", f"{vec_file}=1e308", "--no-store", "--model", m], "--force"),
        (["export", "--mix", f"{vec_file}=nan", "--format", "controlvector", "--out", str(tmp_path / "e"), "--no-store",
          "--model", m], "finite"),
        (["steer", "extract", "--data", str(demo_data / "ultrafeedback_helpfulness_400.jsonl"), "--limit", "0",
          "--out", str(tmp_path / "y.safetensors"), "--no-store", "--model", m], "at least 2"),
    ]
    for argv, expected in cases:
        code, _, err = run(capsys, *argv)
        assert code == 2, (argv, err)
        assert expected in _one_error_line(err), (argv, err)
    assert not (tmp_path / "e").exists()


def test_a_direction_with_layers_out_of_range_is_a_clear_error(capsys, tiny_model_dir, tiny_vector, tmp_path):
    bad = tiny_vector.with_settings()
    bad.layers = [9]
    bad.save(tmp_path / "bad.safetensors")
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--mix", f"{tmp_path / 'bad.safetensors'}=1", "--no-store",
                       "--model", str(tiny_model_dir))
    assert code == 2 and "layers" in _one_error_line(err)


def test_unusable_data_folders_and_export_targets_are_clear_errors(capsys, tiny_model_dir, vec_file, tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    for folder in (tmp_path / "a-file" / "data", "/sys/tsdpo-not-writable"):
        monkeypatch.setenv("TSDPO_DATA_DIR", str(folder))
        code, _, err = run(capsys, "info")
        assert code == 2 and "TSDPO_DATA_DIR" in _one_error_line(err)
    monkeypatch.setenv("TSDPO_DATA_DIR", str(tmp_path / "data"))
    code, _, err = run(capsys, "export", "--mix", f"{vec_file}=1", "--format", "controlvector",
                       "--out", "/sys/tsdpo-not-writable/below/out", "--no-store", "--model", str(tiny_model_dir))
    assert code == 2 and "write" in _one_error_line(err)


def test_huge_weights_need_force(capsys, tiny_model_dir, vec_file):
    code, _, err = run(capsys, "generate", "--prompt", "hi", "--mix", f"{vec_file}=150", "--no-store",
                       "--model", str(tiny_model_dir), "--max-new-tokens", "2")
    assert code == 2 and "--force" in _one_error_line(err)
    code, out, err = run(capsys, "generate", "--prompt", "hi", "--mix", f"{vec_file}=150", "--force", "--no-store",
                         "--model", str(tiny_model_dir), "--max-new-tokens", "2")
    assert code == 0, err


# ----------------------------------------------------------------------------- exports that cannot be trusted fail

def test_an_export_whose_values_overflow_fails_and_leaves_nothing(tiny_lm, tmp_path):
    mixer = Mixer(tiny_lm)
    mixer.add(random_tangent(tiny_lm, "h", seed=1, scale=0.5), name="h")
    base = {n: p.detach().clone() for n, p in tiny_lm.model.named_parameters()}
    with pytest.raises(Exception, match="overflow|finite"):
        export_mix(tiny_lm, mixer, {"h": 1e308}, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    for n, p in tiny_lm.model.named_parameters():
        assert torch.equal(p, base[n]), n


def test_a_failed_check_is_an_error_with_nothing_at_the_target(tiny_lm, tmp_path, monkeypatch, capsys, tiny_model_dir):
    import engine.export as export

    mixer = Mixer(tiny_lm)
    mixer.add(random_tangent(tiny_lm, "h", seed=1, scale=0.5), name="h")
    monkeypatch.setitem(export.MIX_TOLERANCE, "float32", -1.0)  # no reload can pass: the check must fail loudly
    with pytest.raises(ExportError, match="does not reproduce"):
        export_mix(tiny_lm, mixer, {"h": 0.5}, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    # and in the CLI: a non-zero exit, one error line
    d = random_tangent(tiny_lm, "h", seed=1, scale=0.5)
    d.save(tmp_path / "h.safetensors")
    code, _, err = run(capsys, "export", "--mix", f"{tmp_path / 'h.safetensors'}=0.5", "--out", str(tmp_path / "cli"),
                       "--no-store", "--model", str(tiny_model_dir))
    assert code == 2 and "does not reproduce" in _one_error_line(err)
    assert not (tmp_path / "cli").exists()


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_killed_export_is_cleaned_up_and_a_hidden_old_export_restored(tiny_lm, tiny_vector, tmp_path, capsys, tiny_model_dir):
    out = tmp_path / "cv"
    pid = _dead_pid()
    staging = tmp_path / f".cv.tsdpo-export-{pid}"
    staging.mkdir()
    (staging / "model-00001.safetensors").write_bytes(b"x" * 1000)
    old = tmp_path / f".cv.tsdpo-old-{pid}"
    old.mkdir()
    (old / "tsdpo-export.json").write_text("{}")
    alive = tmp_path / f".cv.tsdpo-export-{os.getppid()}"  # another export that is running now: left alone
    alive.mkdir()
    code, stdout, _ = run(capsys, "export", "--clean", "--out", str(out))
    assert code == 0 and "restored" in stdout and "removed" in stdout
    assert (out / "tsdpo-export.json").is_file() and not staging.exists() and not old.exists() and alive.is_dir()

    # The next export to a target removes what killed exports left there, by itself.
    staging.mkdir()
    mixer = Mixer(tiny_lm)
    mixer.add(tiny_vector, name="v")
    export_mix(tiny_lm, mixer, {"v": 1.0}, tmp_path / "cv", format="controlvector", overwrite=True)
    assert not staging.exists() and (out / "mix.gguf").is_file()


# ----------------------------------------------------------------------------- a locked database loses nothing

@pytest.fixture
def locked_db(tmp_path, monkeypatch):
    path = tmp_path / "studio.sqlite3"
    Store(path).create_session("cli", {"kind": "folder", "ref": "x"}, "f")
    monkeypatch.setattr(engine.store, "Store", lambda *a, **k: Store(path, busy_timeout_s=0.1, retry_delays=(0.05,)))
    con = sqlite3.connect(str(path), isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    yield path, con
    con.close()


def test_generate_with_a_locked_database_shows_the_replies(capsys, tiny_model_dir, locked_db):
    code, out, err = run(capsys, "generate", "--prompt", "How do I cook rice?", "--compare", "base",
                         "--model", str(tiny_model_dir), "--max-new-tokens", "6")
    assert code == 2 and "not saved" in _one_error_line(err) and "locked" in err
    assert "base" in out and "tokens" in out  # the replies were printed before the save failed


def test_an_extraction_with_a_locked_database_keeps_its_file(capsys, tiny_model_dir, locked_db, tmp_path, demo_data):
    path, con = locked_db
    out_file = tmp_path / "v.safetensors"
    code, out, err = run(capsys, "steer", "extract", "--data", str(demo_data / "ultrafeedback_helpfulness_400.jsonl"),
                         "--limit", "6", "--max-response-tokens", "8", "--out", str(out_file), "--model", str(tiny_model_dir))
    assert code == 2 and out_file.is_file()
    assert f"tsdpo directions add {out_file}" in _one_error_line(err)
    con.execute("ROLLBACK")
    code, out, err = run(capsys, "directions", "add", str(out_file))
    assert code == 0, err
    assert [d.path for d in Store(path).directions()] == [str(out_file.resolve())]


def test_a_write_waits_for_a_lock_with_back_off(tmp_path):
    path = tmp_path / "s.sqlite3"
    store = Store(path, busy_timeout_s=0.05, retry_delays=(0.2, 0.4, 0.8))
    con = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
    con.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.3, lambda: con.execute("ROLLBACK")).start()
    t0 = time.perf_counter()
    row = store.create_session("after the lock", {"kind": "folder", "ref": "x"})  # failed at once before
    assert row.id and time.perf_counter() - t0 >= 0.25
    con.close()


# ----------------------------------------------------------------------------- ratings

def test_a_second_rating_is_an_edit_that_can_be_undone(tmp_path):
    store = Store(tmp_path / "s.sqlite3")
    s = store.create_session("s", {"kind": "folder", "ref": "x"})
    comp = store.add_comparison(s.id, "p", {"max_new_tokens": 4}, 0, [
        {"label": "base", "output": "one two three four", "n_tokens": 4, "seconds": 1.0},
        {"label": "mix", "output": "short", "n_tokens": 1, "seconds": 1.0},
        {"label": "pin", "output": "stop", "n_tokens": 2, "seconds": 1.0, "stopped": True}])
    a, b, c = (g.id for g in comp.generations)
    first = store.add_rating(comp.id, "winner", winner_id=b, note="b reads better")
    second = store.add_rating(comp.id, "tie")
    assert second.note == "b reads better"  # the earlier note is not dropped
    assert [r.outcome for r in store.ratings(comp.id)] == ["winner", "tie"]
    assert store.undo_rating(second.id).id == first.id
    assert [r.id for r in store.ratings(comp.id)] == [first.id]
    rows = {r["rejected_label"]: r for r in ratings_to_trl(store, s.id)}
    assert rows["base"]["rejected_truncated"] and not rows["base"]["rejected_stopped"]  # 4 of 4 tokens, no end
    assert rows["pin"]["rejected_stopped"] and not rows["pin"]["rejected_truncated"]
    assert not rows["base"]["chosen_truncated"] and not rows["base"]["chosen_stopped"]
