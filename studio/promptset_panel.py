"""The prompt-set grid: a prompt set run through the columns chosen in the Compare tab, one row per prompt as it
finishes, each cell with its reply, length and time. Double-clicking a row opens it side by side for rating.

Blind runs shuffle each row's columns and name no source, in the headers or the cells, until that row is rated;
then its cells say which source wrote them."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QHeaderView, QLabel, QLineEdit, QPushButton,
                               QSpinBox, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

from engine.promptsets import prompt_text

SHIPPED_PROMPTS = Path(__file__).resolve().parents[1] / "assets" / "data" / "eval_prompts.jsonl"
LETTERS = "ABCD"
PREVIEW = 140  # characters of a reply shown in its cell (the whole reply is a tooltip and opens side by side)


class PromptSetPanel(QWidget):
    runRequested = Signal(str, int)  # path, limit (0: all)
    stopRequested = Signal()
    openRow = Signal(int, list)  # comparison id, the row's display order (slot -> request column)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.path = QLineEdit(str(SHIPPED_PROMPTS))
        self.path.setObjectName("prompt_set_path")
        self.path.setToolTip("A .jsonl ('prompt' text or chat messages, or 'messages'), .csv ('prompt' column) or .txt "
                             "(one prompt per line). The default is the shipped set of 20 evaluation prompts.")
        browse = QPushButton("Browse...")
        browse.setToolTip("Choose a prompt set file")
        browse.clicked.connect(self._browse)
        self.limit = QSpinBox(minimum=0, maximum=100_000, value=0)
        self.limit.setSpecialValueText("all")
        self.limit.setToolTip("Run only the first N prompts (all: the whole set)")
        self.run_button = QPushButton("Run the prompt set")
        self.run_button.setObjectName("run_prompt_set")
        self.run_button.setToolTip("Every prompt through the columns chosen in the Compare tab (base, pins, the point, "
                                   "baselines), with the sampling settings there; each row is saved in the session")
        self.run_button.clicked.connect(lambda: self.runRequested.emit(self.path.text().strip(), self.limit.value()))
        self.stop_button = QPushButton("Stop")
        self.stop_button.setToolTip("Stop after the prompt in progress; the rows done are kept")
        self.stop_button.clicked.connect(self.stopRequested.emit)
        self.stop_button.setEnabled(False)
        self.summary = QLabel("Columns: as chosen in the Compare tab. Double-click a row to rate it side by side.")
        self.summary.setObjectName("prompt_set_summary")
        self.summary.setWordWrap(True)
        self.table = QTableWidget(0, 1)
        self.table.setObjectName("prompt_set_grid")
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setWordWrap(True)
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.Stretch)
        self.table.cellDoubleClicked.connect(self._open)
        self.table.setHorizontalHeaderLabels(["prompt"])
        top = QHBoxLayout()
        top.addWidget(QLabel("Prompt set"))
        top.addWidget(self.path, 1)
        top.addWidget(browse)
        top.addWidget(QLabel("prompts"))
        top.addWidget(self.limit)
        top.addWidget(self.run_button)
        top.addWidget(self.stop_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(top)
        lay.addWidget(self.summary)
        lay.addWidget(self.table, 1)
        self.labels: list[str] = []
        self.blind = False
        self.rows: list[dict] = []  # {"comparison_id", "order", "columns", "rated"}

    def _browse(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "A prompt set", str(Path(self.path.text()).parent),
                                              "Prompt sets (*.jsonl *.json *.csv *.txt)")
        if path:
            self.path.setText(path)

    # ------------------------------------------------------------------ a run
    def start(self, labels: list[str], blind: bool) -> None:
        self.labels, self.blind, self.rows = list(labels), blind, []
        self.table.clear()
        self.table.setRowCount(0)
        self.table.setColumnCount(1 + len(labels))
        heads = ["prompt", *(LETTERS[i] if blind else f"{LETTERS[i]}: {label}" for i, label in enumerate(labels))]
        self.table.setHorizontalHeaderLabels(heads)
        self.table.horizontalHeader().setSectionResizeMode(0, QHeaderView.Interactive)
        self.table.setColumnWidth(0, 220)
        self.run_button.setEnabled(False)
        self.stop_button.setEnabled(True)
        self.summary.setText(("Blind: each row's columns are shuffled and unnamed until it is rated. " if blind else "")
                             + "Rows appear as they finish; double-click one to rate it side by side.")

    def add_row(self, row) -> None:
        """One finished row (``engine.promptsets.Row``)."""
        order = list(range(len(row.columns)))
        if self.blind:
            random.shuffle(order)
        entry = {"comparison_id": row.comparison_id, "order": order, "columns": row.columns, "rated": None}
        self.rows.append(entry)
        r = self.table.rowCount()
        self.table.insertRow(r)
        prompt = QTableWidgetItem(" ".join(prompt_text(row.prompt).split()))
        prompt.setToolTip(prompt_text(row.prompt))
        if row.comparison_id is None:
            prompt.setText(prompt.text() + "  (not saved: cannot be rated)")
        self.table.setItem(r, 0, prompt)
        self._fill(r)

    def _fill(self, r: int) -> None:
        entry = self.rows[r]
        for slot, col in enumerate(entry["order"]):
            c = entry["columns"][col]
            cut = " · stopped" if c["stopped"] else " · cut at the limit" if c["truncated"] else ""
            text = " ".join(c["text"].split())
            preview = text[:PREVIEW] + ("…" if len(text) > PREVIEW else "")
            named = not self.blind or entry["rated"] is not None
            head = f"[{c['label']}] " if self.blind and named else ""
            item = QTableWidgetItem(f"{head}{preview}\n{c['n_tokens']} tokens · {c['seconds']:.1f} s{cut}")
            item.setToolTip(c["text"])
            item.setData(Qt.UserRole, c["n_tokens"])
            self.table.setItem(r, 1 + slot, item)

    def finished(self, summary: str) -> None:
        self.run_button.setEnabled(True)
        self.stop_button.setEnabled(False)
        self.summary.setText(summary + ". Double-click a row to rate it side by side.")

    def mark_rated(self, comparison_id: int, verdict: str) -> None:
        """A row was rated (in the Compare tab): name its sources, and say the verdict."""
        for r, entry in enumerate(self.rows):
            if entry["comparison_id"] == comparison_id:
                entry["rated"] = verdict
                self._fill(r)
                self.table.item(r, 0).setText(" ".join(self.table.item(r, 0).toolTip().split()) + f"  ✓ {verdict}")

    def row_of(self, comparison_id: int) -> Optional[dict]:
        return next((e for e in self.rows if e["comparison_id"] == comparison_id), None)

    def _open(self, r: int, _col: int) -> None:
        entry = self.rows[r]
        if entry["comparison_id"] is not None:
            self.openRow.emit(entry["comparison_id"], list(entry["order"]))
