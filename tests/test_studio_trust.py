"""The studio on the tiny model: what the window says is loaded is what the worker holds, a Stop belongs to
its request, closing never waits for a job, and a blind comparison names no source until it is rated."""

import math
import time
from dataclasses import replace

import pyqtgraph as pg
import pytest
from PySide6.QtCore import QSettings
from PySide6.QtWidgets import QAbstractButton, QComboBox, QLabel, QLineEdit, QPlainTextEdit, QTreeWidget, QWidget

from engine.generation import Column, SamplingParams
from engine.store import Store
from studio.main_window import MainWindow
from studio.messages import BuildJob, CompareRequest, Data
from test_studio import make_window, reopen

pg.setConfigOptions(mouseRateLimit=-1)


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "studio.sqlite3")


@pytest.fixture
def window(qtbot, tmp_path, store, tiny_model_dir, tiny_vector):
    path = tiny_vector.save(tmp_path / "vec.safetensors")
    w = make_window(qtbot, tmp_path, store, tiny_model_dir, [(path, "v1"), (path, "v2")])
    yield w
    w.close()


def _generate(qtbot, w, prompt="How do I cook rice?", tokens=6):
    w.prompt.setPlainText(prompt)
    w.max_tokens.setValue(tokens)
    before = w.history.topLevelItemCount()
    w.start_generation()
    qtbot.waitUntil(lambda: w.compare.last is not None and not w.busy_with
                    and w.history.topLevelItemCount() > before, timeout=30000)


def test_reloading_the_same_model_keeps_the_directions_and_the_mix(qtbot, window, tiny_model_dir):
    window.plane_view.set_point(0.5, -0.25)
    qtbot.waitUntil(lambda: window.host.worker.mixer.rows == [window.plane_view.weights()], timeout=10000)
    old = window.host.worker.lm
    window.load_model(str(tiny_model_dir))
    # The load has happened (not merely not started yet: the old mixer already holds v1 and v2).
    qtbot.waitUntil(lambda: not window.busy_with and window.host.worker.lm is not old
                    and list(window.host.worker.mixer.directions) == ["v1", "v2"], timeout=30000)
    # One source of truth: the window lists what the worker holds, and the point's mix is applied to the new model.
    assert list(window.directions) == ["v1", "v2"]
    qtbot.waitUntil(lambda: window.host.worker.mixer.rows == [window.plane_view.weights()], timeout=10000)
    window.plane_view.set_point(-0.4, 0.3)
    qtbot.waitUntil(lambda: window.host.worker.mixer.rows == [window.plane_view.weights()], timeout=10000)
    window.compare.columns[1].source.setCurrentText("Mix at the point")
    _generate(qtbot, window)
    assert not window.error_dialogs, [b.text() for b in window.error_dialogs]
    assert window.compare.last.columns[1].weights == window.plane_view.weights()


def test_a_refused_mix_says_so_and_changes_nothing(qtbot, window):
    window.host.apply_weights({"v1": 0.5})
    qtbot.waitUntil(lambda: window.host.worker.mixer.rows == [{"v1": 0.5}], timeout=10000)
    window.host.apply_weights({"v1": math.nan})
    qtbot.waitUntil(lambda: "not applied" in window.mix_label.text(), timeout=10000)
    assert window.host.worker.mixer.rows == [{"v1": 0.5}] and "still v1 +0.50" in window.mix_label.text()
    assert "finite" in window.error_dialogs[-1].text()


def test_a_stop_is_not_erased_by_the_next_request(qtbot, window):
    w = window
    blocks = w.host.worker.lm.decoder_layers()
    slow = blocks[0].register_forward_hook(lambda *a: time.sleep(0.01))  # about 30 ms a token
    results = []
    w.host.worker.compared.connect(lambda r: results.append(r))
    try:
        first = CompareRequest("Tell me a long story.", [Column("base")], SamplingParams(max_new_tokens=300))
        texts = []
        w.host.worker.text.connect(lambda i, piece: texts.append(piece))
        w.host.compare(first)
        qtbot.waitUntil(lambda: len(texts) >= 2, timeout=20000)
        w.host.stop()
        w.host.compare(replace(first, params=SamplingParams(max_new_tokens=3)))  # the next request, right after the Stop
        qtbot.waitUntil(lambda: len(results) == 2, timeout=60000)
    finally:
        slow.remove()
    assert results[0].columns[0].stopped and results[0].columns[0].n_tokens < 300
    assert not results[1].columns[0].stopped  # a new request has its own token


