"""The studio, offscreen, on the tiny model: drag, compare, rate, reopen, jobs, errors, responsiveness."""

import time

import pyqtgraph as pg
import pytest
from PySide6.QtCore import QEvent, QPointF, QSettings, Qt, QTimer
from PySide6.QtGui import QMouseEvent
from PySide6.QtWidgets import QApplication

from engine.store import Store
from studio.main_window import MainWindow
from engine.errors import TsdpoError
from studio.messages import BuildJob, Data

pg.setConfigOptions(mouseRateLimit=-1)  # otherwise pyqtgraph drops synthetic drag events


@pytest.fixture
def store(tmp_path):
    return Store(tmp_path / "studio.sqlite3")


@pytest.fixture
def vector_file(tiny_vector, tmp_path):
    return tiny_vector.save(tmp_path / "vec.safetensors")


def trained_looking_pair(model_dir, tmp_path, demo_data, scale):
    """Two random low-rank tangent directions (helpfulness, verbosity) that record training data, as a trained file
    does, so the held-out pairs can be rebuilt from them."""
    from engine.models import load_model
    from tiny_model import random_tangent

    uf = demo_data / "ultrafeedback_helpfulness_400.jsonl"
    lm = load_model(model_dir)
    paths = []
    for objective, seed in (("helpfulness", 1), ("verbosity", 2)):
        d = random_tangent(lm, objective, seed, scale=scale)
        d.meta.update(objective_sources=[{"objective": objective, "source": str(uf), "weight": 1.0, "pairs": 40}],
                      hyperparameters={"val_fraction": 0.2, "seed": 0})
        paths.append(d.save(tmp_path / f"{objective}.safetensors"))
    return lm, uf, paths


def make_window(qtbot, tmp_path, store, model_dir, directions=()):
    w = MainWindow(QSettings(str(tmp_path / "studio.ini"), QSettings.IniFormat), store=store, demo_directions=False)
    qtbot.addWidget(w)
    w.show()
    w.load_model(str(model_dir))
    qtbot.waitUntil(lambda: w.model_info is not None and not w.busy_with, timeout=30000)
    for path, name in directions:
        w.host.add_direction(str(path), name)
    qtbot.waitUntil(lambda: len(w.directions) == len(directions) and not w.busy_with, timeout=30000)
    return w


def reopen(qtbot, tmp_path, store, session_id, ini="other.ini"):
    """A second window that opens a stored session, once it has finished restoring."""
    w = MainWindow(QSettings(str(tmp_path / ini), QSettings.IniFormat), store=store, demo_directions=False)
    qtbot.addWidget(w)
    w.show()
    w.open_session(session_id)
    qtbot.waitUntil(lambda: w.model_info is not None and w.session.restore is None and not w.busy_with, timeout=30000)
    return w


@pytest.fixture
def window(qtbot, tmp_path, store, tiny_model_dir, vector_file):
    w = make_window(qtbot, tmp_path, store, tiny_model_dir, [(vector_file, "v1"), (vector_file, "v2")])
    yield w
    w.close()


def _viewport_pos(view, x, y):
    return view.mapFromScene(view.getViewBox().mapViewToScene(QPointF(x, y)))


def settled(view, rounds=20):
    """Let a window just shown finish its layout (the square plane takes its size from it) before aiming at it."""
    last, same = None, 0
    for _ in range(200):
        QApplication.processEvents()
        size = (view.width(), view.height())
        same = same + 1 if size == last else 0
        last = size
        if same >= rounds:
            return


def drag(view, start, end, steps=8):
    settled(view)
    vp = view.viewport()
    a, b = QPointF(_viewport_pos(view, *start)), QPointF(_viewport_pos(view, *end))

    def send(kind, pos, buttons):
        ev = QMouseEvent(kind, pos, vp.mapToGlobal(pos), Qt.LeftButton, buttons, Qt.NoModifier)
        QApplication.sendEvent(vp, ev)

    send(QEvent.MouseButtonPress, a, Qt.LeftButton)
    for i in range(1, steps + 1):
        p = a + (b - a) * (i / steps)
        send(QEvent.MouseMove, p, Qt.LeftButton)
        QApplication.processEvents()
    send(QEvent.MouseButtonRelease, b, Qt.NoButton)
    QApplication.processEvents()


def test_dragging_the_point_sets_weights_and_applies_the_mix(qtbot, window):
    plane = window.plane_view
    assert plane.plane.x.direction == "v1" and plane.plane.y.direction == "v2"
    drag(plane.view, (0.0, 0.0), (0.5, -0.25))
    x, y = plane.point
    assert x == pytest.approx(0.5, abs=0.03) and y == pytest.approx(-0.25, abs=0.03)
    expected = plane.weights()
    assert expected["v1"] == pytest.approx(x) and expected["v2"] == pytest.approx(y)
    qtbot.waitUntil(lambda: window.host.worker.mixer.rows == [expected], timeout=10000)
    assert "mix applied in" in window.mix_label.text() and "after the drag" in window.mix_label.text()
    assert f"v1 {expected['v1']:+.3f}, v2 {expected['v2']:+.3f}" in plane.weights_label.text()


def test_arrow_keys_nudge_and_scale_changes_weights(qtbot, window):
    plane = window.plane_view
    plane.view.setFocus()
    qtbot.keyClick(plane.view, Qt.Key_Right)
    qtbot.keyClick(plane.view, Qt.Key_Up)
    assert plane.point == pytest.approx((0.05, 0.05))
    plane.x_scale.setValue(2.0)
    assert plane.weights()["v1"] == pytest.approx(0.1)
    qtbot.waitUntil(lambda: window.host.worker.mixer.rows == [plane.weights()], timeout=10000)


