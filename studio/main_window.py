"""The main window. It paints and forwards requests to the worker; it never touches the model itself."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import psutil
from PySide6.QtCore import QSettings, Qt, QTimer, QUrl
from PySide6.QtGui import QAction, QActionGroup, QDesktopServices, QKeySequence
from PySide6.QtWidgets import (QApplication, QCheckBox, QDockWidget, QDoubleSpinBox, QFileDialog,
                               QGroupBox, QHBoxLayout, QInputDialog, QLabel, QListWidget, QMainWindow, QMessageBox,
                               QPlainTextEdit, QProgressBar, QPushButton, QScrollArea, QSpinBox, QSplitter, QTabWidget,
                               QFrame,
                               QVBoxLayout, QWidget)

from engine.errors import TsdpoError
from engine.generation import SamplingParams
from engine.paths import data_dir, format_bytes, log_path
from engine.plane import PreferencePlane
from engine.promptsets import with_system
from studio.compare_panel import ComparePanel, column_request
from studio.history import HistoryView, display_prompt
from studio.jobs import ExportDialog, JobDialog, JobPanel, SignalResultDialog
from studio.messages import (ComparisonResult, CompareRequest, DirectionInfo, ExportJob, Failure, GapJob, Job, JobResult, ModelInfo,
                             PromptSetJob,
                             PredictJob)
from studio.plane_widget import PreferencePlaneWidget
from studio.promptset_panel import PromptSetPanel
from studio.ratings_view import RatingsView
from studio.session import SessionController, saved_point
from studio.theme import apply_palette, restyle_plots
from studio.worker import WorkerHost

log = logging.getLogger(__name__)
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_DIRECTIONS = ASSETS / "directions"
# What the first launch on the embedded model binds, in order: the first two go on the axes, all three are in the
# anchor layout. The matching steering vectors are a menu action away (Directions > Add the demo steering vectors).
DEMO_TANGENTS = ("helpfulness", "verbosity", "harmlessness")
WEIGHT_SPACE = ("tangent", "scalarized")


def demo_direction_files() -> list[Path]:
    """The shipped TS-DPO directions, or, in a checkout without them, the shipped steering vectors."""
    tangents = [DEMO_DIRECTIONS / f"{n}.tsdpo.safetensors" for n in DEMO_TANGENTS]
    tangents = [p for p in tangents if p.is_file()]
    return tangents or sorted(DEMO_DIRECTIONS.glob("*.steer.safetensors"))
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
        self.model_info: Optional[ModelInfo] = None
        self.busy_with = ""
        self.session = SessionController(self.store, DEMO_DIRECTIONS)
        self.directions: dict[str, DirectionInfo] = {}  # what the worker's mixer holds, as it last said
        self.overlaps: dict[str, str] = {}  # direction name -> the interference warning shown beside it
        self.last_result: Optional[ComparisonResult] = None
        self._idle_note = ""  # shown in the status bar once the worker is idle again
        self.sweep_result: Optional[dict] = None  # a loaded sweep.json, drawn as heatmap layers
        self.prediction: Optional[dict] = None  # margin gradients from the last prediction job
        self.system_prompt: Optional[str] = None  # the session's, in front of every prompt
        self.job_dialog = None  # the job dialog while it is open
        self.signal_box = None  # the last data check's result, while it is shown
        self._dock_height = 0  # the bottom docks' height before the running job
        self.gap_maps: dict[str, dict] = {}  # linearization gap maps by plane-layout key (shipped and measured)
        self._shas: dict[tuple, str] = {}  # (path, mtime, size) -> the file's sha256, for the gap maps' keys
        self._build_ui()
        self._build_menus()
        restyle_plots(self)
        w = self.host.worker
        w.busy.connect(self._on_busy)
        w.progress.connect(self.progress_label.setText)
        w.modelLoaded.connect(self._on_model_loaded)
        w.directionsChanged.connect(self._on_directions_changed)
        w.directionAdded.connect(self._on_direction_added)
        w.mixApplied.connect(self._on_mix_applied)
        w.text.connect(self.compare.append)
        w.compared.connect(self._on_compared)
        w.promptRow.connect(self.prompt_set.add_row)
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
        self.plane_view = PreferencePlaneWidget()
        self.plane_view.weightsChanged.connect(self.host.apply_weights)
        self.plane_view.released.connect(self._on_released)
        self.plane_view.pinsChanged.connect(self._on_pins_changed)
        self.plane_view.layoutChanged.connect(self._save_session)
        self.plane_view.layoutChanged.connect(self.refresh_heatmaps)
        plane_box = QGroupBox("Preference plane")
        self.direction_list = QListWidget()
        self.direction_list.setObjectName("directions")
        self.direction_list.setMaximumHeight(90)
        self.direction_list.setToolTip("Every loaded direction: its name, how it was made and what it is (Directions menu "
                                       "to add or build more)")
        self.plane_view.controls.addTab(self.direction_list, "Directions")
        pl = QVBoxLayout(plane_box)
        pl.setContentsMargins(4, 4, 4, 4)
        pl.addWidget(self.plane_view, 1)

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
        for w_, tip in ((self.prompt, "The prompt every column answers (the session's system prompt, if any, goes in front)"),
                        (self.max_tokens, "The most tokens each column may generate; a reply that reaches it is marked cut"),
                        (self.temperature, "0 (greedy): the most likely token each time, the same reply every run; higher "
                                           "samples more freely (with the seed)"),
                        (self.top_p, "Sample only from the most likely tokens that add up to this probability"),
                        (self.repetition, "Above 1, tokens already generated become less likely (1: off)"),
                        (self.seed, "The sampling seed: the same seed and settings give the same replies"),
                        (self.generate_button, "Generate every column side by side (Ctrl+Enter)"),
                        (self.stop_button, "Stop what runs now (Escape); replies so far are kept"),
                        (self.regen, "Generate again, with the same prompt, each time you let go of the point")):
            w_.setToolTip(tip)
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
        compare_tab = QWidget()
        rl = QVBoxLayout(compare_tab)
        rl.addWidget(self.prompt)
        rl.addLayout(params)
        rl.addLayout(buttons)
        rl.addWidget(self.compare, 1)
        self.prompt_set = PromptSetPanel()
        self.prompt_set.runRequested.connect(self.run_prompt_set)
        self.prompt_set.stopRequested.connect(self.host.stop)
        self.prompt_set.openRow.connect(self._open_prompt_set_row)
        right = QTabWidget()
        right.setObjectName("tabs")
        right.addTab(compare_tab, "Compare")
        right.addTab(self.prompt_set, "Prompt set")
        self.ratings_view = RatingsView()
        self.ratings_view.refreshRequested.connect(self.refresh_ratings)
        self.ratings_view.exportCsvRequested.connect(self.export_ratings_csv)
        self.ratings_view.savePlotRequested.connect(self.save_ratings_plot)
        self.ratings_view.trainRequested.connect(self.train_from_ratings)
        right.addTab(self.ratings_view, "Ratings")
        right.currentChanged.connect(lambda i: self.refresh_ratings() if right.widget(i) is self.ratings_view else None)
        self.tabs = right

        left = QScrollArea()  # on a small screen the plane's controls scroll; the plane itself keeps growing
        left.setWidget(plane_box)
        left.setWidgetResizable(True)
        left.setFrameShape(QFrame.NoFrame)
        left.setHorizontalScrollBarPolicy(Qt.ScrollBarAlwaysOff)
        # Never narrower than what the plane's controls need: it scrolls up and down, not sideways.
        left.setMinimumWidth(plane_box.minimumSizeHint().width() + left.verticalScrollBar().sizeHint().width() + 4)
        split = QSplitter(Qt.Horizontal)
        split.addWidget(left)
        split.addWidget(right)
        split.setStretchFactor(0, 2)
        split.setStretchFactor(1, 5)
        split.setSizes([420, 980])
        self.splitter = split
        self.setCentralWidget(split)

        self.history = HistoryView()
        self.history.opened.connect(self._show_history_item)
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
        session.addAction(QAction("System &prompt...", self, triggered=self.edit_system_prompt))
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
            QAction("&Check preference data before training...", self, triggered=lambda: self.open_job("signal")),
        ]
        for a in self.job_actions:
            directions.addAction(a)
        predict = QAction("&Predict margin maps (TS-DPO directions)", self, triggered=self.start_prediction)
        directions.addAction(predict)
        self.job_actions.append(predict)
        gap = QAction("Map the &linearization gap (TS-DPO directions on the plane)", self, triggered=self.start_gap_map)
        gap.setToolTip("Where mixing the weights departs from the linearized model the directions were trained on")
        directions.addAction(gap)
        self.job_actions.append(gap)
        self.demo_steering_action = QAction("Add the demo &steering vectors", self, triggered=self.add_demo_steering)
        directions.addAction(self.demo_steering_action)
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

    def _on_model_loaded(self, info: ModelInfo) -> None:
        changed = self.model_info is None or self.model_info.fingerprint != info.fingerprint
        self.model_info = info
        self.settings.setValue("last_model", "" if info.source["kind"] == "embedded" else info.source["ref"])
        if changed:
            self.plane_view.set_directions([])
            self.session.unrestored = []
        elif info.kept_directions:
            # The same model again: the worker carried the directions over; put the point's mix back on it.
            self.host.apply_weights(self.plane_view.weights())
        if self.session.restore is not None:
            self._restore_directions()
        elif self.session.session_id is None or changed:
            self._create_session()
            if self.demo_directions and info.source["kind"] == "embedded":
                for path in demo_direction_files():
                    self.host.add_direction(str(path))
        self._refresh_status()
        self._update_actions()

    # ------------------------------------------------------------------ directions
    def add_demo_steering(self) -> None:
        """The shipped steering vectors beside the tangent directions the first launch binds (embedded model only)."""
        if self.model_info is None or self.model_info.source["kind"] != "embedded":
            self.show_error("Not the embedded model", "The demo steering vectors were made for the embedded model "
                            "(SmolLM2-135M-Instruct); load it with Model > Load the embedded model first.")
            return
        loaded = {Path(i.path).resolve() for i in self.directions.values() if i.path}
        for path in sorted(DEMO_DIRECTIONS.glob("*.steer.safetensors")):
            if path.resolve() not in loaded:
                self.host.add_direction(str(path))

    def add_direction_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Add a direction", str(data_dir()), "Directions (*.safetensors)")
        if path:
            self.host.add_direction(path)

    def _on_directions_changed(self, infos: list) -> None:
        """The worker's list of what is loaded: the one source of truth for the plane and the columns."""
        self.directions = {i.name: i for i in infos}
        self.overlaps = {k: v for k, v in self.overlaps.items() if k in self.directions}
        self._list_directions()
        self._directions_changed()

    def _list_directions(self) -> None:
        self.direction_list.clear()
        for name, info in self.directions.items():
            line = f"{name}  ·  {info.label}  ·  {info.detail}"
            if name in self.overlaps:
                line += "  ⚠ overlaps " + self.overlaps[name]
            self.direction_list.addItem(line)

    def _on_direction_added(self, info: DirectionInfo) -> None:
        overlaps = [f"{b if a == info.name else a} (cosine {cos:+.2f})" for a, b, cos in info.interference]
        if overlaps:
            # A warning, not an error: mixing still works, it just mostly adds up one effect.
            self.overlaps[info.name] = ", ".join(overlaps)
            self.progress_label.setText(f"{info.name} points nearly the same way as " + ", ".join(overlaps))
            self._list_directions()
        if self.session.restore is not None:
            self.session.direction_done()
            self._maybe_finish_restore()
        else:
            self._save_session()

    def _directions_changed(self) -> None:
        names = list(self.directions)
        # A scalarized-DPO run is a baseline to compare with, one point of its own, not an axis of the plane.
        mixable = [n for n in names if self.directions[n].label != "scalarized"]
        self.plane_view.set_directions(mixable, {n: self.directions[n].meaning for n in mixable})
        self.compare.set_sources(list(self.plane_view.pins), [n for n in names if self.directions[n].label == "scalarized"],
                                 any(d.label == "steering" for d in self.directions.values()))
        attrs = list(dict.fromkeys([*BASE_ATTRIBUTES, *(d.objective for d in self.directions.values())]))
        self.compare.set_attributes(attrs)

    def _on_mix_applied(self, weights: dict, seconds: float, since_drag: float) -> None:
        active = [f"{k} {v:+.2f}" for k, v in weights.items() if v]
        if seconds < 0:  # refused (the mix before stays) or failed midway (the engine put back the base)
            self.mix_label.setText("mix not applied: " + (f"still {', '.join(active)}" if active else "the model is at its base weights"))
            return
        took = f"in {seconds * 1e3:.2f} ms, {since_drag * 1e3:.1f} ms after the drag"  # the second adds the thread hop
        self.mix_label.setText(f"mix applied {took}" if active else f"base model (applied {took})")

    def _on_released(self, weights: dict) -> None:
        self._save_session()
        if self.regen.isChecked() and self.prompt.toPlainText().strip() and not self.busy_with:
            self.start_generation()

    def _on_pins_changed(self) -> None:
        try:
            self.session.pin(self.plane_view.pins, self.plane_view.pin_mix)
        except TsdpoError as exc:
            self.show_error("The pinned point was not saved", str(exc))
        self._directions_changed()

    # ------------------------------------------------------------------ generation and rating
    def sampling_params(self) -> SamplingParams:
        return SamplingParams(self.max_tokens.value(), self.temperature.value(), self.top_p.value(), self.repetition.value(),
                              self.seed.value())

    def start_generation(self) -> None:
        prompt = self.prompt.toPlainText().strip()
        if not prompt:
            self.show_error("Nothing to generate", "Type a prompt first.")
            return
        if self.model_info is None or self.busy_with:
            return
        labels = {n: d.label for n, d in self.directions.items()}
        sources = self.compare.chosen_sources()
        view = self.plane_view
        columns = [column_request(src, view.point, view.weights(), view.pins, view.pin_weights, labels) for src in sources]
        self.compare.start([c.label for c in columns], sources)
        self.last_result = None
        self.host.compare(CompareRequest(with_system(prompt, self.system_prompt), columns, self.sampling_params(),
                                         blind=not self.compare.revealed,
                                         session_id=self.session.session_id if self.store is not None else None))

    def _on_compared(self, result: ComparisonResult) -> None:
        self.last_result = result
        self.compare.finish(result)
        self.history.add(result)
        n = len(result.columns)
        if n > 1:
            self._idle_note = (
                f"{n} columns generated in one batch" if result.batched else
                f"{n} columns generated in {result.batches} batches: full-rank directions at different weights change "
                "the weights themselves, so their columns cannot share one")
        if result.merged:
            self._idle_note = ((self._idle_note + "; ") if n > 1 else "") + (
                "the low-rank mix was merged into the weights for this generation (measured faster than the adapter "
                f"for {result.max_new_tokens} tokens)")

    @staticmethod
    def _verdict(rating, columns: list, letter) -> str:
        if rating.outcome != "winner":
            return {"tie": "tie", "both_bad": "both bad"}[rating.outcome]
        i = next(k for k, c in enumerate(columns) if c.generation_id == rating.winner_id)
        return f"{letter(i)} ({columns[i].label}) is better"

    def _on_rated(self, r: dict) -> None:
        result = self.compare.last
        if self.store is None or result is None:
            return
        gen_ids = [c.generation_id for c in result.columns]
        winner = None if r["winner_column"] is None else gen_ids[r["winner_column"]]
        scores = {gen_ids[col]: vals for col, vals in r["scores"].items()}
        try:
            row, earlier = self.session.rate(result.comparison_id, r["outcome"], winner, scores, r["note"], r["blind"])
        except TsdpoError as exc:
            self.show_error("The rating was not saved", f"{exc}\n\nRate again once the problem is solved.")
            return
        what = self._verdict(row, result.columns, self.compare.letter_of)
        if earlier is not None:
            before = self._verdict(earlier, result.columns, self.compare.letter_of)
            self._undo = {"rating_id": row.id, "columns": result.columns}
            self.compare.rating_saved(f"Rating changed: {what} (it was: {before}"
                                      + (f"; note kept: {row.note}" if row.note and not r["note"] else "") + ")", undoable=True)
        else:
            self._undo = None
            self.compare.rating_saved(f"Rating saved: {what}")
        if self.tabs.currentWidget() is self.ratings_view:
            self.refresh_ratings()
        if self.prompt_set.row_of(result.comparison_id) is not None:
            winner = next((c.label for c in result.columns if c.generation_id == row.winner_id), None)
            self.prompt_set.mark_rated(result.comparison_id, f"{winner} better" if winner else row.outcome.replace("_", " "))
        self._reload_history()

    def _undo_rating(self) -> None:
        if self._undo is None or self.store is None:
            return
        try:
            now = self.session.undo_rating(self._undo["rating_id"])
        except TsdpoError as exc:
            self.show_error("The change was not undone", str(exc))
            return
        what = self._verdict(now, self._undo["columns"], self.compare.letter_of) if now is not None else "no rating"
        self._undo = None
        self.compare.rating_saved(f"Change undone: the earlier rating counts again ({what})")
        self._reload_history()

    # ------------------------------------------------------------------ jobs
    def open_job(self, kind: str, data: Optional[str] = None, objective: Optional[str] = None,
                 fmt: Optional[str] = None) -> None:
        if self.model_info is None:
            self.show_error("No model", "Load a model before starting a job.")
            return
        out_dir = data_dir() / "directions"
        out_dir.mkdir(parents=True, exist_ok=True)
        dialog = JobDialog(kind, out_dir, data or str(DEMO_DATA / "ultrafeedback_helpfulness_400.jsonl"), self,
                           coverage=self.model_info.coverage)
        if objective:
            dialog.data.objective.setText(objective)
        if fmt:
            dialog.data.format.setCurrentText(fmt)
        self.job_dialog = dialog  # reachable while it is open (tests read it)
        if dialog.exec():
            self.start_job(dialog.job())
        self.job_dialog = None

    # ------------------------------------------------------------------ ratings
    def ratings_filters(self) -> dict:
        return self.ratings_view.filters(self.session.session_id)

    def refresh_ratings(self) -> None:
        from engine.ratings import ratings_report

        if self.store is None:
            self.ratings_view.note.setText("No database: ratings are not saved, so there is nothing to count.")
            return
        try:
            sets = sorted({(c.params or {}).get("prompt_set") for c in self.session.history()} - {None})
            self.ratings_view.set_prompt_sets(sets)
            self.ratings_view.show_report(ratings_report(self.store, **self.ratings_filters()))
        except TsdpoError as exc:
            self.ratings_view.note.setText(f"The ratings could not be read: {exc}")

    def export_ratings_csv(self) -> None:
        from engine.paths import atomic_write_text
        from engine.ratings import rated_comparisons, ratings_csv

        if self.store is None:
            self.show_error("Nothing to export", "There is no database, so no ratings.")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export ratings as CSV", str(data_dir() / "ratings.csv"), "CSV (*.csv)")
        if path:
            try:
                atomic_write_text(path, ratings_csv(rated_comparisons(self.store, **self.ratings_filters())))
            except (TsdpoError, OSError) as exc:
                self.show_error("Export failed", str(exc))
                return
            self.progress_label.setText(f"ratings written to {path}")

    def save_ratings_plot(self) -> None:
        from engine.ratings import plot_report, ratings_report

        if self.store is None:
            self.show_error("Nothing to plot", "There is no database, so no ratings.")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Save the win-rate plot", str(data_dir() / "win-rates.png"), "PNG (*.png)")
        if path:
            try:
                plot_report(ratings_report(self.store, **self.ratings_filters()), path)
            except (TsdpoError, OSError) as exc:
                self.show_error("The plot was not saved", str(exc))
                return
            self.progress_label.setText(f"plot saved to {path}")

    def train_from_ratings(self, exclude_cut: bool) -> None:
        """The session's rated pairs as TRL data, in the training dialog."""
        from engine.store import export_ratings_trl

        if self.store is None or self.session.session_id is None:
            self.show_error("No ratings", "There is no open session with ratings.")
            return
        folder = data_dir() / "ratings"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"session-{self.session.session_id}-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        try:
            n = export_ratings_trl(self.store, self.session.session_id, path, exclude_truncated=exclude_cut)
        except (TsdpoError, OSError) as exc:
            self.show_error("The ratings were not exported", str(exc))
            return
        if n == 0:
            path.unlink(missing_ok=True)
            self.show_error("No preference pairs yet", "No rated comparison names a winner" + (
                " whose replies both ended on their own (untick 'leave out cut-off replies' to keep cut ones)"
                if exclude_cut else "") + ". Rate some comparisons (a winner, not a tie) first.")
            return
        self.progress_label.setText(f"{n} preference pairs from the ratings in {path}")
        self.open_job("train", str(path), "ratings", "trl")

    # ------------------------------------------------------------------ heatmaps
    def start_prediction(self) -> None:
        if self.model_info is None:
            self.show_error("No model", "Load a model first.")
            return
        self.start_job(PredictJob(pairs=16))

    def start_gap_map(self) -> None:
        if self.model_info is None:
            self.show_error("No model", "Load a model first.")
            return
        plane = self.plane_view.plane
        used = {n for n in (plane.x.direction, plane.y.direction, *plane.anchors) if n}
        if not any(self.directions[n].label in WEIGHT_SPACE for n in used if n in self.directions):
            self.show_error("No TS-DPO direction on the plane",
                            "The linearization gap is a property of mixing weights: put a TS-DPO tangent direction on an "
                            "axis (or in the anchor layout) first. Steering vectors have no linearized model.")
            return
        self.start_job(GapJob(plane=plane.to_json()))

    def _gap_key(self) -> Optional[str]:
        """The key of the gap map for the plane as it is now (None when no weight-space direction is on it)."""
        from engine.directions import file_sha256
        from engine.sweep import gap_map_key

        if self.model_info is None:
            return None
        plane = self.plane_view.plane
        shas = {}
        for n in {n for n in (plane.x.direction, plane.y.direction, *plane.anchors) if n}:
            info = self.directions.get(n)
            if info is None or info.label not in WEIGHT_SPACE:
                continue
            try:
                st = os.stat(info.path)
                ident = (info.path, st.st_mtime_ns, st.st_size)
                if ident not in self._shas:
                    self._shas[ident] = file_sha256(info.path)
                shas[n] = self._shas[ident]
            except OSError:
                continue  # a direction whose file is gone: no map can be matched to it
        return gap_map_key(self.model_info.fingerprint, plane, shas) if shas else None

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
        if not any(k.startswith("measured") for k in self.plane_view.layers):
            self.progress_label.setText(f"Bind the sweep's objectives ({', '.join(result['objectives'])}) to the plane's "
                                        "axes to see its measurements.")

    def _plane_axes(self) -> dict:
        p = self.plane_view.plane
        if p.anchors:
            return {}
        return {k: (self.directions[a.direction].objective if a.direction in self.directions else None, a.scale)
                for k, a in (("x", p.x), ("y", p.y)) if a.direction}

    def refresh_heatmaps(self, *_) -> None:
        from studio.heatmaps import gap_layers, load_gap_maps, predicted_layers, sweep_layers, trust_line

        axes = self._plane_axes()
        layers = sweep_layers(self.sweep_result, axes) if self.sweep_result else {}
        if self.prediction:
            xr, yr = self.plane_view.limits()
            layers.update(predicted_layers(self.prediction, self.plane_view.plane.weights, xr, yr,
                                           sweep=self.sweep_result, axes=axes))
        key = self._gap_key()
        if key is not None and key not in self.gap_maps:
            self.gap_maps.update(load_gap_maps())  # measured by the CLI or another window since
        gap = self.gap_maps.get(key) if key else None
        if gap is not None:
            layers.update(gap_layers(gap))
        self.plane_view.set_trust_line(trust_line(gap) if gap else None)
        self.plane_view.set_layers(layers)

    def open_export(self) -> None:
        if self.model_info is None:
            self.show_error("No model", "Load a model before exporting.")
            return
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dialog = ExportDialog(self.plane_view.weights(), {n: d.label for n, d in self.directions.items()},
                              data_dir() / "exports" / f"mix-{stamp}", self)
        if dialog.exec():
            self.start_export(dialog.job())

    def start_export(self, job: ExportJob) -> None:
        """Export the mix at the current point (the dialog's choices in ``job``)."""
        view = self.plane_view
        self.start_job(replace(job, weights=view.weights(), point=tuple(view.point), plane=view.plane.to_json()))

    def start_job(self, job: Job) -> None:
        job = replace(job, session_id=self.session.session_id)
        self._dock_height = self.job_dock.height()  # what the job panel gives back when the job ends
        self.job_panel.started(job)
        self.job_dock.raise_()
        self.host.run_job(job)

    def _on_job_finished(self, result: JobResult) -> None:
        self.job_panel.finished(result)
        # The job panel gives its space back: its plot goes, the dock shrinks to its line, the history is on top.
        self.job_panel.plot.hide()
        height = self._dock_height or self.job_panel.minimumSizeHint().height()
        # Once the layout has taken the plot away (before that, the panel's minimum still counts it).
        QTimer.singleShot(0, lambda: self.resizeDocks([self.job_dock], [height], Qt.Vertical))
        if result.kind == "predict" and not result.cancelled:
            self.prediction = result.prediction
            self.refresh_heatmaps()
            first = next((k for k in self.plane_view.layers if k.startswith("predicted") and k.endswith("margin")), None)
            if first:
                self.plane_view.heat_combo.setCurrentText(first)
        if result.kind == "promptset":
            self.prompt_set.finished(result.summary or ("stopped" if result.cancelled else "done"))
            self._reload_history()
        if result.kind == "gap" and not result.cancelled and result.gap_map:
            self.gap_maps[result.gap_map["key"]] = result.gap_map
            self.refresh_heatmaps()
            self.plane_view.heat_combo.setCurrentText("linearization gap · share of the change")
        if result.kind == "signal" and not result.cancelled:
            box = SignalResultDialog(result.signal, self)
            box.setAttribute(Qt.WA_DeleteOnClose)
            self.signal_box = box
            box.open()
        if result.kind == "export" and not result.cancelled:
            self.progress_label.setText(result.summary)
            box = QMessageBox(QMessageBox.Information, "Export finished", result.summary, QMessageBox.Ok, self)
            folder = box.addButton("Open folder", QMessageBox.ActionRole)
            folder.clicked.connect(lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(result.path)))
            box.setAttribute(Qt.WA_DeleteOnClose)
            box.setObjectName("export_done")
            self.export_dialog = box
            box.open()

    # ------------------------------------------------------------------ sessions
    @property
    def session_id(self) -> Optional[int]:
        return self.session.session_id

    def _create_session(self) -> None:
        if self.store is None or self.model_info is None:
            return
        try:
            sid = self.session.create(self.model_info.source, self.model_info.fingerprint)
        except TsdpoError as exc:
            self.show_error("The session was not created", str(exc))
            return
        self.settings.setValue("last_session", sid)
        self.plane_view.clear_pins()
        self.history.clear()
        self.system_prompt = None
        self.session_label.setText(self.session.name)

    def new_session(self) -> None:
        """A fresh history and no pinned points, with the model and directions already loaded."""
        self._create_session()
        self._directions_changed()
        self._save_session()

    def session_settings(self) -> dict:
        view = self.plane_view
        settings = self.session.settings({n: d.path for n, d in self.directions.items()}, view.plane.to_json(), view.point,
                                         self.compare.chosen_sources(), self.compare.n_columns.value())
        if self.system_prompt:
            settings["system_prompt"] = self.system_prompt
        return settings

    def edit_system_prompt(self) -> None:
        text, ok = QInputDialog.getMultiLineText(self, "System prompt",
                                                 "Put in front of every prompt of this session (single comparisons and "
                                                 "prompt sets); empty for none:", self.system_prompt or "")
        if ok:
            self.system_prompt = text.strip() or None
            self._save_session()
            self._refresh_status()

    def _save_session(self, *_) -> None:
        try:
            self.session.save(self.session_settings())
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
            restore = self.session.open(session_id)
        except TsdpoError as exc:
            self.show_error("Could not open the session", str(exc))
            return
        self.settings.setValue("last_session", session_id)
        self.session_label.setText(self.session.name)
        self.plane_view.clear_pins()
        for name, (x, y) in restore.pins.items():
            self.plane_view.add_pin(name, x, y, emit=False, weights=restore.pin_weights.get(name))
        self._reload_history()
        if self.model_info is not None and self.model_info.fingerprint == restore.model_fingerprint:
            self._restore_directions()
        else:
            source = restore.model_ref
            self.load_model(None if source.get("kind") == "embedded" else source.get("ref"))

    def _restore_directions(self) -> None:
        for path, name in self.session.directions_to_load(set(self.directions)):
            self.host.add_direction(path, name)
        self._maybe_finish_restore()

    def _maybe_finish_restore(self) -> None:
        if not self.session.ready():
            return
        s = self.session.finish(set(self.directions))
        self._directions_changed()
        if "plane" in s:
            try:
                self.plane_view.set_plane(PreferencePlane.from_json(s["plane"]), saved_point(s))
            except TsdpoError as exc:
                self.show_error("The plane layout was not restored", str(exc))
        if s.get("n_columns") or s.get("columns"):
            self.compare.choose(list(s.get("columns", [])), int(s.get("n_columns") or 0) or None)
        self.system_prompt = s.get("system_prompt") or None
        self._refresh_status()
        self.progress_label.setText("Session restored")

    def _reload_history(self) -> None:
        self.history.show_session(self.session.history())

    def _show_history_item(self, result: ComparisonResult, rated: bool, order: Optional[list[int]] = None) -> None:
        self.prompt.setPlainText(display_prompt(result.prompt))
        self.compare.n_columns.setValue(max(2, len(result.columns)))
        self.compare.start([c.label for c in result.columns], blind=result.blind and not rated, order=order)
        self.compare.finish(result)
        self.tabs.setCurrentIndex(0)

    # ------------------------------------------------------------------ prompt sets
    def run_prompt_set(self, path: str, limit: int) -> None:
        if self.model_info is None or self.busy_with:
            self.show_error("Not now", "Load a model, and wait for what runs to finish (or Stop it).")
            return
        labels = {n: d.label for n, d in self.directions.items()}
        view = self.plane_view
        columns = [column_request(src, view.point, view.weights(), view.pins, view.pin_weights, labels)
                   for src in self.compare.chosen_sources()]
        blind = self.compare.blind.isChecked()
        self.prompt_set.start([c.label for c in columns], blind)
        self.start_job(PromptSetJob(path, columns, self.sampling_params(), limit or None, self.system_prompt, blind))

    def _open_prompt_set_row(self, comparison_id: int, order: list) -> None:
        from studio.history import replies_of

        comp = next((c for c in self.session.history() if c.id == comparison_id), None)
        if comp is None:
            self.show_error("Not in the session", f"Comparison {comparison_id} is not in the open session any more.")
            return
        self._show_history_item(replies_of(comp), bool(comp.ratings), order)

    def export_ratings(self) -> None:
        """The session's rated pairs as TRL JSONL, with the win-rate chart (PNG) and the ratings (CSV) beside them."""
        from engine.paths import atomic_write_text
        from engine.ratings import plot_report, rated_comparisons, ratings_csv, ratings_report
        from engine.store import export_ratings_trl

        if self.store is None or self.session_id is None:
            self.show_error("Nothing to export", "There is no open session.")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export ratings as TRL preference pairs", "ratings.jsonl", "JSON lines (*.jsonl)")
        if path:
            stem = Path(path).with_suffix("")
            try:
                n = export_ratings_trl(self.store, self.session_id, path)
                atomic_write_text(f"{stem}.csv", ratings_csv(rated_comparisons(self.store, self.session_id)))
                report = ratings_report(self.store, self.session_id)
                if report["all"]["sources"]:
                    plot_report(report, f"{stem}.win-rates.png")
            except (TsdpoError, OSError) as exc:
                self.show_error("Export failed", str(exc))
                return
            self.progress_label.setText(f"{n} preference pairs written to {path}, with {stem.name}.csv and "
                                        f"{stem.name}.win-rates.png beside it")

    # ------------------------------------------------------------------ errors, state, settings
    def _on_failed(self, failure: Failure) -> None:
        message = failure.message
        if self.session.restore is not None:
            if failure.kind == "direction":
                self.session.direction_done()
                self._maybe_finish_restore()
            elif failure.kind == "load":  # the session's model is gone: keep its history, stop restoring
                self.session.abandon()
                message += "\n\nThe session's history is shown; open its model again to use its directions."
        self.show_error(failure.title, message)

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
            self.progress_label.setText(self._idle_note)  # what the finished request left to say, if anything
            self._idle_note = ""
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
        self.demo_steering_action.setEnabled(loaded and self.model_info.source["kind"] == "embedded")
        if not self.prompt_set.stop_button.isEnabled():  # no prompt set running: its Run follows the window
            self.prompt_set.run_button.setEnabled(idle and loaded)

    def _refresh_status(self) -> None:
        info = self.model_info
        if info:
            self.model_label.setText(f"{info.name} · {info.layers} layers · {info.device} ({info.dtype})")
        self.session_label.setText(self.session.name + (" · system prompt" if self.system_prompt else ""))
        self.session_label.setToolTip(f"System prompt: {self.system_prompt}" if self.system_prompt else
                                      "No system prompt (Session > System prompt...)")
        text = f"memory {format_bytes(psutil.Process(os.getpid()).memory_info().rss)}"
        if info and info.device.startswith("cuda"):
            import torch

            text += f" · GPU {format_bytes(torch.cuda.memory_allocated())}"
        self.memory_label.setText(text)

    def _set_dark(self, on: bool) -> None:
        apply_palette(QApplication.instance(), on)
        restyle_plots(self)
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
            restyle_plots(self)

    def _save_settings(self) -> None:
        self.settings.setValue("geometry", self.saveGeometry())
        self.settings.setValue("window_state", self.saveState())
        for key, value in asdict(self.sampling_params()).items():
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
