"""The Ratings tab: what the ratings add up to (``engine.ratings``), per source, blind and unblind apart, filtered by
session, prompt set and date; a bar chart of the win rates with their intervals; CSV and plot exports; and the
ratings as the data of the next direction."""

from __future__ import annotations

from datetime import datetime, time as dtime, timezone
from typing import Optional

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QDate, Signal
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QDateEdit, QHBoxLayout, QHeaderView, QLabel,
                               QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout, QWidget)

GROUPS = {"All ratings": "all", "Blind ratings": "blind", "Unblind ratings": "unblind"}
ALL_SETS = "(every prompt and prompt set)"
HEADERS = ["source", "wins", "ties", "losses", "both bad", "win rate", "95% interval", "Bradley-Terry", "95% interval"]


class RatingsView(QWidget):
    refreshRequested = Signal()
    exportCsvRequested = Signal()
    savePlotRequested = Signal()
    trainRequested = Signal(bool)  # leave out cut-off replies

    def __init__(self, parent=None):
        super().__init__(parent)
        self.scope = QComboBox()
        self.scope.addItems(["This session", "All sessions"])
        self.scope.setToolTip("Count the ratings of the open session only, or of every session in the database")
        self.prompt_set = QComboBox()
        self.prompt_set.setObjectName("ratings_prompt_set")
        self.prompt_set.addItem(ALL_SETS)
        self.prompt_set.setToolTip("Only the comparisons of one prompt set (single comparisons belong to none)")
        self.since_on = QCheckBox("since")
        self.since_on.setToolTip("Only ratings made on or after this day (UTC)")
        self.since = QDateEdit(QDate.currentDate())
        self.since.setCalendarPopup(True)
        self.since.setDisplayFormat("yyyy-MM-dd")
        self.since.setEnabled(False)
        self.since.setToolTip("The first day (UTC) whose ratings count")
        self.since_on.toggled.connect(self.since.setEnabled)
        self.group = QComboBox()
        self.group.setObjectName("ratings_group")
        self.group.addItems(list(GROUPS))
        self.group.setToolTip("Blind ratings (sources hidden while rating) and unblind ones are counted apart as well")
        for w in (self.scope, self.prompt_set, self.group):
            w.currentIndexChanged.connect(lambda *_: self.refreshRequested.emit())
        self.since_on.toggled.connect(lambda *_: self.refreshRequested.emit())
        self.since.dateChanged.connect(lambda *_: self.refreshRequested.emit())
        refresh = QPushButton("Refresh")
        refresh.setToolTip("Count again (ratings made since are included)")
        refresh.clicked.connect(self.refreshRequested.emit)

        self.table = QTableWidget(0, len(HEADERS))
        self.table.setObjectName("ratings_table")
        self.table.setHorizontalHeaderLabels(HEADERS)
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.horizontalHeader().setStretchLastSection(True)
        self.table.setToolTip("Each rated comparison of k columns is k(k-1)/2 games: the winner beats every other "
                              "column; a tie or 'both bad' ties every two. Win rate counts ties half; its interval is "
                              "Wilson's. Bradley-Terry strengths are relative to the base model when it played.")
        self.attributes = QLabel("")
        self.attributes.setObjectName("ratings_attributes")
        self.attributes.setWordWrap(True)
        self.note = QLabel("")
        self.note.setWordWrap(True)
        self.plot = pg.PlotWidget(background=None)
        self.plot.setObjectName("ratings_plot")
        self.plot.setMinimumHeight(150)
        self.plot.setMenuEnabled(False)
        self.plot.setMouseEnabled(False, False)
        self.plot.setLabel("left", "win rate")
        self.plot.setYRange(0, 1)
        self.plot.addLegend(offset=(-10, 10))

        csv = QPushButton("Export CSV...")
        csv.setToolTip("One row per rated column: prompt, prompt set, time, blind, outcome, source, won, scores")
        csv.clicked.connect(self.exportCsvRequested.emit)
        save = QPushButton("Save the plot...")
        save.setToolTip("The win rates with their intervals as a PNG (the same chart tsdpo ratings --plot writes)")
        save.clicked.connect(self.savePlotRequested.emit)
        self.exclude_cut = QCheckBox("leave out cut-off replies")
        self.exclude_cut.setChecked(True)
        self.exclude_cut.setToolTip("Pairs where a reply reached the token limit or was stopped are left out of the "
                                    "training data (unchecked: kept, and flagged in the file)")
        self.train_button = QPushButton("Train a direction from these ratings...")
        self.train_button.setObjectName("train_from_ratings")
        self.train_button.setToolTip("The session's rated pairs (winner over each other column) as TRL preference data, "
                                     "in the training dialog")
        self.train_button.clicked.connect(lambda: self.trainRequested.emit(self.exclude_cut.isChecked()))

        filters = QHBoxLayout()
        for w in (self.scope, self.prompt_set, self.since_on, self.since, self.group):
            filters.addWidget(w)
        filters.addStretch(1)
        filters.addWidget(refresh)
        actions = QHBoxLayout()
        actions.addWidget(csv)
        actions.addWidget(save)
        actions.addStretch(1)
        actions.addWidget(self.exclude_cut)
        actions.addWidget(self.train_button)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addLayout(filters)
        lay.addWidget(self.table, 2)
        lay.addWidget(self.attributes)
        lay.addWidget(self.plot, 2)
        lay.addWidget(self.note)
        lay.addLayout(actions)
        self.report: Optional[dict] = None

    # ------------------------------------------------------------------ filters
    def filters(self, session_id: Optional[int]) -> dict:
        since = None
        if self.since_on.isChecked():
            d = self.since.date()
            since = datetime.combine(datetime(d.year(), d.month(), d.day()).date(), dtime(0), tzinfo=timezone.utc)
        pset = self.prompt_set.currentText()
        return {"session_id": session_id if self.scope.currentIndex() == 0 else None,
                "prompt_set": None if pset == ALL_SETS else pset, "since": since}

    def set_prompt_sets(self, names: list[str]) -> None:
        current = self.prompt_set.currentText()
        self.prompt_set.blockSignals(True)
        self.prompt_set.clear()
        self.prompt_set.addItems([ALL_SETS, *names])
        self.prompt_set.setCurrentText(current if current in names else ALL_SETS)
        self.prompt_set.blockSignals(False)

    # ------------------------------------------------------------------ showing a report
    def show_report(self, report: dict) -> None:
        self.report = report
        group = report[GROUPS[self.group.currentText()]]
        sources = group["sources"]
        order = sorted(sources, key=lambda n: -(sources[n]["win_rate"] or 0))
        self.table.setRowCount(len(order))
        for r, name in enumerate(order):
            e = sources[name]
            bt = e["bradley_terry"]
            cells = [name, e["wins"], e["ties"], e["losses"], e["both_bad"],
                     "-" if e["win_rate"] is None else f"{e['win_rate']:.3f}",
                     "-" if e["interval"] is None else f"{e['interval'][0]:.3f} to {e['interval'][1]:.3f}",
                     "-" if bt is None else f"{bt['strength']:+.3f}",
                     "-" if bt is None else f"{bt['interval'][0]:+.2f} to {bt['interval'][1]:+.2f}"]
            for c, v in enumerate(cells):
                self.table.setItem(r, c, QTableWidgetItem(str(v)))
        attrs = [f"{name}: " + ", ".join(f"{a} {v['mean']:.2f} (n={v['n']})" for a, v in per.items())
                 for name, per in group["attributes"].items()]
        self.attributes.setText("Scores (means): " + "; ".join(attrs) if attrs else "No attribute scores given.")
        ref = next((e["bradley_terry"]["reference"] for e in sources.values() if e["bradley_terry"]), None)
        self.note.setText(f"{group['comparisons']} rated comparisons, {group['games']} games"
                          + (f"; Bradley-Terry strengths relative to {ref}" if ref else "")
                          + f". Blind: {report['blind']['comparisons']}, unblind: {report['unblind']['comparisons']}.")
        self._plot(report)

    def _plot(self, report: dict) -> None:
        from engine.ratings import win_rate_bars

        self.plot.clear()
        width = 0.38
        names, groups = win_rate_bars(report, width)
        for (group, xs, ys, lo, hi), colour in zip(groups, ((59, 111, 182), (217, 138, 43))):
            if xs:
                self.plot.addItem(pg.BarGraphItem(x=xs, height=ys, width=width, brush=pg.mkBrush(*colour),
                                                  name=f"{group} ({report[group]['comparisons']})"))
                self.plot.addItem(pg.ErrorBarItem(x=np.array(xs), y=np.array(ys), top=np.array(hi), bottom=np.array(lo),
                                                  beam=0.1, pen=pg.mkPen((90, 90, 90))))
        self.plot.addItem(pg.InfiniteLine(0.5, angle=0, pen=pg.mkPen((140, 140, 140), style=pg.QtCore.Qt.DashLine)))
        self.plot.getAxis("bottom").setTicks([list(enumerate(names))])
        self.plot.setXRange(-0.7, max(len(names) - 0.3, 0.7))
        self.plot.setYRange(0, 1)