def test_two_columns_stream_and_are_stored_then_rated(qtbot, window, store):
    window.plane_view.set_point(0.6, 0.0)
    window.prompt.setPlainText("Tell me about the sea.")
    window.max_tokens.setValue(12)
    window.compare.n_columns.setValue(2)
    window.compare.columns[0].source.setCurrentText("Base model")
    window.compare.columns[1].source.setCurrentText("Mix at the point")
    pieces = {0: [], 1: []}
    window.host.worker.text.connect(lambda c, p: pieces[c].append(p))
    window.generate_button.click()
    qtbot.waitUntil(lambda: window.last_result is not None, timeout=30000)
    cols = window.last_result.columns
    assert [c.label for c in cols] == ["base", "point (+0.60, +0.00)"]
    assert all(c.n_tokens > 0 for c in cols)
    assert window.compare.columns[1].text.toPlainText() == cols[1].text == "".join(pieces[1])
    (comp,) = store.history(window.session_id)
    assert [g.label for g in comp.generations] == ["base", "point (+0.60, +0.00)"]
    assert comp.generations[1].weights == {"v1": pytest.approx(0.6), "v2": 0.0}
    window.compare.columns[1].scores["helpfulness"].setValue(4)
    window.compare.note.setText("more detail")
    window.prompt.setFocus()  # even while typing in the prompt
    qtbot.keyClick(window.prompt, Qt.Key_2, Qt.ControlModifier)
    qtbot.waitUntil(lambda: "Rating saved" in window.compare.rating_status.text(), timeout=5000)
    (rating,) = store.history(window.session_id)[0].ratings
    assert rating.outcome == "winner" and rating.winner_id == comp.generations[1].id
    assert rating.scores == {str(comp.generations[1].id): {"helpfulness": 4}} and rating.note == "more detail"
    assert "rating: point (+0.60, +0.00) better" in window.history.topLevelItem(0).child(2).text(0)


def test_blind_mode_hides_labels_until_rated(qtbot, window, store):
    window.compare.blind.setChecked(True)
    window.prompt.setPlainText("Hi.")
    window.max_tokens.setValue(4)
    window.generate_button.click()
    qtbot.waitUntil(lambda: window.last_result is not None, timeout=30000)
    assert not window.compare.columns[0].source.isVisible()
    assert "base" not in window.compare.columns[0].stats.text() and "point" not in window.compare.columns[1].stats.text()
    window.compare.tie_button.click()
    assert window.compare.columns[0].source.isVisible()
    (rating,) = store.history(window.session_id)[0].ratings
    assert rating.blind and rating.outcome == "tie"


def test_reopening_a_session_restores_everything(qtbot, tmp_path, store, tiny_model_dir, window):
    window.plane_view.set_point(-0.3, 0.4)
    window.plane_view.add_pin("favourite", -0.3, 0.4)
    window.plane_view.y_scale.setValue(1.5)
    window.prompt.setPlainText("Hello.")
    window.max_tokens.setValue(4)
    window.generate_button.click()
    qtbot.waitUntil(lambda: window.last_result is not None, timeout=30000)
    session_id = window.session_id
    window.close()

    again = reopen(qtbot, tmp_path, store, session_id)
    assert set(again.directions) == {"v1", "v2"}
    assert again.plane_view.point == pytest.approx((-0.3, 0.4))
    assert again.plane_view.plane.y.scale == 1.5 and again.plane_view.plane.x.direction == "v1"
    assert again.plane_view.pins == {"favourite": (-0.3, 0.4)}
    assert again.history.topLevelItemCount() == 1 and again.history.topLevelItem(0).text(0) == "Hello."
    again.close()


def test_cancel_a_training_job(qtbot, window, demo_data, tmp_path):
    seen = []
    window.host.worker.jobProgress.connect(lambda p: (seen.append(p), window.job_panel.cancel.click() if len(seen) == 2 else None))
    window.start_job(BuildJob("train", "helpfulness", str(tmp_path / "h.safetensors"),
                              Data(str(demo_data / "ultrafeedback_helpfulness_400.jsonl"), objective="helpfulness", limit=20),
                              steps=500, param="lowrank", max_tokens=24))
    # jobFinished and the worker's idle signal arrive one after the other: wait for both.
    qtbot.waitUntil(lambda: window.job_panel.eta.text() == "cancelled" and not window.busy_with, timeout=60000)
    assert 2 <= len(seen) < 100 and "loss" in seen[-1].metrics  # stopped long before its 500 steps
    assert len(window.job_panel.losses) >= 1  # the plot followed the steps that ran
    assert not (tmp_path / "h.safetensors").exists()
    assert not window.busy_with and window.generate_button.isEnabled()


def test_a_training_job_that_keeps_another_objective_unchanged(qtbot, tmp_path, store, tiny_model_dir, demo_data):
    w = make_window(qtbot, tmp_path, store, tiny_model_dir)
    data = str(demo_data / "ultrafeedback_helpfulness_400.jsonl")
    w.start_job(BuildJob("train", "helpful", str(tmp_path / "h.safetensors"), Data(data, objective="helpfulness", limit=12),
                         steps=2, param="lowrank", max_tokens=24, lr=1e-2,
                         keep=Data(data, objective="verbosity", limit=12)))
    qtbot.waitUntil(lambda: "helpful" in w.directions and not w.busy_with, timeout=60000)
    from engine.loading import open_direction

    built = open_direction(tmp_path / "h.safetensors")
    kept = built.meta["kept_unchanged"]
    assert kept["objective"] == "verbosity" and kept["share_in_span"] < 1e-5
    assert built.meta["hyperparameters"]["optimizer"] == "adamw" and 0 < kept["removed_share"] < 1
    w.close()


def test_finished_job_adds_a_bindable_direction(qtbot, tmp_path, store, tiny_model_dir, demo_data):
    w = make_window(qtbot, tmp_path, store, tiny_model_dir)
    w.start_job(BuildJob("extract", "verbosity", str(tmp_path / "v.safetensors"),
                         Data(str(demo_data / "ultrafeedback_helpfulness_400.jsonl"), objective="verbosity", limit=12),
                         strength=1.0, estimator="pca", band=2))
    qtbot.waitUntil(lambda: "verbosity" in w.directions, timeout=60000)
    assert w.plane_view.plane.x.direction == "verbosity"  # bound to the free axis at once
    assert [d.name for d in store.directions()] == ["verbosity"]
    from engine.loading import open_direction

    built = open_direction(tmp_path / "v.safetensors")  # what the dialog's estimator and band asked for
    assert built.meta["method"]["estimator"] == "pca" and len(built.layers) == 2 and built.strength == 0.5
    w.close()


def test_errors_become_dialogs_and_the_app_keeps_working(qtbot, window, tmp_path, other_tiny_dir, demo_data):
    window.start_job(BuildJob("extract", "x", str(tmp_path / "x.safetensors"),
                              Data(str(tmp_path / "nope.jsonl"), objective="x", limit=5)))
    qtbot.waitUntil(lambda: bool(window.error_dialogs), timeout=30000)
    assert "does not exist" in window.error_dialogs[-1].text()
    from engine.models import load_model
    from engine.steering import extract

    other = load_model(other_tiny_dir)
    from engine.data import load_pairs

    foreign = extract(other, load_pairs(demo_data / "hh_rlhf_harmless_600.jsonl", limit=6), max_response_tokens=8)
    foreign.save(tmp_path / "foreign.safetensors")
    window.host.add_direction(str(tmp_path / "foreign.safetensors"), "")
    qtbot.waitUntil(lambda: len(window.error_dialogs) >= 2, timeout=30000)
    assert "not for the loaded model" in window.error_dialogs[-1].text()
    window.prompt.setPlainText("Still fine?")
    window.max_tokens.setValue(3)
    window.generate_button.click()
    qtbot.waitUntil(lambda: window.last_result is not None, timeout=30000)


