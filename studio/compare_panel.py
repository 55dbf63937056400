"""Side-by-side columns, each chosen from base / the point / a pinned point / a scalarized point / steering only,
streamed as the worker generates, with the rating bar underneath.

Blind mode shuffles the columns and hides what produced them until the rating is saved: no header, line,
tooltip or history entry names a source before then. On the reveal each column's header names the source of
the text under it. Rating a comparison again is an edit, shown with an Undo.
"""

from __future__ import annotations

import difflib
import random
import re
from typing import Callable, Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor, QKeySequence, QShortcut, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (QApplication, QCheckBox, QComboBox, QFrame, QGridLayout, QHBoxLayout, QLabel, QLineEdit,
                               QPlainTextEdit, QPushButton, QSpinBox, QTextEdit, QVBoxLayout, QWidget)

from engine.generation import Column
from studio.messages import ComparisonResult, Reply

BASE, POINT, STEERING = "Base model", "Mix at the point", "Steering only, at the point"
LETTERS = "ABCD"


def word_diff(a: str, b: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Character spans of the words that differ between two replies: in ``a`` the words ``b`` replaced or dropped, in
    ``b`` the words it replaced or added (word by word, as difflib matches them)."""
    wa = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", a)]
    wb = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", b)]
    spans_a, spans_b = [], []
    matcher = difflib.SequenceMatcher(None, [w for *_, w in wa], [w for *_, w in wb], autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op in ("replace", "delete") and i2 > i1:
            spans_a.append((wa[i1][0], wa[i2 - 1][1]))
        if op in ("replace", "insert") and j2 > j1:
            spans_b.append((wb[j1][0], wb[j2 - 1][1]))
    return spans_a, spans_b


class ColumnView(QFrame):
    def __init__(self, index: int, parent=None):
        super().__init__(parent)
        self.index = index
        self.setFrameShape(QFrame.StyledPanel)
        self.source = QComboBox()
        self.source.setObjectName(f"column_source_{index}")
        self.title = QLabel(f"<b>{LETTERS[index]}</b>")
        self.text = QPlainTextEdit(readOnly=True)
        self.text.setObjectName(f"column_text_{index}")
        self.text.setToolTip("The reply, streamed as it is generated")
        self.stats = QLabel("")
        self.stats.setWordWrap(True)
        self.copy = QPushButton("Copy")
        self.copy.setObjectName(f"copy_{index}")
        self.copy.setToolTip("Copy this column's reply to the clipboard")
        self.copy.clicked.connect(lambda: QApplication.clipboard().setText(self.text.toPlainText()))
        self.source.setToolTip("What this column generates: the base model, the mix at the point, a pinned point's mix, "
                               "a scalarized-DPO baseline, or the steering part of the point's mix")
        self.scores: dict[str, QSpinBox] = {}
        self.scores_row = QHBoxLayout()
        head = QHBoxLayout()
        head.addWidget(self.title)
        head.addWidget(self.source, 1)
        head.addWidget(self.copy)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(head)
        lay.addWidget(self.text, 1)
        lay.addWidget(self.stats)
        lay.addLayout(self.scores_row)

    def set_attributes(self, attributes: list[str]) -> None:
        while self.scores_row.count():
            w = self.scores_row.takeAt(0).widget()
            if w is not None:  # detach now: until deleteLater runs, a parented widget still paints over the column
                w.hide()
                w.setParent(None)
                w.deleteLater()
        self.scores = {}
        for a in attributes:
            box = QSpinBox(minimum=0, maximum=5, value=0)
            box.setSpecialValueText("–")
            box.setToolTip(f"{a}: 1 (worst) to 5 (best); – leaves it unscored")
            self.scores_row.addWidget(QLabel(a))
            self.scores_row.addWidget(box)
            self.scores[a] = box
        self.scores_row.addStretch(1)

    def clear_output(self) -> None:
        self.text.setExtraSelections([])
        self.text.clear()
        self.stats.setText("")
        for box in self.scores.values():
            box.setValue(0)

    def highlight(self, spans: list[tuple[int, int]]) -> None:
        """Mark these character spans (the words another column differs in); [] clears."""
        fmt = QTextCharFormat()
        fmt.setBackground(QColor(255, 214, 102, 150))
        marks = []
        for start, end in spans:
            sel = QTextEdit.ExtraSelection()
            cur = QTextCursor(self.text.document())
            cur.setPosition(start)
            cur.setPosition(end, QTextCursor.KeepAnchor)
            sel.cursor, sel.format = cur, fmt
            marks.append(sel)
        self.text.setExtraSelections(marks)

    def append(self, piece: str) -> None:
        cursor = self.text.textCursor()
        cursor.movePosition(QTextCursor.End)
        cursor.insertText(piece)


class ComparePanel(QWidget):
    rated = Signal(dict)  # {"outcome", "winner_column", "scores": {column: {attr: n}}, "note", "blind"}
    undoRequested = Signal()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.columns = [ColumnView(i) for i in range(4)]
        self.n_columns = QSpinBox(minimum=2, maximum=4, value=2)
        self.n_columns.setObjectName("n_columns")
        self.n_columns.valueChanged.connect(self._show_columns)
        self.blind = QCheckBox("Blind (shuffle, hide labels until rated)")
        self.blind.setObjectName("blind")
        self.blind.setToolTip("Shuffle the columns and hide what made each one until you rate: your rating cannot "
                              "lean on the label. Blind and unblind ratings are counted apart in the Ratings tab.")
        self.n_columns.setToolTip("How many columns to generate side by side (one batch where the mix allows)")
        self.diff = QCheckBox("Highlight differences from A")
        self.diff.setObjectName("highlight_diff")
        self.diff.setToolTip("Mark, word by word, where each column differs from column A (and in A, what the others "
                             "replaced)")
        self.diff.toggled.connect(self.refresh_diff)
        grid = QGridLayout()
        for i, c in enumerate(self.columns):
            grid.addWidget(c, 0, i)
        self.grid = grid
        self.order: list[int] = list(range(4))  # display slot -> request column (shuffled when blind)
        self.sources: Optional[list[str]] = None  # request column -> the source chosen for it when it started
        self.last: Optional[ComparisonResult] = None  # the finished comparison shown now
        self.revealed = True

        self.rate_buttons = []
        bar = QHBoxLayout()
        bar.addWidget(QLabel("Better:"))
        for i in range(4):
            b = QPushButton(f"{LETTERS[i]}  (Ctrl+{i + 1})")
            b.setObjectName(f"rate_{LETTERS[i]}")
            b.setToolTip(f"Column {LETTERS[i]} is the best reply (saved at once; rating again is an edit you can undo)")
            b.clicked.connect(lambda _=False, i=i: self.rate("winner", i))
            bar.addWidget(b)
            self.rate_buttons.append(b)
        self.tie_button = QPushButton("Tie  (Ctrl+T)")
        self.tie_button.setToolTip("The replies are equally good")
        self.tie_button.clicked.connect(lambda: self.rate("tie"))
        self.bad_button = QPushButton("Both bad  (Ctrl+B)")
        self.bad_button.setToolTip("None of the replies is acceptable (counted as a tie between them, and as 'both bad')")
        self.bad_button.clicked.connect(lambda: self.rate("both_bad"))
        bar.addWidget(self.tie_button)
        bar.addWidget(self.bad_button)
        self.note = QLineEdit(placeholderText="Note (optional)")
        self.note.setObjectName("note")
        self.note.setToolTip("A note kept with the rating (an empty note keeps the one written before)")
        bar.addWidget(self.note, 1)
        self.rating_status = QLabel("")
        self.rating_status.setObjectName("rating_status")
        self.undo_button = QPushButton("Undo the change")
        self.undo_button.setObjectName("undo_rating")
        self.undo_button.setToolTip("Take the new rating back; the earlier one counts again")
        self.undo_button.clicked.connect(self.undoRequested.emit)
        self.undo_button.hide()
        self.shortcuts = []
        # With Ctrl, so typing a prompt or a note never rates by accident.
        for key, fn in [*((f"Ctrl+{i + 1}", lambda i=i: self.rate("winner", i)) for i in range(4)),
                        ("Ctrl+T", lambda: self.rate("tie")), ("Ctrl+B", lambda: self.rate("both_bad"))]:
            sc = QShortcut(QKeySequence(key), self, activated=fn, context=Qt.WindowShortcut)
            self.shortcuts.append(sc)

        top = QHBoxLayout()
        top.addWidget(QLabel("Columns"))
        top.addWidget(self.n_columns)
        top.addWidget(self.blind)
        top.addWidget(self.diff)
        top.addStretch(1)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(top)
        lay.addLayout(grid, 1)
        lay.addLayout(bar)
        status = QHBoxLayout()
        status.addWidget(self.rating_status, 1)
        status.addWidget(self.undo_button)
        lay.addLayout(status)
        self._show_columns()
        self._enable_rating(False)

    # ------------------------------------------------------------------ sources
    def set_sources(self, pinned: list[str], scalarized: list[str], has_steering: bool) -> None:
        items = [BASE, POINT, *(f"Pinned: {p}" for p in pinned), *(f"Scalarized: {s}" for s in scalarized)]
        if has_steering:
            items.append(STEERING)
        for i, c in enumerate(self.columns):
            current = c.source.currentText()
            c.source.blockSignals(True)
            c.source.clear()
            c.source.addItems(items)
            default = [BASE, POINT, *(f"Pinned: {p}" for p in pinned), BASE][min(i, 2 + len(pinned))]
            c.source.setCurrentText(current if current in items else default)
            c.source.blockSignals(False)

    def _fresh_source(self, i: int) -> None:
        """A column just shown gets a source no column before it uses: a pin, a baseline, steering only, the point,
        the base, in that order; the base again only when everything is in use."""
        used = {self.columns[k].source.currentText() for k in range(i)}
        combo = self.columns[i].source
        if combo.currentText() not in used:
            return
        items = [combo.itemText(k) for k in range(combo.count())]
        rank = [x for x in items if x.startswith("Pinned: ")] + [x for x in items if x.startswith("Scalarized: ")] + \
               [x for x in items if x == STEERING] + [POINT, BASE]
        fresh = next((x for x in rank if x in items and x not in used), None)
        if fresh is not None:
            combo.setCurrentText(fresh)

    def choose(self, sources: list[str], n_columns: Optional[int] = None) -> None:
        """Show ``n_columns`` columns (default: one per source) with these sources, in order."""
        self.n_columns.setValue(max(1, n_columns or len(sources)))
        for view, src in zip(self.columns, sources):
            view.source.setCurrentText(src)

    def chosen_sources(self) -> list[str]:
        return [self.columns[i].source.currentText() for i in range(self.n_columns.value())]

    def set_attributes(self, attributes: list[str]) -> None:
        for c in self.columns:
            c.set_attributes(attributes)

    # ------------------------------------------------------------------ a run
    def start(self, labels: list[str], sources: Optional[list[str]] = None, blind: Optional[bool] = None,
              order: Optional[list[int]] = None) -> None:
        """A new comparison: clear, shuffle when blind, and show headers (or hide them).

        ``sources``: the dropdown choice behind each request column, so the reveal can name them; ``blind``
        overrides the checkbox (a blind comparison reopened from the history stays blind); ``order`` (slot ->
        request column) keeps the shuffle a prompt-set grid showed."""
        n = len(labels)
        blind = self.blind.isChecked() if blind is None else blind
        self.order = list(order) if order is not None and sorted(order) == list(range(n)) else list(range(n))
        if blind and order is None:
            random.shuffle(self.order)
        self.revealed = not blind
        self.sources = list(sources) if sources is not None else None
        self.last = None
        for slot in range(n):
            col = self.columns[slot]
            col.clear_output()
            col.source.setVisible(self.revealed)
        self.rating_status.setText("")
        self.undo_button.hide()
        self._enable_rating(False)

    def slot_of(self, request_column: int) -> int:
        return self.order.index(request_column)

    def append(self, request_column: int, piece: str) -> None:
        self.columns[self.slot_of(request_column)].append(piece)

    def finish(self, result: ComparisonResult) -> None:
        self.last = result
        for i, col in enumerate(result.columns):
            view = self.columns[self.slot_of(i)]
            view.text.setPlainText(col.text)
            self._stats(view, col, hidden=not self.revealed)
        self._enable_rating(result.comparison_id is not None)
        self.refresh_diff()

    def refresh_diff(self, *_) -> None:
        """Word-level differences of each shown column from column A (cleared when the box is off)."""
        n = len(self.last.columns) if self.last else 0
        for c in self.columns:
            c.highlight([])
        if not self.diff.isChecked() or n < 2:
            return
        a = self.columns[0].text.toPlainText()
        in_a: list[tuple[int, int]] = []
        for slot in range(1, n):
            spans_a, spans_b = word_diff(a, self.columns[slot].text.toPlainText())
            in_a += spans_a
            self.columns[slot].highlight(spans_b)
        self.columns[0].highlight(sorted(set(in_a)))

    def _stats(self, view: ColumnView, col: Reply, hidden: bool) -> None:
        stop = " (stopped)" if col.stopped else " (cut at the token limit)" if col.truncated else ""
        line = f"{col.n_tokens} tokens · {col.tokens_per_s:.1f} tokens/s{stop}"
        if not hidden:
            w = col.weights
            line += "<br>" + (f"{col.label}: " + ", ".join(f"{k} {v:+.2f}" for k, v in w.items()) if w else col.label)
        view.stats.setText(line)

    def rate(self, outcome: str, slot: Optional[int] = None) -> None:
        if self.last is None or self.last.comparison_id is None:
            return
        n = len(self.last.columns)
        if slot is not None and slot >= n:
            return
        scores = {}
        for s in range(n):
            vals = {a: b.value() for a, b in self.columns[s].scores.items() if b.value() > 0}
            if vals:
                scores[self.order[s]] = vals
        self.rated.emit({"outcome": outcome, "winner_column": None if slot is None else self.order[slot],
                         "scores": scores, "note": self.note.text().strip(), "blind": not self.revealed})

    def rating_saved(self, text: str, undoable: bool = False) -> None:
        """Called by the window once the rating is on disk: reveal what blind mode hid.

        Each slot's dropdown is set to the source of the text shown under it (the texts stay where they were
        rated), so header, dropdown and the line under the text all name the same, true source."""
        self.rating_status.setText(text)
        self.undo_button.setVisible(undoable)
        self.note.clear()
        if not self.revealed and self.last is not None:
            self.revealed = True
            for slot, request_column in enumerate(self.order[:len(self.last.columns)]):
                view = self.columns[slot]
                if self.sources is not None:  # unknown for a comparison reopened from the history: the line below says it
                    view.source.blockSignals(True)
                    view.source.setCurrentText(self.sources[request_column])
                    view.source.blockSignals(False)
                    view.source.setVisible(True)
                self._stats(view, self.last.columns[request_column], hidden=False)

    def letter_of(self, request_column: int) -> str:
        return LETTERS[self.slot_of(request_column)]

    def _enable_rating(self, on: bool) -> None:
        n = len(self.last.columns) if self.last else self.n_columns.value()
        for i, b in enumerate(self.rate_buttons):
            b.setEnabled(on and i < n)
            b.setVisible(i < self.n_columns.value())
        self.tie_button.setEnabled(on)
        self.bad_button.setEnabled(on)

    def _show_columns(self) -> None:
        n = self.n_columns.value()
        for i, c in enumerate(self.columns):
            if i < n and not c.isVisibleTo(self) and i > 0:
                self._fresh_source(i)
            c.setVisible(i < n)
        self._enable_rating(self.last is not None and self.last.comparison_id is not None)


def column_request(source: str, point: tuple[float, float], weights: dict[str, float], pins: dict,
                   pin_weights: Callable[[str], dict], labels: dict[str, str]) -> Column:
    """What the worker generates for one column chosen as ``source`` (``labels``: direction name -> steering,
    tangent or scalarized; ``pin_weights``: the mix a pin names)."""
    if source == BASE:
        return Column("base")
    if source == POINT:
        return Column(f"point ({point[0]:+.2f}, {point[1]:+.2f})", dict(weights), tuple(point))
    if source == STEERING:
        return Column("steering only", {k: v for k, v in weights.items() if labels.get(k) == "steering"}, tuple(point))
    if source.startswith("Pinned: "):
        name = source[len("Pinned: "):]
        return Column(f"pinned {name}", pin_weights(name), tuple(pins[name]))
    if source.startswith("Scalarized: "):
        name = source[len("Scalarized: "):]
        return Column(f"scalarized {name}", {name: 1.0})
    raise ValueError(source)
