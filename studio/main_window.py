"""The main window. It paints and forwards requests to the worker; it never touches the model itself."""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import psutil
from PySide6.QtCore import QSettings, Qt, QTimer, QUrl
from PySide6.QtGui import QAction, QActionGroup, QDesktopServices, QKeySequence
from PySide6.QtWidgets import (QApplication, QCheckBox, QDockWidget, QDoubleSpinBox, QFileDialog,
                               QGroupBox, QHBoxLayout, QInputDialog, QLabel, QListWidget, QMainWindow, QMessageBox,
                               QPlainTextEdit, QProgressBar, QPushButton, QSpinBox, QSplitter, QTreeWidget,
                               QTreeWidgetItem, QVBoxLayout, QWidget)

from engine.errors import TsdpoError
from engine.paths import data_dir, format_bytes, log_path
from engine.plane import PreferencePlane
from studio.compare_panel import ComparePanel, column_request
from studio.jobs import ExportDialog, JobDialog, JobPanel
from studio.plane_widget import PreferencePlaneWidget
from studio.theme import apply_palette
from studio.worker import WorkerHost

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_DIRECTIONS = ASSETS / "directions"
DEMO_DATA = ASSETS / "data"
BASE_ATTRIBUTES = ["helpfulness", "verbosity"]