def test_window_paints_while_the_worker_generates(qtbot, window):
    ticks = []
    timer = QTimer(interval=10, timeout=lambda: ticks.append(time.perf_counter()))
    window.prompt.setPlainText("Tell me a very long story.")
    window.max_tokens.setValue(300)
    window.generate_button.click()
    timer.start()
    qtbot.waitUntil(lambda: window.last_result is not None, timeout=60000)
    timer.stop()
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 10 and max(gaps) < 0.5, f"the GUI thread was blocked for {max(gaps):.2f} s"


def test_stop_and_close_during_generation(qtbot, window):
    window.prompt.setPlainText("Tell me a very long story.")
    window.max_tokens.setValue(4000)
    window.host.worker.text.connect(lambda *_: window.stop_button.click())
    window.generate_button.click()
    qtbot.waitUntil(lambda: window.last_result is not None, timeout=30000)
    assert all(c.stopped and c.n_tokens < 10 for c in window.last_result.columns)
    window.host.worker.text.disconnect()
    window.generate_button.click()
    qtbot.waitUntil(lambda: window.busy_with == "Generating", timeout=10000)
    t0 = time.perf_counter()
    window.close()
    assert not window.host.thread.isRunning() and time.perf_counter() - t0 < 5


def test_settings_persist(qtbot, tmp_path, store):
    w = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.IniFormat), store=store, demo_directions=False)
    w.max_tokens.setValue(77)
    w.temperature.setValue(0.7)
    w.regen.setChecked(True)
    w.close()
    w2 = MainWindow(QSettings(str(tmp_path / "s.ini"), QSettings.IniFormat), store=store, demo_directions=False)
    assert w2.max_tokens.value() == 77 and w2.temperature.value() == pytest.approx(0.7) and w2.regen.isChecked()
    w2.close()


def test_overlapping_directions_are_flagged_in_the_list(window):
    assert "overlaps v1 (cosine +1.00)" in window.direction_list.item(1).text()
    assert not window.error_dialogs


def test_reopening_a_session_whose_model_is_gone(qtbot, tmp_path, store, tiny_model_dir):
    import shutil

    gone = tmp_path / "gone-model"
    shutil.copytree(tiny_model_dir, gone)
    w = make_window(qtbot, tmp_path, store, gone)
    sid = w.session_id
    w.close()
    shutil.rmtree(gone)
    again = MainWindow(QSettings(str(tmp_path / "o.ini"), QSettings.IniFormat), store=store, demo_directions=False)
    qtbot.addWidget(again)
    again.open_session(sid)
    qtbot.waitUntil(lambda: bool(again.error_dialogs), timeout=30000)
    assert "does not exist" in again.error_dialogs[-1].text() and again.session.restore is None
    again.plane_view.set_point(0.1, 0.1)  # still usable, and the session still saves
    assert store.session(sid).settings.get("point") == [pytest.approx(0.1), pytest.approx(0.1)]
    again.close()


def test_launch_reopens_the_last_session(qtbot, tmp_path, store, tiny_model_dir, vector_file):
    w = make_window(qtbot, tmp_path, store, tiny_model_dir, [(vector_file, "v1")])
    w.plane_view.set_point(0.4, 0.0)
    sid = w.session_id
    w.close()
    again = MainWindow(QSettings(str(tmp_path / "studio.ini"), QSettings.IniFormat), store=store, demo_directions=False)
    qtbot.addWidget(again)
    again.start()
    qtbot.waitUntil(lambda: again.model_info is not None and again.session.restore is None and not again.busy_with, timeout=30000)
    assert again.session_id == sid and again.model_info.name == "tiny-llama"
    assert again.plane_view.point == pytest.approx((0.4, 0.0)) and set(again.directions) == {"v1"}
    again.close()


def test_export_the_mix_at_the_point(qtbot, window, tmp_path):
    from engine.export import MANIFEST
    from studio.jobs import ExportDialog

    window.plane_view.set_point(0.5, -0.25)
    weights = window.plane_view.weights()
    dialog = ExportDialog(weights, {n: d.label for n, d in window.directions.items()}, tmp_path / "cv")
    assert dialog.format.currentData() == "controlvector"  # only steering vectors are on the plane
    window.start_export(dialog.job())
    qtbot.waitUntil(lambda: window.job_panel.eta.text().startswith("exported to"), timeout=30000)
    manifest = __import__("json").loads((tmp_path / "cv" / MANIFEST).read_text())
    assert manifest["point"] == [0.5, -0.25] and manifest["weights"] == {k: v for k, v in weights.items() if v}
    assert (tmp_path / "cv" / "mix.gguf").is_file() and "Open folder" in [b.text() for b in window.export_dialog.buttons()]

    # The same folder again, and a checkpoint without baking: each a dialog that says what to do; nothing is lost.
    window.start_export(dialog.job())
    qtbot.waitUntil(lambda: bool(window.error_dialogs), timeout=30000)
    assert "already exists" in window.error_dialogs[-1].text() and (tmp_path / "cv" / "mix.gguf").is_file()
    dialog.format.setCurrentIndex(0)
    dialog.bake.setChecked(False)
    dialog.out.setText(str(tmp_path / "hf"))
    window.start_export(dialog.job())
    qtbot.waitUntil(lambda: len(window.error_dialogs) >= 2, timeout=30000)
    assert "--bake-steering" in window.error_dialogs[-1].text() and not (tmp_path / "hf").exists()
    dialog.bake.setChecked(True)
    window.start_export(dialog.job())
    qtbot.waitUntil(lambda: (tmp_path / "hf" / "config.json").is_file() and not window.busy_with, timeout=30000)
    assert window.generate_button.isEnabled()


