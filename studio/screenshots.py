"""Render the main states of the window to PNG files (`make screenshots`), on the embedded model.

    python -m studio.screenshots docs/

Uses a throw-away database and settings, so it never touches the user's sessions.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:] or ["docs"])[0])
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    tmp = Path(tempfile.mkdtemp(prefix="tsdpo-shots-"))
    os.environ["TSDPO_DATA_DIR"] = str(tmp / "data")

    import pyqtgraph as pg
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from engine.store import Store
    from studio.main_window import DEMO_DATA, MainWindow, demo_direction_files
    from studio.messages import BuildJob, Data

    app = QApplication.instance() or QApplication([])
    app.setStyle("Fusion")
    pg.setConfigOptions(antialias=True)

    def wait(cond, seconds=300.0):
        t0 = time.time()
        while not cond():
            if time.time() - t0 > seconds:
                raise TimeoutError("the studio did not reach the state to screenshot")
            app.processEvents()
            time.sleep(0.02)

    def settle(seconds=0.5):
        t0 = time.time()
        while time.time() - t0 < seconds:
            app.processEvents()
            time.sleep(0.02)

    def shot(window, name):
        settle()
        path = out / name
        window.grab().save(str(path))
        print(f"wrote {path}")

    t_launch = time.time()
    w = MainWindow(QSettings(str(tmp / "studio.ini"), QSettings.IniFormat), store=Store(tmp / "studio.sqlite3"))
    w.resize(1400, 900)
    w.show()
    w.load_model(None)
    wait(lambda: w.model_info is not None and len(w.directions) >= len(demo_direction_files()) and not w.busy_with)
    print(f"launch to usable plane: {time.time() - t_launch:.1f} s")
    w.plane_view.set_point(0.7, 0.8)
    w.plane_view.add_pin("helpful, shorter", 0.7, -0.6)
    shot(w, "screenshot-plane.png")

    if "linearization gap · share of the change" in w.plane_view.layers:  # the gap map shipped for the demo directions
        w.plane_view.heat_combo.setCurrentText("linearization gap · share of the change")
        shot(w, "screenshot-heatmap.png")
        w.plane_view.heat_combo.setCurrentIndex(0)

    w.prompt.setPlainText("How do I make a good cup of tea?")
    w.max_tokens.setValue(160)
    w.compare.choose(["Base model", "Mix at the point", "Pinned: helpful, shorter"])
    w.generate_button.click()
    wait(lambda: w.last_result is not None, seconds=900)
    w.compare.columns[1].scores["helpfulness"].setValue(4)
    w.compare.note.setText("more complete")
    w.compare.rate_buttons[1].click()
    w.compare.diff.setChecked(True)
    shot(w, "screenshot-compare.png")
    w.compare.diff.setChecked(False)

    # A prompt set through the same three columns, blind, then a few rows rated.
    w.compare.blind.setChecked(True)
    w.max_tokens.setValue(64)
    w.prompt_set.limit.setValue(6)
    w.tabs.setCurrentWidget(w.prompt_set)
    w.prompt_set.run_button.click()
    wait(lambda: w.prompt_set.table.rowCount() == 6 and not w.busy_with, seconds=900)
    for r, slot in ((0, 1), (1, 0), (2, 1), (3, 2)):
        w.prompt_set.table.cellDoubleClicked.emit(r, 1)
        w.compare.rate("winner", slot)
        settle(0.2)
    w.tabs.setCurrentWidget(w.prompt_set)
    shot(w, "screenshot-grid.png")
    w.tabs.setCurrentWidget(w.ratings_view)
    shot(w, "screenshot-ratings.png")
    w.compare.blind.setChecked(False)

    w.tabs.setCurrentIndex(0)
    w.start_job(BuildJob("train", "helpfulness (screenshot)", str(tmp / "shot.safetensors"),
                         Data(str(DEMO_DATA / "ultrafeedback_helpfulness_400.jsonl"), objective="helpfulness", limit=200),
                         steps=200, max_tokens=96))
    wait(lambda: len(w.job_panel.steps) >= 6)
    shot(w, "screenshot-training.png")
    w.resize(1280, 720)
    shot(w, "screenshot-1280x720.png")
    w.host.stop()
    wait(lambda: not w.busy_with)
    w.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
