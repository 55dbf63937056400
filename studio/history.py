"""The session's history: one entry per comparison, newest first, with its replies and ratings. A blind
comparison not rated yet names no source and shows no reply, since either would tell which column is which.
Double-clicking an entry asks the window to show it again (``opened``)."""

from __future__ import annotations

from typing import Optional

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import QTreeWidget, QTreeWidgetItem

from studio.messages import ComparisonResult, Reply


def replies_of(comparison) -> ComparisonResult:
    """A stored comparison (``engine.store`` row, with its generations) as the window shows it."""
    from engine.store import is_truncated

    params = comparison.params or {}
    limit = params.get("max_new_tokens")
    return ComparisonResult(
        comparison.prompt,
        [Reply(g.label, g.weights, (g.point_x, g.point_y) if g.point_x is not None else None, g.output, g.n_tokens, g.seconds,
               g.n_tokens / g.seconds if g.seconds else 0.0, g.stopped, is_truncated(g, limit), g.id)
         for g in comparison.generations],
        comparison.id, blind=bool(params.get("blind")), max_new_tokens=limit)


def display_prompt(stored: str) -> str:
    """What a person reads as a stored prompt: a chat (a system prompt, turns) is stored as JSON; its last user turn."""
    import json

    from engine.promptsets import prompt_text

    if stored.startswith("[{"):
        try:
            return prompt_text(json.loads(stored))
        except (ValueError, TypeError, KeyError):
            pass
    return stored


class HistoryView(QTreeWidget):
    opened = Signal(object, bool)  # ComparisonResult, whether it has been rated

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setHeaderLabels(["History", "tokens"])
        self.setColumnWidth(0, 520)
        self.itemDoubleClicked.connect(self.open_item)

    def show_session(self, comparisons: list) -> None:
        """Every stored comparison of a session (oldest first, as the store gives them)."""
        self.clear()
        for comp in comparisons:
            self.add(replies_of(comp), list(comp.ratings))

    def add(self, result: ComparisonResult, ratings: Optional[list] = None) -> None:
        ratings = ratings or []
        hidden = result.blind and not ratings
        top = QTreeWidgetItem([display_prompt(result.prompt).replace("\n", " ")[:120], ""])
        top.setData(0, Qt.UserRole, (result, bool(ratings)))
        if hidden:
            QTreeWidgetItem(top, [f"blind comparison of {len(result.columns)} replies: sources are shown once it is rated "
                                  "(double-click to rate it)", ""])
        else:
            for c in result.columns:
                QTreeWidgetItem(top, [f"{c.label}: {c.text.replace(chr(10), ' ')[:160]}", str(c.n_tokens)])
        labels = {c.generation_id: c.label for c in result.columns}
        for i, rating in enumerate(ratings):
            verdict = f"{labels.get(rating.winner_id, '?')} better" if rating.outcome == "winner" else rating.outcome.replace("_", " ")
            replaced = " (replaced by the rating below)" if i < len(ratings) - 1 else ""
            QTreeWidgetItem(top, [f"rating: {verdict}" + (" (blind)" if rating.blind else "")
                                  + (f" · {rating.note}" if rating.note else "") + replaced, ""])
        self.insertTopLevelItem(0, top)

    def open_item(self, item: QTreeWidgetItem, _col: int = 0) -> None:
        while item.parent() is not None:
            item = item.parent()
        data = item.data(0, Qt.UserRole)
        if data:
            self.opened.emit(*data)
