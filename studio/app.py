"""Entry point of `tsdpo-studio`."""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import sys
from typing import Optional, Sequence

from engine.paths import log_path
from studio import system_libs


def setup_logging() -> None:
    handler = logging.handlers.RotatingFileHandler(log_path(), maxBytes=2_000_000, backupCount=2, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(logging.INFO)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="tsdpo-studio", description="The preference-mixing studio.")
    parser.add_argument("model", nargs="?", default=None,
                        help="a Hugging Face folder, hub id or .gguf file (default: reopen the last session, "
                             "else the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--device", default=None, help="auto, cpu, cuda, mps (default: the last one used, else auto)")
    args = parser.parse_args(argv)
    setup_logging()
    problem = system_libs.check()  # before Qt: its own message for a missing library is buried, then it aborts
    if problem:
        print(problem, file=sys.stderr)
        return 2

    from PySide6.QtWidgets import QApplication

    from studio.main_window import MainWindow

    import pyqtgraph as pg

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName("tsdpo-studio")
    app.setApplicationName("tsdpo-studio")
    app.setStyle("Fusion")
    pg.setConfigOptions(antialias=True)
    # Python's cycle collector runs in whichever thread allocates when a threshold is crossed: in the model's worker
    # thread it would destroy Qt objects the window made, which crashes Qt. pyqtgraph's collector turns the automatic
    # one off and collects on a timer in this (the GUI) thread instead.
    from pyqtgraph.util.garbage_collector import GarbageCollector

    app.cycle_collector = GarbageCollector(interval=1.0)  # kept for the life of the app
    window = MainWindow()
    if args.device:
        window.settings.setValue("device", args.device)

    def excepthook(kind, value, tb):  # an error on the GUI thread becomes a dialog, not a crash
        logging.getLogger("studio").error("unhandled error", exc_info=(kind, value, tb))
        window.show_error("Unexpected error", f"{kind.__name__}: {value}\n\nThe details are in {log_path()}.")

    sys.excepthook = excepthook
    window.show()
    window.start(args.model)
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
