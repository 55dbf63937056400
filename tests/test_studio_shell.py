"""The studio shell, offscreen: the worker owns the model, the window stays responsive, errors become dialogs."""

import time

import pytest
from PySide6.QtCore import QSettings, QTimer

from studio.main_window import MainWindow


@pytest.fixture
def window(qtbot, tmp_path):
    w = MainWindow(QSettings(str(tmp_path / "studio.ini"), QSettings.IniFormat))
    qtbot.addWidget(w)
    w.show()
    yield w
    w.host.shutdown()


def _load(qtbot, window, source):
    window.load_model(str(source))
    qtbot.waitUntil(lambda: window.model_info is not None and not window.busy_with, timeout=30000)


def test_loads_on_worker_thread_and_streams_a_reply(qtbot, window, tiny_model_dir):
    _load(qtbot, window, tiny_model_dir)
    assert window.host.worker.lm is not None
    assert window.host.worker.thread() is window.host.thread  # the model lives on the worker thread
    assert "3 layers" in window.model_label.text() and "cpu" in window.model_label.text()
    assert window.memory_label.text().startswith("memory ")
    window.prompt.setPlainText("Tell me about the sea.")
    window.max_tokens.setValue(20)
    pieces = []
    window.host.worker.text.connect(pieces.append)
    window.generate_button.click()
    qtbot.waitUntil(lambda: window.last_result is not None, timeout=30000)
    assert window.output.toPlainText() == window.last_result["text"] == "".join(pieces)
    assert f"{window.last_result['n_tokens']} tokens" in window.output_stats.text()


def test_window_paints_while_the_worker_generates(qtbot, window, tiny_model_dir):
    _load(qtbot, window, tiny_model_dir)
    ticks = []
    timer = QTimer(interval=10, timeout=lambda: ticks.append(time.perf_counter()))
    window.prompt.setPlainText("Tell me a very long story.")
    window.max_tokens.setValue(400)
    window.generate_button.click()
    timer.start()
    qtbot.waitUntil(lambda: window.last_result is not None, timeout=60000)
    timer.stop()
    assert window.last_result["seconds"] > 0.2
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert len(ticks) > 10 and max(gaps) < 0.5, f"the GUI thread was blocked for {max(gaps):.2f} s"


def test_stop_button_stops_generation(qtbot, window, tiny_model_dir):
    _load(qtbot, window, tiny_model_dir)
    window.prompt.setPlainText("Tell me a very long story.")
    window.max_tokens.setValue(4000)
    window.host.worker.text.connect(lambda _: window.stop_button.click())
    window.generate_button.click()
    qtbot.waitUntil(lambda: window.last_result is not None, timeout=30000)
    assert window.last_result["stopped"] and window.last_result["n_tokens"] < 10
    assert "(stopped)" in window.output_stats.text()
    assert window.generate_button.isEnabled() and not window.stop_button.isEnabled()


def test_load_error_shows_a_dialog_and_the_app_keeps_working(qtbot, window, tiny_model_dir, tmp_path):
    _load(qtbot, window, tiny_model_dir)
    window.load_model(str(tmp_path / "no-such-model"))
    qtbot.waitUntil(lambda: bool(window.error_dialogs), timeout=30000)
    box = window.error_dialogs[-1]
    assert box.windowTitle() == "Could not load the model" and "does not exist" in box.text()
    qtbot.waitUntil(lambda: not window.busy_with)
    assert window.host.worker.lm is not None  # the model that was loaded is still in use
    window.prompt.setPlainText("Still there?")
    window.max_tokens.setValue(5)
    window.generate_button.click()
    qtbot.waitUntil(lambda: window.last_result is not None, timeout=30000)


def test_closing_during_generation_stops_the_worker(qtbot, tmp_path, tiny_model_dir):
    w = MainWindow(QSettings(str(tmp_path / "studio.ini"), QSettings.IniFormat))
    w.show()
    _load(qtbot, w, tiny_model_dir)
    w.prompt.setPlainText("Tell me a very long story.")
    w.max_tokens.setValue(4000)
    w.generate_button.click()
    qtbot.waitUntil(lambda: w.busy_with == "Generating", timeout=10000)
    t0 = time.perf_counter()
    w.close()
    assert not w.host.thread.isRunning()
    assert time.perf_counter() - t0 < 5


def test_sampling_settings_persist(qtbot, tmp_path):
    settings = QSettings(str(tmp_path / "studio.ini"), QSettings.IniFormat)
    w = MainWindow(settings)
    w.max_tokens.setValue(77)
    w.temperature.setValue(0.7)
    w.close()
    w2 = MainWindow(QSettings(str(tmp_path / "studio.ini"), QSettings.IniFormat))
    assert w2.max_tokens.value() == 77 and w2.temperature.value() == pytest.approx(0.7)
    w2.close()