def test_closing_the_window_during_a_job_does_not_wait_for_it(qtbot, tmp_path, store, tiny_model_dir, demo_data):
    w = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.IniFormat), store=store, demo_directions=False)
    w.show()
    w.load_model(str(tiny_model_dir))
    qtbot.waitUntil(lambda: w.model_info is not None and not w.busy_with, timeout=30000)
    steps = []
    w.host.worker.jobProgress.connect(steps.append)
    out = tmp_path / "h.safetensors"
    w.start_job(BuildJob("train", "h", str(out),
                         Data(str(demo_data / "ultrafeedback_helpfulness_400.jsonl"), objective="helpfulness", limit=20),
                         steps=100000, param="full", max_tokens=24))
    qtbot.waitUntil(lambda: len(steps) >= 3, timeout=30000)
    # From now on a step takes several seconds (as on a real model): each block waits 1.2 s.
    slow = [b.register_forward_pre_hook(lambda *a: time.sleep(1.2)) for b in w.host.worker.lm.decoder_layers()]
    time.sleep(0.3)
    t0 = time.perf_counter()
    w.close()  # the cancel lands before the next block: at most the 1.2 s block under way, not the step
    elapsed = time.perf_counter() - t0
    for h in slow:
        h.remove()
    assert elapsed < 2.5 and w.host.thread.isFinished(), elapsed
    assert not out.exists()


def _visible_strings(w, skip=()) -> list[str]:
    """Every string a person can read in the window now: labels, buttons, fields, list and tree items, tooltips
    (outside the widgets in ``skip``)."""
    out = [w.windowTitle(), w.statusBar().currentMessage()]
    for widget in w.findChildren(QWidget):
        if not widget.isVisible() or any(widget is s or s.isAncestorOf(widget) for s in skip):
            continue
        out.append(widget.toolTip())
        if isinstance(widget, (QLabel, QAbstractButton, QLineEdit)):
            out.append(widget.text())
        elif isinstance(widget, QComboBox):
            out.append(widget.currentText())
        elif isinstance(widget, QPlainTextEdit):
            out.append(widget.toPlainText())
        elif isinstance(widget, QTreeWidget):
            stack = [widget.topLevelItem(i) for i in range(widget.topLevelItemCount())]
            while stack:
                item = stack.pop()
                out += [item.text(c) for c in range(item.columnCount())] + [item.toolTip(0)]
                stack += [item.child(i) for i in range(item.childCount())]
    return [s for s in out if s]


def test_a_blind_comparison_names_no_source_until_rated_then_the_true_one(qtbot, window, monkeypatch):
    w = window
    w.plane_view.set_point(0.6, 0.2)
    w.plane_view.add_pin("p1", -0.5, 0.5)
    w.compare.n_columns.setValue(3)
    for view, src in zip(w.compare.columns, ("Base model", "Mix at the point", "Pinned: p1")):
        view.source.setCurrentText(src)
    w.compare.blind.setChecked(True)
    monkeypatch.setattr("studio.compare_panel.random.shuffle", lambda order: order.reverse())
    _generate(qtbot, w, tokens=8)
    result = w.compare.last
    labels = [c.label for c in result.columns]
    assert labels[0] == "base" and labels[1].startswith("point (") and labels[2] == "pinned p1"
    secrets = ["Base model", "Mix at the point", "Pinned: p1", "pinned p1", "point (", "base:", "v1 +", "v2 +"]
    # The plane shows where the point is (the person put it there); it says nothing of which column is which.
    visible = _visible_strings(w, skip=[w.plane_view])
    leaks = [(s, t) for t in visible for s in secrets if s in t]
    assert not leaks, leaks

    w.compare.rate("winner", 0)  # slot A shows the last request column (the pinned point), the shuffle reversed them
    qtbot.waitUntil(lambda: w.compare.revealed, timeout=5000)
    assert "pinned p1" in w.compare.rating_status.text()
    for slot in range(3):
        r = w.compare.order[slot]
        view = w.compare.columns[slot]
        assert view.text.toPlainText() == result.columns[r].text
        assert view.source.currentText() == ["Base model", "Mix at the point", "Pinned: p1"][r]
        assert labels[r] in view.stats.text()
    rating = w.store.ratings(result.comparison_id)[-1]
    assert rating.blind and rating.winner_id == result.columns[2].generation_id


def test_rating_again_is_an_edit_that_can_be_undone(qtbot, window):
    w = window
    _generate(qtbot, w)
    w.compare.note.setText("A is clearer")
    w.compare.rate("winner", 0)
    qtbot.waitUntil(lambda: "Rating saved" in w.compare.rating_status.text(), timeout=5000)
    w.compare.rate("tie")
    qtbot.waitUntil(lambda: "Rating changed" in w.compare.rating_status.text(), timeout=5000)
    assert "it was: A" in w.compare.rating_status.text() and w.compare.undo_button.isVisible()
    cid = w.compare.last.comparison_id
    assert [r.outcome for r in w.store.ratings(cid)] == ["winner", "tie"]
    assert w.store.ratings(cid)[-1].note == "A is clearer"
    history = "\n".join(_visible_strings(w))
    assert "replaced by the rating below" in history
    w.compare.undo_button.click()
    qtbot.waitUntil(lambda: "undone" in w.compare.rating_status.text(), timeout=5000)
    assert [r.outcome for r in w.store.ratings(cid)] == ["winner"]