def test_predicted_and_measured_heatmaps(qtbot, tmp_path, store, tiny_model_dir, demo_data):
    import json

    from engine.data import load_pairs
    from engine.loading import load_direction
    from engine.sweep import Method, Sweep, SweepConfig, write_outputs

    lm, uf, paths = trained_looking_pair(tiny_model_dir, tmp_path, demo_data, 0.3)
    w = make_window(qtbot, tmp_path, store, tiny_model_dir, [(paths[0], "helpfulness"), (paths[1], "verbosity")])
    assert (w.plane_view.plane.x.direction, w.plane_view.plane.y.direction) == ("helpfulness", "verbosity")
    w.plane_view.set_point(0.5, 0.25)
    qtbot.waitUntil(lambda: w.host.worker.mixer.rows == [{"helpfulness": 0.5, "verbosity": 0.25}], timeout=30000)
    w.start_prediction()
    qtbot.waitUntil(lambda: w.prediction is not None and not w.busy_with, timeout=60000)
    assert w.host.worker.mixer.rows == [{"helpfulness": 0.5, "verbosity": 0.25}]  # the point's mix is back
    assert w.plane_view.heat_combo.currentText() == "predicted · helpfulness · margin"
    assert w.plane_view.heatmap.isVisible() and w.plane_view.colorbar.isVisible()
    layer = w.plane_view.layers["predicted · helpfulness · margin"]
    assert layer["values"][20][20] == 0.0  # the centre of the 41 x 41 map is the base model
    assert w.plane_view.layers["predicted · verbosity · accuracy"]["values"][20][20] == 0.5

    # Measured points from a sweep of the same directions: heatmap layers, and marks on the prediction.
    data = {o: load_pairs(uf, objective=o, limit=40).split(0.2)[1] for o in ("helpfulness", "verbosity")}
    dirs = [load_direction(p, lm) for p in paths]
    cfg = SweepConfig(grid=3, pairs=4, max_prompt_tokens=32, max_response_tokens=32, linearization_gap=False)
    write_outputs(Sweep(lm, [Method("tangent", "tangent", *dirs)], data, cfg, tmp_path / "sw").run(), tmp_path / "sw")
    w.load_sweep(str(tmp_path / "sw" / "sweep.json"))
    assert "measured · tangent · helpfulness/margin" in w.plane_view.layers
    marks = [m for _, _, m in w.plane_view.layers["predicted · helpfulness · margin"]["points"]]
    assert len(marks) == 9 and set(marks) <= {"confirmed", "contradicted"}
    w.plane_view.heat_combo.setCurrentText("measured · tangent · helpfulness/margin")
    measured = w.plane_view.layers["measured · tangent · helpfulness/margin"]
    sweep = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    corner = next(e for e in sweep["methods"]["tangent"]["points"] if (e["x"], e["y"]) == (1, -1))
    assert measured["values"][0][2] == pytest.approx(corner["helpfulness/margin"])  # row y=-1, column x=+1
    assert len(w.plane_view.marks.data) == 9

    # Halving the x scale maps the measured weights to twice the plane coordinate.
    w.plane_view.x_scale.setValue(0.5)
    assert max(x for x, _, _ in w.plane_view.layers["measured · tangent · helpfulness/margin"]["points"]) == pytest.approx(2.0)
    w.load_sweep(str(tmp_path / "nope.json"))
    assert "could not be read" in w.error_dialogs[-1].text()
    w.close()


def test_the_job_dialogs_make_the_jobs_the_worker_runs(qtbot, tmp_path, demo_data):
    from studio.jobs import JobDialog

    data = str(demo_data / "ultrafeedback_helpfulness_400.jsonl")
    extract = JobDialog("extract", tmp_path, data)
    qtbot.addWidget(extract)
    extract.limit.setValue(50)
    extract.strength.setValue(0.2)
    job = extract.job()
    assert (job.kind, job.name, job.strength, job.data) == ("extract", "verbosity", 0.2, Data(data, None, "verbosity", 50))
    assert (job.estimator, job.band) == ("mean-difference", 1)
    extract.estimator.setCurrentText("pca")
    extract.band.setValue(3)
    assert (extract.job().estimator, extract.job().band) == ("pca", 3)
    assert job.out == str(tmp_path / "verbosity.steer.safetensors") and job.second is None

    train = JobDialog("train", tmp_path, data)
    qtbot.addWidget(train)
    train.param.setCurrentText("full")
    train.steps.setValue(7)
    train.name.setText("help fast")
    job = train.job()
    assert (job.kind, job.param, job.steps, job.name) == ("train", "full", 7, "help fast")
    assert job.out == str(tmp_path / "help_fast.tsdpo.safetensors") and job.data.objective == "helpfulness"
    assert job.lr_grid == [] and job.data.length_matched is None
    train.lr_grid.setText("5e-4, 1e-3")
    train.data.length_matched.setValue(1.2)
    job = train.job()
    assert job.lr_grid == [5e-4, 1e-3] and job.data.length_matched == 1.2
    assert len(job.data.load()) < len(Data(data, None, "helpfulness", 200).load())  # fewer pairs within 20%
    train.data.length_matched.setValue(1.0)  # "off"
    train.data.length_balanced.setValue(2.0)
    job = train.job()
    assert (job.data.length_matched, job.data.length_balanced) == (None, 2.0)
    balanced = job.data.load()
    assert "length-balanced within 2x" in balanced.source
    assert (sum(len(p.chosen.strip()) > len(p.rejected.strip()) for p in balanced)
            == sum(len(p.chosen.strip()) < len(p.rejected.strip()) for p in balanced))
    train.data.length_matched.setValue(1.2)
    with pytest.raises(TsdpoError, match="not both"):
        train.job().data.load()
    train.data.length_balanced.setValue(1.0)
    assert train.job().data.min_score_gap is None  # "off"
    train.data.length_matched.setValue(1.0)
    train.data.min_score_gap.setValue(3.0)
    job = train.job()
    assert job.data.min_score_gap == 3.0
    assert all(p.score_gap >= 3 for p in job.data.load()) and "score gap 3 or more" in job.data.load().source
    train.data.min_score_gap.setValue(0.0)
    job = train.job()
    assert job.keep is None and job.optimizer == "adamw"
    train.keep.setChecked(True)  # train helpfulness, keep verbosity where it is
    train.optimizer.setCurrentText("sgd")
    train.lr_grid.setText("")
    train.lr.setValue(10.0)  # one plain step's rate is its length: rates above 1 reach the job
    job = train.job()
    assert job.keep == Data(data, None, "verbosity", None) and job.optimizer == "sgd" and job.lr == 10.0
    assert train.keep_data.layout().rowCount() == 3  # data, format, objective: kept pairs are taken whole
    assert train.data.layout().rowCount() == 6
    train.lr_grid.setText("fast")
    with pytest.raises(TsdpoError, match="not a list of numbers"):
        train.learning_rates()

    scal = JobDialog("scalarized", tmp_path, data)
    qtbot.addWidget(scal)
    scal.weight.setValue(0.3)
    job = scal.job()
    assert job.kind == "scalarized" and job.weight == 0.3 and job.name == "scalarized helpfulness=0.3"
    assert job.second == Data(data, None, "verbosity", 200)


