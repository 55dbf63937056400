"""The main window. It paints and forwards requests to the worker; it never touches the model itself."""

from __future__ import annotations

import logging
import os
from typing import Optional

import psutil
from PySide6.QtCore import QSettings, Qt, QTimer, QUrl
from PySide6.QtGui import QAction, QDesktopServices, QKeySequence, QTextCursor
from PySide6.QtWidgets import (QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QInputDialog,
                               QLabel, QMainWindow, QMessageBox, QPlainTextEdit, QProgressBar, QPushButton,
                               QSpinBox, QSplitter, QVBoxLayout, QWidget)

from engine.paths import log_path
from studio.worker import WorkerHost

log = logging.getLogger(__name__)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit in ("B", "KB") else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


class MainWindow(QMainWindow):
    def __init__(self, settings: Optional[QSettings] = None):
        super().__init__()
        self.settings = settings or QSettings()
        self.setWindowTitle("tsdpo-studio")
        self.resize(1100, 720)
        self.host = WorkerHost(self)
        self.model_info: Optional[dict] = None
        self.busy_with = ""
        self.last_result: Optional[dict] = None
        self.error_dialogs: list[QMessageBox] = []
        self._build_ui()
        self._build_menus()
        w = self.host.worker
        w.busy.connect(self._on_busy)
        w.progress.connect(self._on_progress)
        w.modelLoaded.connect(self._on_model_loaded)
        w.text.connect(self._on_text)
        w.generated.connect(self._on_generated)
        w.failed.connect(self.show_error)
        self._memory_timer = QTimer(self, interval=2000, timeout=self._refresh_status)
        self._memory_timer.start()
        self._restore_settings()
        self._refresh_status()
        self._update_actions()

    # ------------------------------------------------------------------ layout
    def _build_ui(self) -> None:
        prompt_box = QGroupBox("Prompt")
        self.prompt = QPlainTextEdit(placeholderText="Ask the model something, then press Generate (Ctrl+Enter).")
        self.prompt.setObjectName("prompt")
        self.max_tokens = QSpinBox(minimum=1, maximum=4096, value=128)
        self.temperature = QDoubleSpinBox(minimum=0.0, maximum=2.0, singleStep=0.1, value=0.0, decimals=2)
        self.temperature.setSpecialValueText("greedy")
        self.top_p = QDoubleSpinBox(minimum=0.05, maximum=1.0, singleStep=0.05, value=1.0, decimals=2)
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.generate_button = QPushButton("Generate")
        self.generate_button.setShortcut(QKeySequence("Ctrl+Return"))
        self.generate_button.setDefault(True)
        self.stop_button = QPushButton("Stop")
        self.stop_button.setShortcut(QKeySequence("Escape"))
        self.generate_button.clicked.connect(self.start_generation)
        self.stop_button.clicked.connect(self.stop)
        form = QFormLayout()
        form.addRow("Max new tokens", self.max_tokens)
        form.addRow("Temperature", self.temperature)
        form.addRow("Top-p", self.top_p)
        form.addRow("Seed", self.seed)
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.stop_button)
        left = QVBoxLayout(prompt_box)
        left.addWidget(self.prompt, 1)
        left.addLayout(form)
        left.addLayout(buttons)

        out_box = QGroupBox("Base model")
        self.output_box = out_box
        self.output = QPlainTextEdit(readOnly=True)
        self.output.setObjectName("output")
        self.output.setPlaceholderText("The reply streams here.")
        self.output_stats = QLabel("")
        self.output_stats.setObjectName("output_stats")
        right = QVBoxLayout(out_box)
        right.addWidget(self.output, 1)
        right.addWidget(self.output_stats)

        split = QSplitter(Qt.Horizontal)
        split.addWidget(prompt_box)
        split.addWidget(out_box)
        split.setStretchFactor(0, 2)
        split.setStretchFactor(1, 3)
        self.splitter = split
        self.setCentralWidget(split)

        self.model_label = QLabel("No model")
        self.memory_label = QLabel("")
        self.progress_label = QLabel("")
        self.progress_bar = QProgressBar(maximumWidth=160, textVisible=False)
        self.progress_bar.setRange(0, 0)  # busy indicator
        self.progress_bar.hide()
        sb = self.statusBar()
        sb.addWidget(self.model_label)
        sb.addWidget(self.progress_bar)
        sb.addWidget(self.progress_label, 1)
        sb.addPermanentWidget(self.memory_label)

    def _build_menus(self) -> None:
        file = self.menuBar().addMenu("&File")
        self.open_folder_action = QAction("Open model &folder...", self, triggered=self.open_model_folder)
        self.open_gguf_action = QAction("Open &GGUF file...", self, triggered=self.open_gguf)
        self.open_hub_action = QAction("Open &hub model id...", self, triggered=self.open_hub_id)
        self.open_embedded_action = QAction("Load the &embedded model", self, triggered=lambda: self.load_model(None))
        for a in (self.open_folder_action, self.open_gguf_action, self.open_hub_action, self.open_embedded_action):
            file.addAction(a)
        file.addSeparator()
        file.addAction(QAction("Show &log file", self, triggered=self.show_log))
        file.addSeparator()
        file.addAction(QAction("&Quit", self, shortcut=QKeySequence.Quit, triggered=self.close))

    # ------------------------------------------------------------------ requests
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

    def sampling_params(self) -> dict:
        return {"max_new_tokens": self.max_tokens.value(), "temperature": self.temperature.value(),
                "top_p": self.top_p.value(), "seed": self.seed.value()}

    def start_generation(self) -> None:
        prompt = self.prompt.toPlainText().strip()
        if not prompt:
            self.show_error("Nothing to generate", "Type a prompt first.")
            return
        if self.model_info is None or self.busy_with:
            return
        self.output.clear()
        self.output_stats.setText("")
        self.last_result = None
        self.host.generate(prompt, self.sampling_params())

    def stop(self) -> None:
        self.host.stop()

    def show_log(self) -> None:
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(log_path())))

    # ------------------------------------------------------------------ worker events
    def _on_busy(self, what: str) -> None:
        self.busy_with = what
        self.progress_bar.setVisible(bool(what))
        if not what:
            self.progress_label.setText("")
        self._update_actions()

    def _on_progress(self, message: str) -> None:
        self.progress_label.setText(message)

    def _on_model_loaded(self, info: dict) -> None:
        self.model_info = info
        self.output_box.setTitle(f"Base model: {info['model']}")
        self.settings.setValue("last_model", info["source"]["ref"] if info["source"]["kind"] != "embedded" else "")
        self._refresh_status()
        self._update_actions()

    def _on_text(self, piece: str) -> None:
        cursor = self.output.textCursor()
        cursor.movePosition(QTextCursor.End)
        cursor.insertText(piece)
        self.output.setTextCursor(cursor)

    def _on_generated(self, result: dict) -> None:
        self.last_result = result
        stopped = " (stopped)" if result["stopped"] else ""
        self.output_stats.setText(f"{result['n_tokens']} tokens · {result['seconds']:.1f} s · "
                                  f"{result['tokens_per_s']:.1f} tokens/s{stopped}")

    def show_error(self, title: str, message: str) -> None:
        """Non-modal, so a failing job never blocks the window (or a test)."""
        box = QMessageBox(QMessageBox.Warning, title, message, QMessageBox.Ok, self)
        box.setAttribute(Qt.WA_DeleteOnClose)
        box.finished.connect(lambda *_: self.error_dialogs.remove(box) if box in self.error_dialogs else None)
        self.error_dialogs.append(box)
        box.open()

    # ------------------------------------------------------------------ state
    def _update_actions(self) -> None:
        idle = not self.busy_with
        self.generate_button.setEnabled(idle and self.model_info is not None)
        self.stop_button.setEnabled(self.busy_with == "Generating")
        for a in (self.open_folder_action, self.open_gguf_action, self.open_hub_action, self.open_embedded_action):
            a.setEnabled(idle)

    def _refresh_status(self) -> None:
        info = self.model_info
        if info:
            self.model_label.setText(f"{info['model']} · {info['layers']} layers · {info['device']} ({info['dtype']})")
        rss = psutil.Process(os.getpid()).memory_info().rss
        text = f"memory {_fmt_bytes(rss)}"
        if info and info["device"].startswith("cuda"):
            import torch

            text += f" · GPU {_fmt_bytes(torch.cuda.memory_allocated())}"
        self.memory_label.setText(text)

    def _restore_settings(self) -> None:
        geometry = self.settings.value("geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        state = self.settings.value("splitter")
        if state is not None:
            self.splitter.restoreState(state)
        for key, box, cast in (("max_new_tokens", self.max_tokens, int), ("temperature", self.temperature, float),
                               ("top_p", self.top_p, float), ("seed", self.seed, int)):
            value = self.settings.value(f"sampling/{key}")
            if value is not None:
                box.setValue(cast(value))

    def _save_settings(self) -> None:
        self.settings.setValue("geometry", self.saveGeometry())
        self.settings.setValue("splitter", self.splitter.saveState())
        for key, value in self.sampling_params().items():
            self.settings.setValue(f"sampling/{key}", value)
        self.settings.sync()

    def closeEvent(self, event) -> None:
        self._save_settings()
        self._memory_timer.stop()
        if not self.host.shutdown():
            log.warning("the worker did not finish within the time limit; exiting anyway")
        super().closeEvent(event)