class MainWindow(QMainWindow):
    def __init__(self, settings: Optional[QSettings] = None, store=None, demo_directions: bool = True):
        super().__init__()
        self.settings = settings or QSettings()
        self.setWindowTitle("tsdpo-studio")
        self.resize(1400, 860)
        self.error_dialogs: list[QMessageBox] = []
        self.store = store if store is not None else self._open_store()
        self.host = WorkerHost(self.store, self)
        self.demo_directions = demo_directions
        self.model_info: Optional[dict] = None
        self.busy_with = ""
        self.session_id: Optional[int] = None
        self.directions: dict[str, dict] = {}  # what the worker's mixer holds, as it last said (directionsChanged)
        self.overlaps: dict[str, str] = {}  # direction name -> the interference warning shown beside it
        self.unrestored: list[dict] = []  # the open session's directions that did not load (kept in the session)
        self.last_result: Optional[dict] = None
        self._restore: Optional[dict] = None
        self.sweep_result: Optional[dict] = None  # a loaded sweep.json, drawn as heatmap layers
        self.prediction: Optional[dict] = None  # margin gradients from the last prediction job
        self._build_ui()
        self._build_menus()
        w = self.host.worker
        w.busy.connect(self._on_busy)
        w.progress.connect(self.progress_label.setText)
        w.modelLoaded.connect(self._on_model_loaded)
        w.directionsChanged.connect(self._on_directions_changed)
        w.directionAdded.connect(self._on_direction_added)
        w.mixApplied.connect(self._on_mix_applied)
        w.text.connect(self.compare.append)
        w.compared.connect(self._on_compared)
        w.jobProgress.connect(self.job_panel.update_progress)
        w.jobFinished.connect(self._on_job_finished)
        w.failed.connect(self._on_failed)
        self._memory_timer = QTimer(self, interval=2000, timeout=self._refresh_status)
        self._memory_timer.start()
        self._restore_settings()
        self._refresh_status()
        self._update_actions()

    def _open_store(self):
        from engine.store import Store

        try:
            return Store()
        except TsdpoError as exc:
            message = str(exc)  # ``exc`` itself is gone once the except block ends, before the timer fires
            QTimer.singleShot(0, lambda: self.show_error(
                "The session database cannot be used", f"{message}\n\nThe studio works, but sessions and ratings are not saved."))
            return None

    # ------------------------------------------------------------------ layout
    def _build_ui(self) -> None:
        self.plane = PreferencePlaneWidget()
        self.plane.weightsChanged.connect(self.host.apply_weights)
        self.plane.released.connect(self._on_released)
        self.plane.pinsChanged.connect(self._on_pins_changed)
        self.plane.layoutChanged.connect(self._save_session)
        self.plane.layoutChanged.connect(self.refresh_heatmaps)
        plane_box = QGroupBox("Preference plane")
        self.direction_list = QListWidget()
        self.direction_list.setObjectName("directions")
        self.direction_list.setMaximumHeight(70)
        pl = QVBoxLayout(plane_box)
        pl.addWidget(self.plane, 1)
        pl.addWidget(QLabel("Loaded directions (Directions menu to add or build more):"))
        pl.addWidget(self.direction_list)

        self.prompt = QPlainTextEdit(placeholderText="Ask something, then Generate (Ctrl+Enter). Drag the point to change the mix.")
        self.prompt.setObjectName("prompt")
        self.prompt.setMaximumHeight(90)
        self.max_tokens = QSpinBox(minimum=1, maximum=4096, value=128)
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=2.0, singleStep=0.1, value=0.0, decimals=2)
        self.temperature.setSpecialValueText("greedy")
        self.top_p = QDoubleSpinBox(minimum=0.05, maximum=1.0, singleStep=0.05, value=1.0, decimals=2)
        self.repetition = QDoubleSpinBox(minimum=0.5, maximum=2.0, singleStep=0.05, value=1.0, decimals=2)
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.generate_button = QPushButton("Generate")
        self.generate_button.setShortcut(QKeySequence("Ctrl+Return"))
        self.stop_button = QPushButton("Stop")
        self.stop_button.setShortcut(QKeySequence("Escape"))
        self.regen = QCheckBox("Regenerate when the point is released")
        self.generate_button.clicked.connect(self.start_generation)
        self.stop_button.clicked.connect(self.host.stop)
        params = QHBoxLayout()
        for label, w in (("max tokens", self.max_tokens), ("temperature", self.temperature), ("top-p", self.top_p),
                         ("repetition", self.repetition), ("seed", self.seed)):
            params.addWidget(QLabel(label))
            params.addWidget(w)
        params.addStretch(1)
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.stop_button)
        buttons.addWidget(self.regen)
        buttons.addStretch(1)
        self.compare = ComparePanel()
        self.compare.rated.connect(self._on_rated)
        self.compare.undoRequested.connect(self._undo_rating)
        self._undo: Optional[dict] = None  # the rating that the Undo button takes back
        self.compare.n_columns.valueChanged.connect(self._save_session)
        right = QWidget()
        rl = QVBoxLayout(right)
        rl.addWidget(self.prompt)
        rl.addLayout(params)
        rl.addLayout(buttons)
        rl.addWidget(self.compare, 1)

        split = QSplitter(Qt.Horizontal)
        split.addWidget(plane_box)
        split.addWidget(right)
        split.setStretchFactor(0, 2)
        split.setStretchFactor(1, 5)
        split.setSizes([420, 980])
        self.splitter = split
        self.setCentralWidget(split)

        self.history = QTreeWidget()
        self.history.setHeaderLabels(["History", "tokens"])
        self.history.setColumnWidth(0, 520)
        self.history.itemDoubleClicked.connect(self._show_history_item)
        self.job_panel = JobPanel()
        self.job_panel.cancelRequested.connect(self.host.stop)
        for title, widget, name in (("History", self.history, "history_dock"), ("Job", self.job_panel, "job_dock")):
            dock = QDockWidget(title, self)
            dock.setObjectName(name)
            dock.setWidget(widget)
            self.addDockWidget(Qt.BottomDockWidgetArea, dock)
            setattr(self, name, dock)
        self.tabifyDockWidget(self.history_dock, self.job_dock)
        self.history_dock.raise_()
        self.resizeDocks([self.history_dock], [150], Qt.Vertical)

        self.model_label = QLabel("No model")
        self.session_label = QLabel("")
        self.mix_label = QLabel("")
        self.memory_label = QLabel("")
        self.progress_label = QLabel("")
        self.progress_bar = QProgressBar(maximumWidth=140, textVisible=False)
        self.progress_bar.setRange(0, 0)
        self.progress_bar.hide()
        sb = self.statusBar()
        sb.addWidget(self.model_label)
        sb.addWidget(self.progress_bar)
        sb.addWidget(self.progress_label, 1)
        sb.addPermanentWidget(self.mix_label)
        sb.addPermanentWidget(self.session_label)
        sb.addPermanentWidget(self.memory_label)

    def _build_menus(self) -> None:
        bar = self.menuBar()
        session = bar.addMenu("&Session")
        session.addAction(QAction("&New session", self, shortcut=QKeySequence.New, triggered=self.new_session))
        session.addAction(QAction("&Open session...", self, shortcut=QKeySequence.Open, triggered=self.open_session_dialog))
        self.recent_menu = session.addMenu("&Recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent)
        session.addAction(QAction("&Export ratings as TRL JSONL...", self, triggered=self.export_ratings))
        session.addSeparator()
        session.addAction(QAction("Show &log file", self, triggered=lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(str(log_path())))))
        session.addAction(QAction("&Quit", self, shortcut=QKeySequence.Quit, triggered=self.close))

        model = bar.addMenu("&Model")
        self.model_actions = [
            QAction("Open model &folder...", self, triggered=self.open_model_folder),
            QAction("Open &GGUF file...", self, triggered=self.open_gguf),
            QAction("Open &hub model id...", self, triggered=self.open_hub_id),
            QAction("Load the &embedded model", self, triggered=lambda: self.load_model(None)),
        ]
        for a in self.model_actions:
            model.addAction(a)
        device_menu = model.addMenu("&Device (next load)")
        group = QActionGroup(self)
        for dev in ("auto", "cpu", "cuda", "mps"):
            a = QAction(dev, self, checkable=True)
            a.setChecked(self.settings.value("device", "auto") == dev)
            a.triggered.connect(lambda _=False, d=dev: self.settings.setValue("device", d))
            group.addAction(a)
            device_menu.addAction(a)

        directions = bar.addMenu("&Directions")
        self.job_actions = [
            QAction("&Add a direction file...", self, triggered=self.add_direction_file),
            QAction("&Extract a steering vector...", self, triggered=lambda: self.open_job("extract")),
            QAction("&Train a TS-DPO direction...", self, triggered=lambda: self.open_job("train")),
            QAction("Train a &scalarized-DPO baseline...", self, triggered=lambda: self.open_job("scalarized")),
        ]
        for a in self.job_actions:
            directions.addAction(a)
        predict = QAction("&Predict margin maps (TS-DPO directions)", self, triggered=self.start_prediction)
        directions.addAction(predict)
        self.job_actions.append(predict)
        directions.addSeparator()
        export = QAction("E&xport the mix at the point...", self, shortcut=QKeySequence("Ctrl+E"), triggered=self.open_export)
        directions.addAction(export)
        self.job_actions.append(export)

        view = bar.addMenu("&View")
        self.dark_action = QAction("&Dark palette", self, checkable=True)
        self.dark_action.setChecked(self.settings.value("dark", "false") in (True, "true"))
        self.dark_action.toggled.connect(self._set_dark)
        view.addAction(self.dark_action)
        view.addAction(QAction("&Load sweep results (sweep.json)...", self, triggered=self.load_sweep_dialog))
        for dock in (self.history_dock, self.job_dock):
            view.addAction(dock.toggleViewAction())

    # ------------------------------------------------------------------ start-up
    def start(self, model: Optional[str] = None) -> None:
        """Open ``model`` in a new session; with none, reopen the last session, else the embedded model."""
        last = self.settings.value("last_session")
        if model is None and last is not None and self.store is not None:
            try:
                self.store.session(int(last))
            except (TsdpoError, ValueError):
                pass
            else:
                self.open_session(int(last))
                return
        self.load_model(model)

    # ------------------------------------------------------------------ model
    def load_model(self, source) -> None:
        self.model_label.setText(f"Loading {source or 'the embedded model'}...")
        self.host.load(source, device=self.settings.value("device", "auto"))

    def open_model_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a Hugging Face model folder")
        if folder:
            self.load_model(folder)

    def open_gguf(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a GGUF model", "", "GGUF models (*.gguf)")
        if path:
            self.load_model(path)

    def open_hub_id(self) -> None:
        model_id, ok = QInputDialog.getText(self, "Open a hub model", "Model id (needs a network), e.g. HuggingFaceTB/SmolLM2-360M-Instruct:")
        if ok and model_id.strip():
            self.load_model(model_id.strip())

    def _on_model_loaded(self, info: dict) -> None:
        changed = self.model_info is None or self.model_info["fingerprint"] != info["fingerprint"]
        self.model_info = info
        self.settings.setValue("last_model", "" if info["source"]["kind"] == "embedded" else info["source"]["ref"])
        if changed:
            self.plane.set_directions([])
            self.unrestored = []
        elif info.get("kept_directions"):
            # The same model again: the worker carried the directions over; put the point's mix back on it.
            self.host.apply_weights(self.plane.weights())
        restore = self._restore
        if restore is not None:
            self._restore_directions(restore)
        elif self.session_id is None or changed:
            self._create_session()
            if self.demo_directions and info["source"]["kind"] == "embedded":
                for path in sorted(DEMO_DIRECTIONS.glob("*.safetensors")):
                    self.host.add_direction(str(path))
        self._refresh_status()
        self._update_actions()

    # ------------------------------------------------------------------ directions
    def add_direction_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Add a direction", str(data_dir()), "Directions (*.safetensors)")
        if path:
            self.host.add_direction(path)

    def _on_directions_changed(self, infos: list) -> None:
        """The worker's list of what is loaded: the one source of truth for the plane and the columns."""
        self.directions = {i["name"]: i for i in infos}
        self.overlaps = {k: v for k, v in self.overlaps.items() if k in self.directions}
        self._list_directions()
        self._directions_changed()

    def _list_directions(self) -> None:
        self.direction_list.clear()
        for name, info in self.directions.items():
            line = f"{name}  ·  {info['kind']}  ·  {info['detail']}"
            if name in self.overlaps:
                line += "  ⚠ overlaps " + self.overlaps[name]
            self.direction_list.addItem(line)

    def _on_direction_added(self, info: dict) -> None:
        overlaps = [f"{b if a == info['name'] else a} (cosine {cos:+.2f})" for a, b, cos in info.get("interference", [])]
        if overlaps:
            # A warning, not an error: mixing still works, it just mostly adds up one effect.
            self.overlaps[info["name"]] = ", ".join(overlaps)
            self.progress_label.setText(f"{info['name']} points nearly the same way as " + ", ".join(overlaps))
            self._list_directions()
        if self._restore is not None:
            self._restore["waiting"] -= 1
            self._maybe_finish_restore()
        else:
            self._save_session()

    def _directions_changed(self) -> None:
        names = list(self.directions)
        mixable = [n for n in names if self.directions[n]["kind"] != "scalarized"]
        self.plane.set_directions(mixable)
        self.compare.set_sources(list(self.plane.pins), [n for n in names if self.directions[n]["kind"] == "scalarized"],
                                 any(d["kind"] == "steering" for d in self.directions.values()))
        attrs = list(dict.fromkeys([*BASE_ATTRIBUTES, *(d["objective"] for d in self.directions.values())]))
        self.compare.set_attributes(attrs)

    def _on_mix_applied(self, weights: dict, seconds: float) -> None:
        active = [f"{k} {v:+.2f}" for k, v in weights.items() if v]
        if seconds < 0:  # refused (the mix before stays) or failed midway (the engine put back the base)
            self.mix_label.setText("mix not applied: " + (f"still {', '.join(active)}" if active else "the model is at its base weights"))
            return
        self.mix_label.setText(f"mix applied in {seconds * 1e3:.1f} ms" if active else f"base model (applied in {seconds * 1e3:.1f} ms)")

    def _on_released(self, weights: dict) -> None:
        self._save_session()
        if self.regen.isChecked() and self.prompt.toPlainText().strip() and not self.busy_with:
            self.start_generation()

    def _on_pins_changed(self) -> None:
        if self.store is not None and self.session_id is not None:
            try:
                for name, (x, y) in self.plane.pins.items():
                    self.store.pin_point(self.session_id, name, x, y)
            except TsdpoError as exc:
                self.show_error("The pinned point was not saved", str(exc))
        self._directions_changed()

    # ------------------------------------------------------------------ generation and rating
    def sampling_params(self) -> dict:
        return {"max_new_tokens": self.max_tokens.value(), "temperature": self.temperature.value(),
                "top_p": self.top_p.value(), "repetition_penalty": self.repetition.value(), "seed": self.seed.value()}

    def start_generation(self) -> None:
        prompt = self.prompt.toPlainText().strip()
        if not prompt:
            self.show_error("Nothing to generate", "Type a prompt first.")
            return
        if self.model_info is None or self.busy_with:
            return
        kinds = {n: d["kind"] for n, d in self.directions.items()}
        sources = self.compare.chosen_sources()
        columns = [column_request(src, self.plane.point, self.plane.weights(), self.plane.pins, self.plane.plane.weights, kinds)
                   for src in sources]
        self.compare.start([c["label"] for c in columns], sources)
        self.last_result = None
        self.host.compare({"prompt": prompt, "columns": columns, "params": self.sampling_params(),
                           "blind": not self.compare.revealed,
                           "session_id": self.session_id if self.store is not None else None})

    def _on_compared(self, result: dict) -> None:
        self.last_result = result
        self.compare.finish(result)
        self._add_history(result["prompt"], result["comparison_id"], result["columns"], [], bool(result.get("blind")))

    @staticmethod
    def _verdict(rating, columns: list[dict], letter) -> str:
        if rating.outcome != "winner":
            return {"tie": "tie", "both_bad": "both bad"}[rating.outcome]
        i = next(k for k, c in enumerate(columns) if c["generation_id"] == rating.winner_id)
        return f"{letter(i)} ({columns[i]['label']}) is better"

    def _on_rated(self, r: dict) -> None:
        result = self.compare.last
        if self.store is None or result is None:
            return
        gen_ids = [c["generation_id"] for c in result["columns"]]
        winner = None if r["winner_column"] is None else gen_ids[r["winner_column"]]
        scores = {gen_ids[col]: vals for col, vals in r["scores"].items()}
        try:
            earlier = self.store.ratings(result["comparison_id"])
            row = self.store.add_rating(result["comparison_id"], r["outcome"], winner_id=winner, scores=scores,
                                        note=r["note"], blind=r["blind"])
        except TsdpoError as exc:
            self.show_error("The rating was not saved", f"{exc}\n\nRate again once the problem is solved.")
            return
        what = self._verdict(row, result["columns"], self.compare.letter_of)
        if earlier:
            before = self._verdict(earlier[-1], result["columns"], self.compare.letter_of)
            self._undo = {"rating_id": row.id, "columns": result["columns"]}
            self.compare.rating_saved(f"Rating changed: {what} (it was: {before}"
                                      + (f"; note kept: {row.note}" if row.note and not r["note"] else "") + ")", undoable=True)
        else:
            self._undo = None
            self.compare.rating_saved(f"Rating saved: {what}")
        self._reload_history()

    def _undo_rating(self) -> None:
        if self._undo is None or self.store is None:
            return
        try:
            now = self.store.undo_rating(self._undo["rating_id"])
        except TsdpoError as exc:
            self.show_error("The change was not undone", str(exc))
            return
        what = self._verdict(now, self._undo["columns"], self.compare.letter_of) if now is not None else "no rating"
        self._undo = None
        self.compare.rating_saved(f"Change undone: the earlier rating counts again ({what})")
        self._reload_history()

    # ------------------------------------------------------------------ jobs
    def open_job(self, kind: str) -> None:
        if self.model_info is None:
            self.show_error("No model", "Load a model before starting a job.")
            return
        out_dir = data_dir() / "directions"
        out_dir.mkdir(parents=True, exist_ok=True)
        dialog = JobDialog(kind, out_dir, str(DEMO_DATA / "ultrafeedback_helpfulness_400.jsonl"), self)
        if dialog.exec():
            self.start_job(dialog.job())

    # ------------------------------------------------------------------ heatmaps
    def start_prediction(self) -> None:
        if self.model_info is None:
            self.show_error("No model", "Load a model first.")
            return
        self.start_job({"kind": "predict", "name": "margin maps", "pairs": 16})

    def load_sweep_dialog(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Sweep results", str(data_dir()), "Sweep results (sweep.json)")
        if path:
            self.load_sweep(path)

    def load_sweep(self, path: str) -> None:
        import json

        try:
            result = json.loads(Path(path).read_text())
            if not {"methods", "objectives", "coords"} <= set(result):
                raise ValueError("it has no methods, objectives or coords")
        except (OSError, ValueError) as exc:
            self.show_error("Not a sweep result", f"{path} could not be read as the sweep.json `tsdpo sweep` writes ({exc}).")
            return
        self.sweep_result = result
        self.refresh_heatmaps()
        if not any(k.startswith("measured") for k in self.plane.layers):
            self.progress_label.setText(f"Bind the sweep's objectives ({', '.join(result['objectives'])}) to the plane's "
                                        "axes to see its measurements.")

    def _plane_axes(self) -> dict:
        p = self.plane.plane
        if p.anchors:
            return {}
        return {k: (self.directions.get(a.direction, {}).get("objective"), a.scale)
                for k, a in (("x", p.x), ("y", p.y)) if a.direction}

    def refresh_heatmaps(self, *_) -> None:
        from studio.heatmaps import predicted_layers, sweep_layers

        axes = self._plane_axes()
        layers = sweep_layers(self.sweep_result, axes) if self.sweep_result else {}
        if self.prediction:
            xr, yr = self.plane.limits()
            layers.update(predicted_layers(self.prediction, self.plane.plane.weights, xr, yr,
                                           sweep=self.sweep_result, axes=axes))
        self.plane.set_layers(layers)

    def open_export(self) -> None:
        if self.model_info is None:
            self.show_error("No model", "Load a model before exporting.")
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dialog = ExportDialog(self.plane.weights(), {n: d["kind"] for n, d in self.directions.items()},
                              data_dir() / "exports" / f"mix-{stamp}", self)
        if dialog.exec():
            self.start_export(dialog.job())

    def start_export(self, job: dict) -> None:
        """Export the mix at the current point (the dialog's choices in ``job``)."""
        job.update(weights=self.plane.weights(), point=list(self.plane.point), plane=self.plane.plane.to_json())
        self.start_job(job)

    def start_job(self, job: dict) -> None:
        job["session_id"] = self.session_id
        self.job_panel.started(job)
        self.job_dock.raise_()
        self.host.run_job(job)

    def _on_job_finished(self, result: dict) -> None:
        self.job_panel.finished(result)
        if result["kind"] == "predict" and not result.get("cancelled"):
            self.prediction = result["prediction"]
            self.refresh_heatmaps()
            first = next((k for k in self.plane.layers if k.startswith("predicted") and k.endswith("margin")), None)
            if first:
                self.plane.heat_combo.setCurrentText(first)
        if result["kind"] == "export" and not result.get("cancelled"):
            self.progress_label.setText(result["summary"])
            box = QMessageBox(QMessageBox.Information, "Export finished", result["summary"], QMessageBox.Ok, self)
            folder = box.addButton("Open folder", QMessageBox.ActionRole)
            folder.clicked.connect(lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(result["path"])))
            box.setAttribute(Qt.WA_DeleteOnClose)
            box.setObjectName("export_done")
            self.export_dialog = box
            box.open()

    # ------------------------------------------------------------------ sessions
    def _create_session(self) -> None:
        if self.store is None or self.model_info is None:
            return
        try:
            row = self.store.create_session(time.strftime("Session %Y-%m-%d %H:%M"), self.model_info["source"],
                                            self.model_info["fingerprint"], {})
        except TsdpoError as exc:
            self.show_error("The session was not created", str(exc))
            return
        self.session_id = row.id
        self.unrestored = []
        self.settings.setValue("last_session", row.id)
        self.plane.clear_pins()
        self.history.clear()
        self.session_label.setText(row.name)

    def new_session(self) -> None:
        """A fresh history and no pinned points, with the model and directions already loaded."""
        self._create_session()
        self._directions_changed()
        self._save_session()

    def session_settings(self) -> dict:
        loaded = [{"name": n, "path": d["path"]} for n, d in self.directions.items() if d.get("path")]
        # Directions the session had but that did not load this time (a file moved, a disk not mounted) stay in it.
        kept = [d for d in self.unrestored if d["name"] not in self.directions]
        return {"directions": loaded + kept,
                "plane": self.plane.plane.to_json(), "point": list(self.plane.point),
                "columns": self.compare.chosen_sources(), "n_columns": self.compare.n_columns.value()}

    def _save_session(self, *_) -> None:
        if self.store is None or self.session_id is None or self._restore is not None:
            return
        try:
            self.store.update_session(self.session_id, settings=self.session_settings())
        except TsdpoError as exc:
            log.warning("session not saved: %s", exc)
            self.mix_label.setText("session not saved (database busy)")

    def open_session_dialog(self) -> None:
        if self.store is None:
            self.show_error("No database", "Sessions cannot be opened: the database is unavailable.")
            return
        sessions = self.store.sessions(limit=50)
        if not sessions:
            self.show_error("No sessions", "There are no saved sessions yet.")
            return
        labels = [f"{s.id}: {s.name}  ·  {s.model_ref.get('ref', '')[-40:] or 'embedded'}" for s in sessions]
        label, ok = QInputDialog.getItem(self, "Open a session", "Session:", labels, 0, False)
        if ok:
            self.open_session(int(label.split(":", 1)[0]))

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        if self.store is None:
            return
        for s in self.store.sessions(limit=8):
            self.recent_menu.addAction(QAction(f"{s.name} (#{s.id})", self, triggered=lambda _=False, i=s.id: self.open_session(i)))

    def open_session(self, session_id: int) -> None:
        """Restore a session: its model, directions, plane, pinned points and history."""
        try:
            row = self.store.session(session_id)
        except TsdpoError as exc:
            self.show_error("Could not open the session", str(exc))
            return
        self.session_id = row.id
        self.settings.setValue("last_session", row.id)
        self.session_label.setText(row.name)
        self._restore = {"settings": dict(row.settings or {}), "waiting": 0,
                         "pins": {p.name: (p.x, p.y) for p in row.pinned}}
        self.plane.clear_pins()
        for name, (x, y) in self._restore["pins"].items():
            self.plane.add_pin(name, x, y, emit=False)
        self._reload_history()
        same_model = self.model_info is not None and self.model_info["fingerprint"] == row.model_fingerprint
        if same_model:
            self._restore_directions(self._restore)
        else:
            source = row.model_ref
            self.load_model(None if source.get("kind") == "embedded" else source.get("ref"))

    def _restore_directions(self, restore: dict) -> None:
        wanted = restore["settings"].get("directions", [])
        missing = [d for d in wanted if d["name"] not in self.directions]
        restore["waiting"] = len(missing)
        for d in missing:
            path = Path(d["path"])
            if not path.is_file() and (DEMO_DIRECTIONS / path.name).is_file():
                path = DEMO_DIRECTIONS / path.name  # a shipped demo direction, from a checkout that has moved
            self.host.add_direction(str(path), d["name"])
        self._maybe_finish_restore()

    def _maybe_finish_restore(self) -> None:
        r = self._restore
        if r is None or r["waiting"] > 0:
            return
        self._restore = None
        s = r["settings"]
        self.unrestored = [d for d in s.get("directions", []) if d["name"] not in self.directions]
        self._directions_changed()
        if "plane" in s:
            try:
                point = tuple(float(v) for v in s.get("point", (0.0, 0.0)))
                if len(point) != 2 or not all(math.isfinite(v) for v in point):
                    raise TsdpoError(f"The saved point {s.get('point')} is not two finite numbers; the point starts at the origin.")
                self.plane.set_plane(PreferencePlane.from_json(s["plane"]), point)
            except TsdpoError as exc:
                self.show_error("The plane layout was not restored", str(exc))
        if s.get("n_columns"):
            self.compare.n_columns.setValue(int(s["n_columns"]))
        for view, src in zip(self.compare.columns, s.get("columns", [])):
            view.source.setCurrentText(src)
        self.progress_label.setText("Session restored")

    def _reload_history(self) -> None:
        from engine.store import is_truncated

        self.history.clear()
        if self.store is None or self.session_id is None:
            return
        for comp in self.store.history(self.session_id):
            cols = [{"label": g.label, "text": g.output, "n_tokens": g.n_tokens, "weights": g.weights,
                     "point": (g.point_x, g.point_y) if g.point_x is not None else None, "seconds": g.seconds,
                     "tokens_per_s": g.n_tokens / g.seconds if g.seconds else 0.0, "stopped": g.stopped,
                     "truncated": is_truncated(g, (comp.params or {}).get("max_new_tokens")),
                     "generation_id": g.id} for g in comp.generations]
            self._add_history(comp.prompt, comp.id, cols, list(comp.ratings), bool((comp.params or {}).get("blind")))

    def _add_history(self, prompt: str, comparison_id, columns: list[dict], ratings: list, blind: bool = False) -> None:
        """One history entry. A blind comparison not rated yet names no source and shows no reply: both would
        tell which column is which."""
        hidden = blind and not ratings
        top = QTreeWidgetItem([prompt.replace("\n", " ")[:120], ""])
        top.setData(0, Qt.UserRole, {"prompt": prompt, "comparison_id": comparison_id, "columns": columns,
                                     "blind": blind, "rated": bool(ratings)})
        if hidden:
            QTreeWidgetItem(top, [f"blind comparison of {len(columns)} replies: sources are shown once it is rated "
                                  "(double-click to rate it)", ""])
        else:
            for c in columns:
                QTreeWidgetItem(top, [f"{c['label']}: {c['text'].replace(chr(10), ' ')[:160]}", str(c["n_tokens"])])
        labels = {c["generation_id"]: c["label"] for c in columns}
        for i, rating in enumerate(ratings):
            verdict = f"{labels.get(rating.winner_id, '?')} better" if rating.outcome == "winner" else rating.outcome.replace("_", " ")
            replaced = " (replaced by the rating below)" if i < len(ratings) - 1 else ""
            QTreeWidgetItem(top, [f"rating: {verdict}" + (" (blind)" if rating.blind else "")
                                  + (f" · {rating.note}" if rating.note else "") + replaced, ""])
        self.history.insertTopLevelItem(0, top)

    def _show_history_item(self, item: QTreeWidgetItem, _col: int) -> None:
        while item.parent() is not None:
            item = item.parent()
        data = item.data(0, Qt.UserRole)
        if not data:
            return
        self.prompt.setPlainText(data["prompt"])
        self.compare.n_columns.setValue(max(2, len(data["columns"])))
        self.compare.start([c["label"] for c in data["columns"]], blind=data.get("blind") and not data.get("rated"))
        self.compare.finish({"comparison_id": data["comparison_id"], "columns": data["columns"], "prompt": data["prompt"]})

    def export_ratings(self) -> None:
        from engine.store import export_ratings_trl

        if self.store is None or self.session_id is None:
            self.show_error("Nothing to export", "There is no open session.")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export ratings as TRL preference pairs", "ratings.jsonl", "JSON lines (*.jsonl)")
        if path:
            try:
                n = export_ratings_trl(self.store, self.session_id, path)
            except (TsdpoError, OSError) as exc:
                self.show_error("Export failed", str(exc))
                return
            self.progress_label.setText(f"{n} preference pairs written to {path}")

    # ------------------------------------------------------------------ errors, state, settings
    def _on_failed(self, title: str, message: str) -> None:
        if self._restore is not None:
            if title == "Could not add the direction":
                self._restore["waiting"] -= 1
                self._maybe_finish_restore()
            elif title == "Could not load the model":  # the session's model is gone: keep its history, stop restoring
                self._restore = None
                message += "\n\nThe session's history is shown; open its model again to use its directions."
        self.show_error(title, message)

    def show_error(self, title: str, message: str) -> None:
        """Non-modal, so a failing job never blocks the window (or a test)."""
        box = QMessageBox(QMessageBox.Warning, title, message, QMessageBox.Ok, self)
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.finished.connect(lambda *_: self.error_dialogs.remove(box) if box in self.error_dialogs else None)
        self.error_dialogs.append(box)
        box.open()

    def _on_busy(self, what: str) -> None:
        self.busy_with = what
        self.progress_bar.setVisible(bool(what))
        if not what:
            self.progress_label.setText("")
        self._update_actions()

    def _update_actions(self) -> None:
        idle = not self.busy_with
        loaded = self.model_info is not None
        self.generate_button.setEnabled(idle and loaded)
        self.stop_button.setEnabled(self.busy_with == "Generating")
        for a in self.model_actions:
            a.setEnabled(idle)
        for a in self.job_actions:
            a.setEnabled(idle and loaded)

    def _refresh_status(self) -> None:
        info = self.model_info
        if info:
            self.model_label.setText(f"{info['model']} · {info['layers']} layers · {info['device']} ({info['dtype']})")
        text = f"memory {format_bytes(psutil.Process(os.getpid()).memory_info().rss)}"
        if info and info["device"].startswith("cuda"):
            import torch

            text += f" · GPU {format_bytes(torch.cuda.memory_allocated())}"
        self.memory_label.setText(text)

    def _set_dark(self, on: bool) -> None:
        apply_palette(QApplication.instance(), on)
        self.settings.setValue("dark", on)

    def _restore_settings(self) -> None:
        geometry = self.settings.value("geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        state = self.settings.value("window_state")
        if state is not None:
            self.restoreState(state)
        for key, box, cast in (("max_new_tokens", self.max_tokens, int), ("temperature", self.temperature, float),
                               ("top_p", self.top_p, float), ("repetition_penalty", self.repetition, float),
                               ("seed", self.seed, int)):
            value = self.settings.value(f"sampling/{key}")
            if value is not None:
                box.setValue(cast(value))
        self.regen.setChecked(self.settings.value("regenerate_on_release", "false") in (True, "true"))
        if self.dark_action.isChecked():
            apply_palette(QApplication.instance(), True)

    def _save_settings(self) -> None:
        self.settings.setValue("geometry", self.saveGeometry())
        self.settings.setValue("window_state", self.saveState())
        for key, value in self.sampling_params().items():
            self.settings.setValue(f"sampling/{key}", value)
        self.settings.setValue("regenerate_on_release", self.regen.isChecked())
        self.settings.sync()

    def closeEvent(self, event) -> None:
        self._save_settings()
        self._save_session()
        self._memory_timer.stop()
        if not self.host.shutdown():
            log.warning("the worker did not finish within the time limit; exiting anyway")
        super().closeEvent(event)
