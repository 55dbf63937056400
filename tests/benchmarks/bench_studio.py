"""Launch to usable plane: a fresh process opens the window on the embedded model with the demo directions
bound (offscreen), timed from the process's start. Baseline: a fresh process that loads the same model
(from the cache) without the studio."""

from __future__ import annotations

import time

T0 = time.perf_counter()

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


def child_studio() -> float:
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    from engine.store import Store
    from studio.main_window import MainWindow, demo_direction_files

    app = QApplication.instance() or QApplication([])
    tmp = Path(tempfile.mkdtemp(prefix="tsdpo-bench-studio-"))
    os.environ["TSDPO_DATA_DIR"] = str(tmp / "data")
    w = MainWindow(QSettings(str(tmp / "s.ini"), QSettings.IniFormat), store=Store(tmp / "s.db"))
    w.show()
    w.start()
    while not (w.model_info is not None and len(w.directions) >= len(demo_direction_files()) and not w.busy_with
               and w.plane_view.plane.x.direction and w.plane_view.plane.y.direction):
        app.processEvents()
        time.sleep(0.005)
        if time.perf_counter() - T0 > 300:
            raise TimeoutError("the studio did not become usable in 5 minutes")
    elapsed = time.perf_counter() - T0
    w.close()  # stops the worker thread before the process ends
    app.processEvents()
    return elapsed


def child_load() -> float:
    from engine.models import load_model

    load_model()
    return time.perf_counter() - T0


def main() -> dict:
    from common import machine, median

    results = {"machine": machine()}
    print(f"machine: {results['machine']}")
    runs = {}
    for what in ("load", "load", "studio", "load", "studio", "studio", "load"):  # the first load may convert the GGUF
        out = subprocess.run([sys.executable, __file__, "--child", what], capture_output=True, text=True, check=True)
        runs.setdefault(what, []).append(float(out.stdout.strip().splitlines()[-1]))
    loads, launches = runs["load"][1:], runs["studio"]
    results["model_load_process_s"] = round(median(loads), 2)
    results["launch_to_usable_plane_s"] = round(median(launches), 2)
    results["launch_vs_model_load"] = round(median(launches) / median(loads), 2)
    print(f"fresh process, imports + model load from the cache: median {median(loads):.2f} s of {len(loads)}")
    print(f"fresh process to usable plane (window, model, the demo directions bound): median {median(launches):.2f} s "
          f"of {len(launches)} -> {median(launches) / median(loads):.2f}x the bare model load")
    return results


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(f"{(child_studio if sys.argv[2] == 'studio' else child_load)():.4f}")
    else:
        from common import record

        record("studio", main())