def test_no_field_of_a_job_dialog_is_squeezed(qtbot, tmp_path):
    """A dialog with the (word-wrapped) coverage text opened shorter than its rows need and squeezed every field;
    seen in a real window. Each editable field gets at least its own minimum height."""
    from PySide6.QtWidgets import QAbstractSpinBox, QComboBox, QLineEdit, QMainWindow, QWidget

    from studio.jobs import JobDialog

    coverage = ["A direction on this llama model covers 210 weight matrices, 106,168,320 of the decoder blocks' "
                "106,202,880 parameters (100%): self_attn.q_proj, self_attn.k_proj, self_attn.v_proj, "
                "self_attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj in each of 30 blocks.",
                "Skipped: norm weights and other vectors: 60 tensors, 34,560 parameters (only the weight matrices "
                "of linear layers are directions; e.g. model.layers.0.input_layernorm.weight)."]
    parent = QMainWindow()
    qtbot.addWidget(parent)
    parent.resize(1400, 900)
    parent.show()
    for kind in ("train", "scalarized", "extract"):
        dialog = JobDialog(kind, tmp_path, "x.jsonl", parent, coverage=coverage)
        qtbot.addWidget(dialog)
        dialog.show()
        qtbot.waitExposed(dialog)
        fields = [w for w in dialog.findChildren(QWidget) if isinstance(w, (QAbstractSpinBox, QComboBox, QLineEdit))
                  and not isinstance(w.parent(), (QAbstractSpinBox, QComboBox)) and w.isVisible()]
        assert len(fields) > 8
        squeezed = [(type(w).__name__, w.height(), w.minimumSizeHint().height()) for w in fields
                    if w.height() < w.minimumSizeHint().height()]
        assert not squeezed, (kind, squeezed)
        dialog.close()


def test_the_training_dialog_says_what_a_direction_covers_on_the_model_loaded(qtbot, tmp_path, store, demo_data):
    from architectures import build_architecture
    from studio.jobs import JobDialog

    w = make_window(qtbot, tmp_path, store, build_architecture("mixtral", tmp_path / "mixtral"))
    shown = []

    def look():  # the dialog is modal: read it once it is up, then close it
        dialog = QApplication.activeModalWidget()
        if not isinstance(dialog, JobDialog):
            QTimer.singleShot(50, look)
            return
        shown.append(dialog.coverage.text() if hasattr(dialog, "coverage") else "")
        dialog.reject()

    QTimer.singleShot(50, look)
    w.open_job("train")
    text = shown[0]
    assert "covers 16 weight matrices" in text and "fused expert tensors" in text and "MixtralTopKRouter" in text
    extract = JobDialog("extract", tmp_path, str(demo_data / "ultrafeedback_helpfulness_400.jsonl"),
                        coverage=w.model_info.coverage)
    qtbot.addWidget(extract)
    assert not hasattr(extract, "coverage")  # a steering vector covers every block: nothing to say there


def test_three_tangent_columns_run_as_one_batch(qtbot, tmp_path, store, tiny_model_dir):
    from engine.models import load_model
    from tiny_model import random_tangent

    lm = load_model(tiny_model_dir)
    low = [random_tangent(lm, o, seed=s, scale=0.3).save(tmp_path / f"{o}.safetensors") for o, s in (("help", 1), ("verb", 2))]
    full = random_tangent(lm, "full", seed=3, param="full", scale=0.3).save(tmp_path / "full.safetensors")
    w = make_window(qtbot, tmp_path, store, tiny_model_dir, [(low[0], "help"), (low[1], "verb")])
    assert (w.plane_view.plane.x.direction, w.plane_view.plane.y.direction) == ("help", "verb")
    w.plane_view.set_point(0.5, -0.3)
    w.plane_view.add_pin("other", -0.6, 0.4)
    w.prompt.setPlainText("Hello")
    w.max_tokens.setValue(4)
    w.compare.choose(["Base model", "Mix at the point", "Pinned: other"])
    w.generate_button.click()
    qtbot.waitUntil(lambda: w.last_result is not None and not w.busy_with, timeout=30000)
    assert w.last_result.batched and w.progress_label.text() == "3 columns generated in one batch"

    w.host.add_direction(str(full), "full")  # a full-rank direction bound to an axis: its columns split
    qtbot.waitUntil(lambda: "full" in w.directions and not w.busy_with, timeout=30000)
    w.plane_view.x_combo.setCurrentText("full")
    assert w.plane_view.pin_weights("other") == {"help": -0.6, "verb": 0.4}  # a pin keeps the mix it named
    w.plane_view.add_pin("other", -0.6, 0.4)  # pinned again: now it names the full-rank direction's mix
    assert w.plane_view.pin_weights("other") == {"full": -0.6, "verb": 0.4}
    w.last_result = None
    w.generate_button.click()
    qtbot.waitUntil(lambda: w.last_result is not None and not w.busy_with, timeout=30000)
    assert not w.last_result.batched and "in 3 batches" in w.progress_label.text()
    assert "full-rank" in w.progress_label.text()

    # The point's and the pin's batches are one row each with a low-rank mix: asked for many tokens, the engine
    # merges them (the adapter's timed cost per pass x 300 tokens against one timed merge + restore: ~0.4 ms x 300
    # against ~1.4 ms on the tiny model), and the status bar says so.
    w.max_tokens.setValue(300)
    w.last_result = None
    w.generate_button.click()
    qtbot.waitUntil(lambda: w.last_result is not None and not w.busy_with, timeout=60000)
    assert w.last_result.merged == 2 and w.last_result.batches == 3
    assert "merged into the weights for this generation" in w.progress_label.text()
    w.close()