def test_a_scale_that_reaches_huge_weights_asks_first(qtbot, window, monkeypatch):
    asked = []
    monkeypatch.setattr(window.plane_view, "confirm_large", lambda weight: asked.append(weight) or False)
    window.plane_view.x_range.setValue(10.0)
    window.plane_view.x_scale.setValue(20.0)
    assert asked and window.plane_view.plane.x.scale * window.plane_view.plane.x.high <= 100.0 + 1e-9


def test_a_blind_comparison_reopened_from_the_history_stays_blind_and_reveals_truly(qtbot, window, monkeypatch):
    w = window
    w.plane_view.set_point(0.6, 0.2)
    for view, src in zip(w.compare.columns, ("Base model", "Mix at the point")):
        view.source.setCurrentText(src)
    w.compare.blind.setChecked(True)
    monkeypatch.setattr("studio.compare_panel.random.shuffle", lambda order: order.reverse())
    _generate(qtbot, w, tokens=6)
    labels = [c.label for c in w.compare.last.columns]
    w.compare.blind.setChecked(False)  # reopening must not un-blind an unrated blind comparison
    w.compare.columns[0].source.setCurrentText("Mix at the point")  # dropdowns no longer say what it was run with
    w.compare.columns[1].source.setCurrentText("Base model")
    w.history.open_item(w.history.topLevelItem(0))
    assert not w.compare.revealed
    assert not any("base" in t or "point (" in t for t in _visible_strings(w, skip=[w.plane_view]) if "How do I" not in t)
    w.compare.rate("winner", 0)
    qtbot.waitUntil(lambda: w.compare.revealed, timeout=5000)
    for slot in range(2):
        view = w.compare.columns[slot]
        assert labels[w.compare.order[slot]] in view.stats.text()
        assert not view.source.isVisible()  # its true source is unknown to the dropdown: the line above says it


def test_a_session_whose_direction_file_is_gone_restores_without_naming_it(qtbot, tmp_path, store, tiny_model_dir, tiny_vector):
    """Seen in a real window: a session whose direction files had moved restored its plane bound to them, and
    every drag then failed with 'No loaded direction named ...'."""
    kept, gone = tiny_vector.save(tmp_path / "kept.safetensors"), tiny_vector.save(tmp_path / "gone.safetensors")
    w = make_window(qtbot, tmp_path, store, tiny_model_dir, [(kept, "kept"), (gone, "gone")])
    w.plane_view.set_point(0.3, 0.6)
    sid = w.session_id
    w.close()
    gone.unlink()
    again = reopen(qtbot, tmp_path, store, sid, "b.ini")
    assert list(again.directions) == ["kept"]
    assert again.plane_view.plane.x.direction == "kept" and again.plane_view.plane.y.direction is None
    again.plane_view.set_point(0.5, 0.5)
    qtbot.waitUntil(lambda: again.host.worker.mixer.rows == [{"kept": 0.5}], timeout=10000)
    texts = [b.text() for b in again.error_dialogs]
    assert any("gone.safetensors" in t for t in texts) and not any("No loaded direction" in t for t in texts), texts
    again.close()
    # The session still holds the direction that did not load: once its file is back, it loads again.
    assert [d["name"] for d in store.session(sid).settings["directions"]] == ["kept", "gone"]
    tiny_vector.save(gone)
    third = reopen(qtbot, tmp_path, store, sid, "c.ini")
    assert list(third.directions) == ["kept", "gone"]
    third.close()


def test_a_database_that_cannot_be_opened_is_said_in_a_dialog(qtbot, tmp_path, monkeypatch):
    """The message was formatted by a timer after the ``except`` block had ended, when Python had already
    deleted the exception: the dialog never came, and the user never learned that nothing would be saved."""
    bad = tmp_path / "not-a-database.sqlite3"
    bad.write_bytes(b"this is not an SQLite file, and must stay as it is" * 100)
    monkeypatch.setenv("TSDPO_DB", str(bad))
    w = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.IniFormat), demo_directions=False)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitUntil(lambda: bool(w.error_dialogs), timeout=10000)
    box = w.error_dialogs[0]
    assert box.windowTitle() == "The session database cannot be used"
    assert str(bad) in box.text() and "not saved" in box.text()
    assert bad.read_bytes().startswith(b"this is not an SQLite file")  # left untouched
    w.close()
