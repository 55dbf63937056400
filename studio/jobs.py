"""Dialogs that describe a job (extract a steering vector, train a TS-DPO direction or the scalarized
baseline) and the panel that follows it: progress with ETA, live loss/accuracy for training, Cancel."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Optional, Sequence

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDialog, QDialogButtonBox, QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox, QMessageBox,
                               QHBoxLayout, QLabel, QLineEdit, QProgressBar, QPushButton, QSpinBox, QVBoxLayout,
                               QWidget)

from engine.data import FORMATS
from engine.errors import TsdpoError
from engine.progress import Progress
from engine.steering import ESTIMATORS
from studio.messages import BuildJob, Data, ExportJob, Job, JobResult, SignalJob

AUTO = "detect"
TITLES = {"extract": "Extract a steering vector", "train": "Train a TS-DPO direction",
          "scalarized": "Train a scalarized-DPO baseline", "export": "Export the mix",
          "predict": "Predict margin maps", "gap": "Map the linearization gap", "promptset": "Run a prompt set",
          "signal": "Check preference data before training"}
EXPORT_FORMATS = {
    "hf": "Hugging Face checkpoint (merged weights; steering can be baked in as a bias)",
    "peft": "PEFT LoRA adapter (low-rank TS-DPO directions only)",
    "controlvector": "llama.cpp control vectors (steering vectors only)",
}


class DataPicker(QWidget):
    """A file (or a `datasets` name), its format and the objective."""

    def __init__(self, default_file: str = "", default_objective: str = "", parent=None, selections: bool = True):
        super().__init__(parent)
        self.path = QLineEdit(default_file, placeholderText="a .jsonl/.csv/.parquet file or a datasets name")
        self.path.setToolTip("The preference pairs: a file, a folder, or a `datasets` name (with a network)")
        browse = QPushButton("Browse...")
        browse.setToolTip("Choose a file of preference pairs")
        browse.clicked.connect(self._browse)
        self.format = QComboBox()
        self.format.addItems([AUTO, *FORMATS])
        self.format.setToolTip("How the rows are laid out (detected from the columns when left on auto)")
        self.objective = QLineEdit(default_objective, placeholderText="e.g. helpfulness, or verbosity / conciseness (from length)")
        self.objective.setToolTip("What the direction is for; verbosity and conciseness make their pairs from the "
                                  "replies' lengths")
        self.length_matched = QDoubleSpinBox(minimum=1.0, maximum=10.0, singleStep=0.05, value=1.0, decimals=2)
        self.length_matched.setSpecialValueText("off")
        self.length_matched.setToolTip("Keep only pairs whose two replies are within this length ratio (1.20: within "
                                       "20%), so the direction cannot be a length direction in disguise (off: all pairs)")
        self.length_balanced = QDoubleSpinBox(minimum=1.0, maximum=10.0, singleStep=0.25, value=1.0, decimals=2)
        self.length_balanced.setSpecialValueText("off")
        self.length_balanced.setToolTip("Of the pairs within this length ratio, keep as many with the longer reply "
                                        "preferred as with the shorter, matched by how much longer: length says "
                                        "nothing about the label, and more pairs stay than when length-matched")
        self.min_score_gap = QDoubleSpinBox(minimum=0.0, maximum=100.0, singleStep=0.5, value=0.0, decimals=1)
        self.min_score_gap.setSpecialValueText("off")
        self.min_score_gap.setToolTip("Rated data (UltraFeedback, HelpSteer): keep only pairs whose chosen reply was "
                                      "scored at least this much above the rejected one, so near-ties do not dilute "
                                      "the labels (off: every pair)")
        row = QHBoxLayout()
        row.setContentsMargins(0, 0, 0, 0)
        row.addWidget(self.path, 1)
        row.addWidget(browse)
        form = QFormLayout(self)
        form.setContentsMargins(0, 0, 0, 0)
        form.addRow("Data", row)
        form.addRow("Format", self.format)
        form.addRow("Objective", self.objective)
        if selections:  # which pairs train the direction; pairs kept unchanged are taken whole
            form.addRow("Length-matched within", self.length_matched)
            form.addRow("Length-balanced within", self.length_balanced)
            form.addRow("Score gap at least", self.min_score_gap)

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Preference data", "", "Preference pairs (*.jsonl *.json *.csv *.tsv *.parquet)")
        if path:
            self.path.setText(path)

    def data(self, limit: Optional[int]) -> Data:
        fmt = self.format.currentText()
        matched, balanced = (box.value() for box in (self.length_matched, self.length_balanced))
        gap = self.min_score_gap.value()
        return Data(self.path.text().strip(), None if fmt == AUTO else fmt, self.objective.text().strip() or None, limit,
                    matched if matched > 1.0 else None, balanced if balanced > 1.0 else None, gap if gap > 0 else None)


class JobDialog(QDialog):
    def __init__(self, kind: str, out_dir: Path, default_data: str = "", parent=None, coverage: Sequence[str] = ()):
        super().__init__(parent)
        self.kind = kind
        self.out_dir = out_dir
        self.setWindowTitle(TITLES[kind])
        self.data = DataPicker(default_data, "verbosity" if kind == "extract" else "helpfulness")
        if kind == "signal":
            self.data.setToolTip("A first DPO step on the training split of these pairs (35% held out, seed 0, as in "
                                 "training), and how far it moves the held-out pairs: whether training on them "
                                 "can generalize")
        self.data_b = DataPicker(default_data, "verbosity") if kind == "scalarized" else None
        self.keep = None
        if kind == "train":
            self.keep = QGroupBox("Keep another objective unchanged")
            self.keep.setCheckable(True)
            self.keep.setChecked(False)
            self.keep.setToolTip("Train the direction orthogonal to the margin gradients of these pairs (their training "
                                 "split), so it leaves their margins where they are, to first order: e.g. train "
                                 "helpfulness and keep verbosity. Low-rank only; costs about a training step per 4 pairs")
            self.keep_data = DataPicker(default_data, "verbosity", selections=False)
            QVBoxLayout(self.keep).addWidget(self.keep_data)
        self.name = QLineEdit(placeholderText="default: the objective")
        self.name.setToolTip("The direction's name on the plane and in the database")
        self.limit = QSpinBox(minimum=0, maximum=1_000_000, value=100 if kind == "extract" else 200)
        self.limit.setSpecialValueText("all pairs")
        self.limit.setToolTip("Use the first N pairs of the data (all pairs: every one)")
        form = QFormLayout()
        if kind != "signal":
            form.addRow("Name", self.name)
        form.addRow("Use the first", self.limit)
        if kind == "signal":
            self.heldout = QSpinBox(minimum=2, maximum=100_000, value=64)
            self.heldout.setToolTip("How many of the held-out pairs to measure (each costs about a training step's "
                                    "forward and backward)")
            form.addRow("Held-out pairs measured", self.heldout)
            self.max_tokens = QSpinBox(minimum=16, maximum=4096, value=128)
            self.max_tokens.setToolTip("Prompts and replies are cut to this many tokens, as for training")
            form.addRow("Max prompt / response tokens", self.max_tokens)
        elif kind == "extract":
            self.strength = QDoubleSpinBox(minimum=0.01, maximum=5.0, singleStep=0.05, value=0.1, decimals=2)
            self.strength.setToolTip("Weight 1 adds this fraction of the steered layer's typical activation norm (0.1 "
                                     "keeps the embedded model fluent; 0.5 and more make it repeat itself)")
            form.addRow("Strength (x layer norm at weight 1)", self.strength)
            self.estimator = QComboBox()
            self.estimator.addItems(list(ESTIMATORS))
            self.estimator.setToolTip("Per layer: the difference of the mean activations, or the first principal "
                                      "component of the paired differences")
            form.addRow("Estimator", self.estimator)
            self.band = QSpinBox(minimum=1, maximum=16, value=1)
            self.band.setToolTip("Steer this many contiguous layers around the best one, the strength split across them")
            form.addRow("Layers steered (band)", self.band)
        else:
            self.param = QComboBox()
            self.param.addItems(["lowrank", "full"])
            self.param.setToolTip("lowrank: B A0 factors per weight matrix (small files, mixed as adapters, no copy of "
                                  "the weights); full: a whole delta per matrix")
            self.steps = QSpinBox(minimum=1, maximum=100_000, value=60)
            self.steps.setToolTip("Optimizer steps (each over the batch of pairs)")
            # up to 100: one plain SGD step's rate is its length (the shipped helpfulness step picked 10)
            self.lr = QDoubleSpinBox(minimum=0.0, maximum=100.0, decimals=5, singleStep=1e-4, value=0.0)
            self.lr.setSpecialValueText("default")
            self.lr.setToolTip("The learning rate (default: 2e-3 low-rank, 1e-4 full; one sgd step over every pair takes "
                               "rates of 1-50); a grid below replaces it")
            self.lr_grid = QLineEdit(placeholderText="e.g. 5e-4, 1e-3, 2e-3 (empty: one run)")
            self.lr_grid.setObjectName("lr_grid")
            self.lr_grid.setToolTip("Train once per learning rate and keep the direction with the lowest held-out DPO "
                                    "loss (every run's numbers are kept in the file). One sgd step trains once: each "
                                    "rate is scored on its multiple of that step")
            self.optimizer = QComboBox()
            self.optimizer.addItems(["adamw", "sgd"])
            self.optimizer.setToolTip("adamw, or sgd: plain gradient steps (one step over every training pair is the "
                                      "first-order direction the data check measures)")
            self.beta = QDoubleSpinBox(minimum=0.001, maximum=10.0, decimals=3, singleStep=0.05, value=0.1)
            self.beta.setToolTip("DPO's beta: how strongly the implicit reward is tied to the base model")
            self.max_tokens = QSpinBox(minimum=16, maximum=4096, value=128)
            self.max_tokens.setToolTip("Prompts and replies are cut to this many tokens for training")
            form.addRow("Parameterization", self.param)
            form.addRow("Steps", self.steps)
            form.addRow("Optimizer", self.optimizer)
            form.addRow("Learning rate", self.lr)
            form.addRow("Learning-rate grid", self.lr_grid)
            form.addRow("Beta", self.beta)
            form.addRow("Max prompt / response tokens", self.max_tokens)
            if kind == "scalarized":
                self.weight = QDoubleSpinBox(minimum=0.0, maximum=1.0, singleStep=0.1, value=0.5, decimals=2)
                self.weight.setToolTip("Which share of each batch comes from the first objective's pairs")
                form.addRow("Share of the first objective", self.weight)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.button(QDialogButtonBox.Ok).setText("Start")
        buttons.button(QDialogButtonBox.Ok).setToolTip("Start the job (it runs beside the window, with progress and Cancel)")
        buttons.button(QDialogButtonBox.Cancel).setToolTip("Close without starting")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addWidget(QLabel("<b>Preference pairs</b>"))
        lay.addWidget(self.data)
        if self.data_b is not None:
            lay.addWidget(QLabel("<b>Second objective</b>"))
            lay.addWidget(self.data_b)
        lay.addLayout(form)
        if self.keep is not None:
            lay.addWidget(self.keep)
        if kind in ("train", "scalarized") and coverage:  # what the direction will change on this model, and what it leaves out
            self.coverage = QLabel("<b>What the direction covers</b><br>" + "<br>".join(html.escape(c) for c in coverage))
            self.coverage.setWordWrap(True)
            self.coverage.setTextInteractionFlags(Qt.TextSelectableByMouse)
            lay.addWidget(self.coverage)
        lay.addWidget(buttons)

    def showEvent(self, event) -> None:
        # Never smaller than the rows need: Qt sizes a dialog with a word-wrapped label (the coverage) from the
        # label's one-line minimum, which opened it short and squeezed every field.
        self.setMinimumSize(self.sizeHint())
        self.resize(self.size().expandedTo(self.sizeHint()))
        super().showEvent(event)

    def learning_rates(self) -> list[float]:
        """The grid typed in, as numbers (empty: one run); refused with the reason when it is not a list of rates."""
        text = self.lr_grid.text().strip() if hasattr(self, "lr_grid") else ""
        if not text:
            return []
        try:
            rates = [float(v) for v in text.replace(";", ",").split(",") if v.strip()]
        except ValueError:
            raise TsdpoError(f"The learning-rate grid {text!r} is not a list of numbers; write it as 5e-4, 1e-3.") from None
        if not rates or not all(0 < r < 1 for r in rates):
            raise TsdpoError(f"Learning rates are between 0 and 1 (got {text!r}).")
        return rates

    def accept(self) -> None:
        try:
            self.learning_rates()
        except TsdpoError as exc:
            QMessageBox.warning(self, "Learning-rate grid", str(exc))
            return
        super().accept()

    def job(self) -> BuildJob | SignalJob:
        limit = self.limit.value() or None
        data = self.data.data(limit)
        if self.kind == "signal":
            return SignalJob(data, max_tokens=self.max_tokens.value(), heldout=self.heldout.value())
        job = BuildJob(self.kind, "", "", data, second=self.data_b.data(limit) if self.data_b is not None else None)
        if self.kind == "scalarized":
            job.weight = self.weight.value()
        if self.kind == "extract":
            job.strength = self.strength.value()
            job.estimator, job.band = self.estimator.currentText(), self.band.value()
        else:
            job.param, job.steps, job.lr = self.param.currentText(), self.steps.value(), self.lr.value()
            job.lr_grid = self.learning_rates()
            job.optimizer = self.optimizer.currentText()
            if self.keep is not None and self.keep.isChecked():
                job.keep = self.keep_data.data(None)
            job.beta, job.max_tokens = self.beta.value(), self.max_tokens.value()
        job.name = self.name.text().strip() or (f"scalarized {data.objective or 'a'}={job.weight:g}" if self.kind == "scalarized"
                                                else (data.objective or Path(data.path).stem))
        suffix = {"extract": "steer", "train": "tsdpo", "scalarized": "scalarized"}[self.kind]
        safe = "".join(ch if ch.isalnum() or ch in "-_=." else "_" for ch in job.name)
        job.out = str(self.out_dir / f"{safe}.{suffix}.safetensors")
        return job


class SignalResultDialog(QDialog):
    """What a data check measured (a line per figure, fixed width) and its verdict."""

    def __init__(self, result: dict, parent=None):
        from PySide6.QtGui import QFontDatabase

        from engine.signal import signal_figures, verdict_text

        super().__init__(parent)
        self.setWindowTitle("Preference data check")
        self.setObjectName("signal_done")
        self.figures = QLabel(signal_figures(result))
        self.figures.setFont(QFontDatabase.systemFont(QFontDatabase.FixedFont))
        self.figures.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.verdict = QLabel(verdict_text(result))
        self.verdict.setWordWrap(True)
        self.verdict.setTextInteractionFlags(Qt.TextSelectableByMouse)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok)
        buttons.accepted.connect(self.accept)
        lay = QVBoxLayout(self)
        lay.addWidget(self.figures)
        lay.addWidget(self.verdict)
        lay.addWidget(buttons)


class ExportDialog(QDialog):
    """Where and how to export the mix at the current point."""

    def __init__(self, weights: dict[str, float], kinds: dict[str, str], default_out: Path, parent=None):
        super().__init__(parent)
        self.setWindowTitle(TITLES["export"])
        active = {n: w for n, w in weights.items() if w}
        mix = ", ".join(f"{n} {w:+.2f}" for n, w in active.items()) or "none: every weight is 0 (the base model)"
        self.format = QComboBox()
        for key, text in EXPORT_FORMATS.items():
            self.format.addItem(text, key)
        only_steering = active and all(kinds.get(n) == "steering" for n in active)
        self.format.setCurrentIndex(list(EXPORT_FORMATS).index("controlvector" if only_steering else "hf"))
        self.format.setToolTip("A Hugging Face checkpoint (loads in plain transformers), a PEFT LoRA adapter, or "
                               "llama.cpp control vectors (steering only)")
        self.out = QLineEdit(str(default_out))
        self.out.setToolTip("A new or empty folder")
        browse = QPushButton("Browse...")
        browse.setToolTip("Choose the folder")
        browse.clicked.connect(self._browse)
        row = QHBoxLayout()
        row.addWidget(self.out, 1)
        row.addWidget(browse)
        self.overwrite = QCheckBox("Replace the folder if it is not empty (only once the new export is complete)")
        self.overwrite.setToolTip("The old folder is replaced only after the new export is written and checked")
        self.bake = QCheckBox("Bake steering vectors into the weights as an MLP bias")
        self.bake.setToolTip("Steering becomes a bias of each steered block's MLP output, so the checkpoint steers "
                             "without hooks; refused (with the reason) where the architecture cannot take it exactly")
        self.bake.setChecked(any(kinds.get(n) == "steering" for n in active))
        self.dtype = QComboBox()
        self.dtype.addItems(["as loaded", "float32", "bfloat16", "float16"])
        self.dtype.setToolTip("The dtype of the written weights")
        self.format.currentIndexChanged.connect(self._format_changed)
        form = QFormLayout()
        form.addRow("Mix", QLabel(mix))
        form.addRow("Format", self.format)
        form.addRow("Folder", row)
        form.addRow("", self.overwrite)
        form.addRow("", self.bake)
        form.addRow("Weights dtype", self.dtype)
        buttons = QDialogButtonBox(QDialogButtonBox.Ok | QDialogButtonBox.Cancel)
        buttons.button(QDialogButtonBox.Ok).setText("Export")
        buttons.button(QDialogButtonBox.Ok).setToolTip("Write the export and check that it reloads to the same logits")
        buttons.button(QDialogButtonBox.Cancel).setToolTip("Close without exporting")
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(buttons)
        self._format_changed()

    def _format_changed(self, *_) -> None:
        hf = self.format.currentData() == "hf"
        self.bake.setEnabled(hf)
        self.dtype.setEnabled(hf)

    def _browse(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Export into (a new or empty folder)", str(Path(self.out.text()).parent))
        if path:
            self.out.setText(path)

    def job(self) -> ExportJob:
        dtype = self.dtype.currentText()
        return ExportJob(self.out.text().strip(), self.format.currentData(), self.overwrite.isChecked(),
                         self.bake.isChecked() and self.format.currentData() == "hf", None if dtype == "as loaded" else dtype)


class JobPanel(QWidget):
    cancelRequested = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.title = QLabel("No job running")
        self.bar = QProgressBar()
        self.bar.setObjectName("job_progress")
        self.eta = QLabel("")
        self.cancel = QPushButton("Cancel")
        self.cancel.setObjectName("job_cancel")
        self.cancel.setToolTip("Stop the job; what it saved so far stays (a training run keeps its checkpoints)")
        self.cancel.setEnabled(False)
        self.cancel.clicked.connect(self.cancelRequested.emit)
        self.plot = pg.PlotWidget(background=None)
        self.plot.setMinimumHeight(90)
        self.plot.addLegend(offset=(5, 5))
        self.plot.setLabel("bottom", "step")
        self.loss_curve = self.plot.plot([], [], pen=pg.mkPen((220, 80, 60), width=2), name="loss")
        self.acc_curve = self.plot.plot([], [], pen=pg.mkPen((40, 140, 220), width=2), name="accuracy")
        self.plot.hide()
        row = QHBoxLayout()
        row.addWidget(self.bar, 1)
        row.addWidget(self.eta)
        row.addWidget(self.cancel)
        lay = QVBoxLayout(self)
        lay.addWidget(self.title)
        lay.addLayout(row)
        lay.addWidget(self.plot)
        self.steps: list[int] = []
        self.losses: list[float] = []
        self.accs: list[float] = []

    def started(self, job: Job) -> None:
        self.title.setText(f"{TITLES[job.kind]}: {job.name}")
        self.bar.setRange(0, 0)
        self.eta.setText("starting...")
        self.cancel.setEnabled(True)
        self.steps, self.losses, self.accs = [], [], []
        self.loss_curve.setData([], [])
        self.acc_curve.setData([], [])
        self.plot.setVisible(job.kind not in ("extract", "export", "predict", "gap", "promptset", "signal"))

    def update_progress(self, p: Progress) -> None:
        self.bar.setRange(0, p.total)  # a total of 0: a stage with nothing to count, shown as busy
        self.bar.setValue(p.done)
        if p.total == 0:
            self.eta.setText(p.phase)
        else:
            self.eta.setText(f"{p.phase}: {p.done}/{p.total}" + (f" · ETA {p.eta_s:.0f} s" if p.eta_s is not None else ""))
        if "loss" in p.metrics:
            self.steps.append(p.done)
            self.losses.append(p.metrics["loss"])
            self.accs.append(p.metrics["rewards/accuracies"])
            self.loss_curve.setData(self.steps, self.losses)
            self.acc_curve.setData(self.steps, self.accs)

    def finished(self, result: JobResult) -> None:
        self.cancel.setEnabled(False)
        self.bar.setRange(0, 1)
        if result.cancelled:
            self.bar.setValue(0)
            self.eta.setText("failed" if result.failed else "cancelled")
        else:
            self.bar.setValue(1)
            self.eta.setText(result.summary or f"done in {result.seconds:.0f} s: {result.name} added")