def test_the_plane_marks_where_the_mixed_model_leaves_the_linearized_one(qtbot, tmp_path, store, tiny_model_dir, demo_data):
    """Directions > Map the linearization gap: measured at the base whatever the point applies, drawn as two heatmap
    layers and a dashed line at the trusted share, saved, and drawn again (without measuring) by the next window
    that puts the same directions on the same layout; another layout has no line."""
    from engine.paths import data_dir

    _, _, paths = trained_looking_pair(tiny_model_dir, tmp_path, demo_data, 1.5)
    dirs = [(paths[0], "helpfulness"), (paths[1], "verbosity")]
    w = make_window(qtbot, tmp_path, store, tiny_model_dir, dirs)
    assert not len(w.plane_view.trust_curve.xData or [])
    w.plane_view.set_point(0.5, 0.25)
    qtbot.waitUntil(lambda: w.host.worker.mixer.rows == [{"helpfulness": 0.5, "verbosity": 0.25}], timeout=30000)
    w.start_gap_map()
    qtbot.waitUntil(lambda: "linearization gap · share of the change" in w.plane_view.layers and not w.busy_with, timeout=60000)
    assert w.host.worker.mixer.rows == [{"helpfulness": 0.5, "verbosity": 0.25}]  # the point's mix is back
    assert w.plane_view.heat_combo.currentText() == "linearization gap · share of the change"
    rel = w.plane_view.layers["linearization gap · share of the change"]["values"]
    assert len(rel) == 7 and rel[3][3] == 0.0 and max(map(max, rel)) > 0.25  # the origin is the base; the corners are not
    xs, ys = w.plane_view.trust_curve.getData()
    assert len(xs) > 0 and all(-1 <= v <= 1 for v in xs if v == v) and all(-1 <= v <= 1 for v in ys if v == v)
    assert w.plane_view.trust_text.toPlainText() == "- - linearization gap 25%"
    saved = list((data_dir() / "gap-maps").glob("*.json"))
    assert len(saved) == 1
    w.close()

    again = make_window(qtbot, tmp_path, store, tiny_model_dir, dirs)
    assert len(again.plane_view.trust_curve.getData()[0]) > 0  # found on disk: nothing measured
    assert "linearization gap · nats per token" in again.plane_view.layers
    again.plane_view.x_scale.setValue(0.5)  # another layout: this map does not describe it
    assert again.plane_view.trust_curve.getData()[0] is None or len(again.plane_view.trust_curve.getData()[0]) == 0
    assert "linearization gap · nats per token" not in again.plane_view.layers
    again.plane_view.x_combo.setCurrentText("(none)")
    again.plane_view.y_combo.setCurrentText("(none)")
    again.start_gap_map()
    assert "No TS-DPO direction on the plane" in again.error_dialogs[-1].windowTitle() + again.error_dialogs[-1].text()
    again.close()


def test_a_prompt_set_fills_the_grid_and_a_blind_row_is_rated_side_by_side(qtbot, tmp_path, store, window):
    w = window
    prompts = tmp_path / "p.txt"
    prompts.write_text("Say hi.\nName a colour.\nCount to three.\n")
    w.compare.choose(["Base model", "Mix at the point"], 2)
    w.plane_view.set_point(0.6, 0.4)
    qtbot.waitUntil(lambda: w.host.worker.mixer.rows[0].get("v1") == pytest.approx(0.6), timeout=30000)
    w.compare.blind.setChecked(True)
    w.max_tokens.setValue(6)
    grid = w.prompt_set
    grid.path.setText(str(prompts))
    grid.run_button.click()
    qtbot.waitUntil(lambda: grid.table.rowCount() == 3 and not w.busy_with, timeout=60000)
    assert [grid.table.horizontalHeaderItem(i).text() for i in range(3)] == ["prompt", "A", "B"]
    cells = [grid.table.item(r, c).text() for r in range(3) for c in (1, 2)]
    assert not any("base" in t or "point" in t for t in cells)  # blind: no source named before rating
    comps = store.history(w.session.session_id)
    assert [c.params["prompt_set"] for c in comps] == ["p"] * 3 and all(c.params["blind"] for c in comps)
    assert [g.label for g in comps[1].generations][0] == "base"
    assert "6 tokens" in grid.table.item(1, 1).text()

    # Open row 1 side by side: the same shuffle as the grid, names still hidden.
    order = grid.rows[1]["order"]
    grid.table.cellDoubleClicked.emit(1, 1)
    assert w.tabs.currentIndex() == 0 and w.compare.order[:2] == order and not w.compare.revealed
    texts = [g.output for g in comps[1].generations]
    assert w.compare.columns[0].text.toPlainText() == texts[order[0]]
    assert w.compare.columns[1].text.toPlainText() == texts[order[1]]
    w.compare.rate("winner", 0)  # A, whichever source that is
    qtbot.waitUntil(lambda: bool(store.ratings(comps[1].id)), timeout=10000)
    rating = store.ratings(comps[1].id)[-1]
    assert rating.blind and rating.winner_id == comps[1].generations[order[0]].id
    assert f"[{comps[1].generations[order[0]].label}" in grid.table.item(1, 1).text()  # revealed in the grid too
    assert "✓" in grid.table.item(1, 0).text() and "✓" not in grid.table.item(0, 0).text()
    assert "[" not in grid.table.item(0, 1).text()  # the other rows stay blind


def test_the_ratings_tab_adds_up_the_ratings_and_turns_them_into_training_data(qtbot, tmp_path, store, window):
    """Wins, ties and losses by hand, blind and unblind apart, filtered by prompt set; the CSV and plot exports; and
    'Train a direction from these ratings' opening the training dialog on the exported pairs."""
    import json

    from studio.jobs import JobDialog

    w = window
    sid = w.session.session_id

    def comparison(labels, outcome, winner, blind, pset=None):
        c = store.add_comparison(sid, "Say hi.", {"max_new_tokens": 50, **({"prompt_set": pset} if pset else {})}, 0,
                                 [{"label": l, "output": f"reply of {l}", "n_tokens": 5, "seconds": 0.1} for l in labels])
        store.add_rating(c.id, outcome, winner_id=c.generations[winner].id if winner is not None else None, blind=blind)

    comparison(["base", "point (+0.50, +0.00)"], "winner", 1, True, "eval")
    comparison(["base", "point (+0.20, +0.10)"], "winner", 1, True, "eval")
    comparison(["base", "point (+0.20, +0.10)"], "tie", None, False)
    comparison(["base", "pinned A"], "winner", 0, False)
    w.tabs.setCurrentWidget(w.ratings_view)
    view = w.ratings_view
    table = view.table

    def rows():
        return {table.item(r, 0).text(): [table.item(r, c).text() for c in range(1, 6)] for r in range(table.rowCount())}

    # By hand: the point W2 T1 L0 (2.5 of 3), base W1 T1 L2 (1.5 of 4), pinned A W0 T0 L1.
    assert rows() == {"point": ["2", "1", "0", "0", "0.833"], "base": ["1", "1", "2", "0", "0.375"],
                      "pinned A": ["0", "0", "1", "0", "0.000"]}
    view.group.setCurrentText("Blind ratings")
    assert rows() == {"point": ["2", "0", "0", "0", "1.000"], "base": ["0", "0", "2", "0", "0.000"]}
    view.group.setCurrentText("All ratings")
    view.prompt_set.setCurrentText("eval")
    assert set(rows()) == {"point", "base"} and rows()["point"][0] == "2"
    assert "2 rated comparisons" in view.note.text()
    view.prompt_set.setCurrentIndex(0)
    assert len(view.plot.getPlotItem().items) > 2  # bars and their intervals

    shown = []

    def look():
        dialog = QApplication.activeModalWidget()
        if not isinstance(dialog, JobDialog):
            QTimer.singleShot(50, look)
            return
        shown.append((dialog.data.path.text(), dialog.data.format.currentText(), dialog.data.objective.text()))
        dialog.reject()

    QTimer.singleShot(50, look)
    view.exclude_cut.setChecked(False)
    view.train_button.click()
    path, fmt, objective = shown[0]
    assert fmt == "trl" and objective == "ratings"
    pairs = [json.loads(l) for l in open(path)]
    # Winners over the other column: two point wins and one base win.
    assert sorted(p["chosen"] for p in pairs) == ["reply of base", "reply of point (+0.20, +0.10)", "reply of point (+0.50, +0.00)"]


def test_the_window_fits_1280_by_720_with_a_job_running_and_gives_the_space_back(qtbot, tmp_path, store, window):
    from studio.messages import JobResult

    w = window
    assert w.minimumSizeHint().width() <= 1280 and w.minimumSizeHint().height() <= 720
    w.resize(1280, 720)
    qtbot.waitUntil(lambda: w.height() <= 720, timeout=5000)

    class Job:
        kind, name = "train", "a direction"

    QApplication.processEvents()
    docks = w.job_dock.height()
    w._dock_height = docks
    w.job_panel.started(Job())
    w.job_dock.raise_()
    w.resizeDocks([w.job_dock], [300], Qt.Vertical)  # a user drags the job panel taller to watch the curves
    QApplication.processEvents()
    assert w.job_dock.height() > docks + 50
    assert w.minimumSizeHint().height() <= 720 and w.height() <= 720  # a training job does not grow the window
    bar = w.statusBar()
    assert bar.isVisible() and bar.geometry().bottom() <= w.height()
    plane = w.plane_view.view
    assert abs(plane.width() - plane.height()) <= 1  # the plane stays square
    before = plane.width()
    w._on_job_finished(JobResult("train", 1.0, name="a direction", summary="done"))
    assert not w.job_panel.plot.isVisible()
    # The job panel gives its space back (to what the docks had before the job).
    qtbot.waitUntil(lambda: w.job_dock.height() <= docks + 15, timeout=3000)
    w.resize(1600, 1000)
    QApplication.processEvents()
    assert plane.width() > before and abs(plane.width() - plane.height()) <= 1  # it grows with the window


def test_a_pin_keeps_its_mix_across_layouts_and_sessions_and_new_columns_take_unused_pins(qtbot, tmp_path, store, tiny_model_dir, vector_file):
    w = make_window(qtbot, tmp_path, store, tiny_model_dir, [(vector_file, "v1"), (vector_file, "v2"), (vector_file, "v3")])
    view = w.plane_view
    view.add_pin("P", 0.5, -0.25)
    mix = view.pin_weights("P")
    assert mix == {"v1": 0.5, "v2": -0.25}
    view.anchor_mode.setChecked(True)  # the anchor layout maps (0.5, -0.25) to another mix: the pin does not follow
    assert view.plane.weights(0.5, -0.25) != mix and view.pin_weights("P") == mix
    assert store.pinned_points(w.session.session_id)[0].weights == mix  # on disk with its mix
    view.add_pin("Q", -0.5, 0.5)
    # Columns: base, the point, then a third and fourth column take the pins no column uses yet.
    w.compare.choose(["Base model", "Mix at the point"], 2)
    w.compare.n_columns.setValue(4)
    assert w.compare.chosen_sources() == ["Base model", "Mix at the point", "Pinned: P", "Pinned: Q"]
    sid = w.session.session_id
    w.close()

    again = reopen(qtbot, tmp_path, store, sid)
    assert again.plane_view.pin_weights("P") == mix
    from studio.compare_panel import column_request
    col = column_request("Pinned: P", again.plane_view.point, again.plane_view.weights(), again.plane_view.pins,
                         again.plane_view.pin_weights, {})
    assert col.weights == mix and col.point == (0.5, -0.25)
    again.close()


def test_copy_buttons_and_highlighted_differences(qtbot, window):
    w = window
    w.compare.choose(["Base model", "Mix at the point"], 2)
    w.plane_view.set_point(1.0, 1.0)
    w.prompt.setPlainText("Name three colours.")
    w.max_tokens.setValue(12)
    w.generate_button.click()
    qtbot.waitUntil(lambda: w.last_result is not None and not w.busy_with, timeout=30000)
    a, b = (w.compare.columns[i].text.toPlainText() for i in range(2))
    w.compare.columns[1].copy.click()
    assert QApplication.clipboard().text() == b
    assert w.compare.columns[0].text.extraSelections() == []
    w.compare.diff.setChecked(True)
    from studio.compare_panel import word_diff
    spans_a, spans_b = word_diff(a, b)
    assert a != b and spans_b  # the mix at (1, 1) changes the tiny model's reply
    marked = [(s.cursor.selectionStart(), s.cursor.selectionEnd()) for s in w.compare.columns[1].text.extraSelections()]
    assert marked == spans_b
    assert len(w.compare.columns[0].text.extraSelections()) == len(spans_a)
    w.compare.diff.setChecked(False)
    assert w.compare.columns[1].text.extraSelections() == []


def test_the_dark_palette_reaches_the_plots_at_once(qtbot, window):
    from PySide6.QtGui import QColor

    w = window
    plots = [w.plane_view.view, w.ratings_view.plot, w.job_panel.plot]
    try:
        w.dark_action.setChecked(True)
        for p in plots:  # no resize, no repaint asked for: the colours are the palette's right away
            assert p.backgroundBrush().color() == QColor(42, 45, 50)
            assert p.getPlotItem().getAxis("bottom").textPen().color() == QColor(225, 228, 232)
    finally:
        w.dark_action.setChecked(False)
    light = QApplication.instance().palette().color(w.palette().ColorRole.Window)
    assert all(p.backgroundBrush().color() == light for p in plots)


def test_every_control_says_what_it_does(qtbot, tmp_path, window):
    """A tooltip on every button, box and field of the window and of its dialogs (Qt's own parts aside)."""
    from PySide6.QtWidgets import QAbstractButton, QAbstractSpinBox, QComboBox, QLineEdit, QPlainTextEdit, QTabBar, QWidget

    from studio.jobs import ExportDialog, JobDialog

    kinds = (QAbstractButton, QComboBox, QAbstractSpinBox, QLineEdit, QPlainTextEdit)
    dialogs = [JobDialog(k, tmp_path, "x.jsonl") for k in ("extract", "train", "scalarized")]
    dialogs.append(ExportDialog({"a": 0.5}, {"a": "steering"}, tmp_path / "out"))
    missing = []
    for root in [window, *dialogs]:
        for c in root.findChildren(QWidget):
            if not isinstance(c, kinds) or c.toolTip() or c.objectName().startswith("qt_"):
                continue
            if isinstance(c.parent(), (QAbstractSpinBox, QComboBox, QTabBar)):  # the editor inside a box, tab arrows
                continue
            missing.append(f"{type(root).__name__}: {type(c).__name__} {c.objectName() or getattr(c, 'text', lambda: '')()!r}")
    for d in dialogs:
        d.deleteLater()
    assert missing == []


def test_the_plane_says_what_weight_1_means(qtbot, tmp_path, store, tiny_model_dir, vector_file):
    from engine.models import load_model
    from tiny_model import random_tangent

    lm = load_model(tiny_model_dir)
    tangent = random_tangent(lm, "help", 1, scale=0.3).save(tmp_path / "help.safetensors")
    w = make_window(qtbot, tmp_path, store, tiny_model_dir, [(tangent, "help"), (vector_file, "v1")])
    view = w.plane_view
    x = view.view.getPlotItem().getAxis("bottom").labelText
    y = view.view.getPlotItem().getAxis("left").labelText
    facts = w.host.worker.mixer.directions["v1"].describe()
    assert (x, y) == ("help", "v1")
    assert view.meaning_label.text() == ("help: weight 1 = tau as trained (TS-DPO); v1: weight 1 = "
                                         f"{facts['strength']:g} x layer {facts['layers'][0]}'s typical norm (steering)")
    view.x_scale.setValue(2.0)
    assert view.view.getPlotItem().getAxis("bottom").labelText == "help · x = 1 is weight 2"
    x0, x1 = view.view.getPlotItem().getViewBox().viewRange()[0]
    assert x0 == pytest.approx(-1.06, abs=0.02) and x1 == pytest.approx(1.06, abs=0.02)  # the range, not a stretch of it
    w.close()


def test_exporting_the_ratings_writes_pairs_csv_and_the_chart_beside_them(qtbot, tmp_path, window, monkeypatch):
    import csv

    from PySide6.QtWidgets import QFileDialog

    w = window
    w.prompt.setPlainText("Hello")
    w.max_tokens.setValue(4)
    w.compare.choose(["Base model", "Mix at the point"], 2)
    w.plane_view.set_point(0.8, 0.0)
    w.generate_button.click()
    qtbot.waitUntil(lambda: w.last_result is not None and not w.busy_with, timeout=30000)
    w.compare.rate("winner", 1)
    qtbot.waitUntil(lambda: "Rating saved" in w.compare.rating_status.text(), timeout=10000)
    target = tmp_path / "out" / "mine.jsonl"
    target.parent.mkdir()
    monkeypatch.setattr(QFileDialog, "getSaveFileName", lambda *a, **k: (str(target), ""))
    w.export_ratings()
    assert len(target.read_text().splitlines()) == (1 if w.last_result.columns[0].text.strip() != w.last_result.columns[1].text.strip() else 0)
    rows = list(csv.DictReader(open(tmp_path / "out" / "mine.csv")))
    assert sorted(r["won"] for r in rows) == ["0", "1"]
    assert (tmp_path / "out" / "mine.win-rates.png").read_bytes()[:4] == b"\x89PNG"
    w.export_ratings_csv()  # the Ratings tab's export, through the same dialog
    assert list(csv.DictReader(open(target))) and "won" in open(target).readline()


def test_a_session_system_prompt_goes_in_front_and_is_kept(qtbot, tmp_path, store, window, monkeypatch):
    import json

    from PySide6.QtWidgets import QInputDialog

    w = window
    monkeypatch.setattr(QInputDialog, "getMultiLineText", lambda *a, **k: ("Answer in one sentence.", True))
    w.edit_system_prompt()
    assert "system prompt" in w.session_label.text()
    w.prompt.setPlainText("Why is the sky blue?")
    w.max_tokens.setValue(4)
    w.generate_button.click()
    qtbot.waitUntil(lambda: w.last_result is not None and not w.busy_with, timeout=30000)
    stored = store.history(w.session.session_id)[-1].prompt
    assert json.loads(stored) == [{"role": "system", "content": "Answer in one sentence."},
                                  {"role": "user", "content": "Why is the sky blue?"}]
    assert w.history.topLevelItem(0).text(0) == "Why is the sky blue?"  # the history shows the user's prompt
    sid = w.session.session_id
    w.close()
    again = reopen(qtbot, tmp_path, store, sid)
    assert again.system_prompt == "Answer in one sentence."
    again.close()


def test_check_preference_data_before_training(qtbot, tmp_path, store, tiny_model_dir, demo_data):
    """Directions > Check preference data: the dialog makes the job, the worker measures the data at the base model,
    and the verdict comes back in a box and on the status line."""
    from studio.jobs import JobDialog

    w = make_window(qtbot, tmp_path, store, tiny_model_dir)
    assert any(a.text().startswith("&Check preference data") for a in w.job_actions)
    dialog = JobDialog("signal", tmp_path, str(demo_data / "ultrafeedback_helpfulness_400.jsonl"))
    qtbot.addWidget(dialog)
    dialog.limit.setValue(10)
    dialog.max_tokens.setValue(16)
    dialog.heldout.setValue(3)
    job = dialog.job()
    assert (job.kind, job.data.objective, job.data.limit, job.heldout, job.max_tokens) == ("signal", "helpfulness", 10, 3, 16)
    w.start_job(job)
    qtbot.waitUntil(lambda: w.signal_box is not None and not w.busy_with, timeout=60000)
    assert w.signal_box.figures.text().startswith("helpfulness: 6 training pairs, 3 held out")
    verdict = w.signal_box.verdict.text()
    assert verdict.startswith("verdict: ")
    assert w.job_panel.eta.text().startswith("helpfulness: " + verdict.split(": ")[1])
    w.signal_box.close()
    w.close()
