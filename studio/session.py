"""The open session, without widgets: which session it is, what it keeps (the plane, the directions, the
columns), how a stored one is restored, and the ratings made in it. The window shows what this decides.

Restoring a session is asynchronous (the worker loads the model, then each direction): ``open`` returns what
to load, ``direction_done`` counts the answers, and ``finish`` returns the settings to apply once the last one
has come. Directions that did not load this time stay in the session (``unrestored``) so that they load again
once their files are back.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from engine.errors import TsdpoError


@dataclass
class Restore:
    """A stored session being reopened."""

    settings: dict
    pins: dict[str, tuple[float, float]]
    model_ref: dict
    model_fingerprint: Optional[str]
    waiting: int = 0  # directions asked of the worker and not answered yet
    pin_weights: dict[str, dict] = field(default_factory=dict)  # the mix each pin named ({} for pins from before)


@dataclass
class SessionController:
    store: object  # engine.store.Store, or None when the database cannot be used
    demo_directions: Optional[Path] = None  # where shipped demo directions are found when a checkout has moved
    session_id: Optional[int] = None
    name: str = ""
    unrestored: list[dict] = field(default_factory=list)  # the session's directions that did not load
    restore: Optional[Restore] = None

    @property
    def saving(self) -> bool:
        return self.store is not None and self.session_id is not None

    # ------------------------------------------------------------------ new and open
    def create(self, model_source: dict, fingerprint: str) -> int:
        """A new session for the loaded model (raises TsdpoError when the database refuses)."""
        row = self.store.create_session(time.strftime("Session %Y-%m-%d %H:%M"), model_source, fingerprint, {})
        self.session_id, self.name, self.unrestored, self.restore = row.id, row.name, [], None
        return row.id

    def open(self, session_id: int) -> Restore:
        """Start restoring a stored session (raises TsdpoError when it cannot be read)."""
        row = self.store.session(session_id)
        self.session_id, self.name = row.id, row.name
        self.restore = Restore(dict(row.settings or {}), {p.name: (p.x, p.y) for p in row.pinned}, dict(row.model_ref or {}),
                               row.model_fingerprint, pin_weights={p.name: dict(p.weights or {}) for p in row.pinned})
        return self.restore

    def directions_to_load(self, loaded: set[str]) -> list[tuple[str, str]]:
        """(path, name) of each direction of the session being restored that is not loaded yet."""
        wanted = [d for d in self.restore.settings.get("directions", []) if d["name"] not in loaded]
        self.restore.waiting = len(wanted)
        out = []
        for d in wanted:
            path = Path(d["path"])
            if not path.is_file() and self.demo_directions is not None and (self.demo_directions / path.name).is_file():
                path = self.demo_directions / path.name  # a shipped demo direction, from a checkout that has moved
            out.append((str(path), d["name"]))
        return out

    def direction_done(self) -> None:
        """The worker answered one of the requests (loaded it, or could not)."""
        if self.restore is not None:
            self.restore.waiting -= 1

    def ready(self) -> bool:
        return self.restore is not None and self.restore.waiting <= 0

    def finish(self, loaded: set[str]) -> dict:
        """End the restore: the settings to apply, with the directions that did not load kept aside."""
        settings = self.restore.settings
        self.restore = None
        self.unrestored = [d for d in settings.get("directions", []) if d["name"] not in loaded]
        return settings

    def abandon(self) -> None:
        """The session's model did not load: its history stays shown, nothing else is restored."""
        self.restore = None

    # ------------------------------------------------------------------ what it keeps
    def settings(self, directions: dict[str, str], plane: dict, point: tuple[float, float], columns: list[str],
                 n_columns: int) -> dict:
        """What the session stores: ``directions`` maps each loaded direction's name to its file."""
        loaded = [{"name": n, "path": p} for n, p in directions.items() if p]
        # Directions the session had but that did not load this time (a file moved, a disk not mounted) stay in it.
        kept = [d for d in self.unrestored if d["name"] not in directions]
        return {"directions": loaded + kept, "plane": plane, "point": list(point), "columns": columns, "n_columns": n_columns}

    def save(self, settings: dict) -> bool:
        """Store the settings; False while a restore is under way (nothing to save yet) or without a session."""
        if not self.saving or self.restore is not None:
            return False
        self.store.update_session(self.session_id, settings=settings)
        return True

    def pin(self, pins: dict[str, tuple[float, float]], mixes: Optional[dict[str, dict]] = None) -> None:
        if self.saving:
            for name, (x, y) in pins.items():
                self.store.pin_point(self.session_id, name, x, y, (mixes or {}).get(name))

    def history(self) -> list:
        return self.store.history(self.session_id) if self.saving else []

    # ------------------------------------------------------------------ ratings
    def rate(self, comparison_id: int, outcome: str, winner_id: Optional[int], scores: dict, note: str, blind: bool):
        """Save a rating; returns (the new rating, the rating it replaces or None)."""
        earlier = self.store.ratings(comparison_id)
        row = self.store.add_rating(comparison_id, outcome, winner_id=winner_id, scores=scores, note=note, blind=blind)
        return row, (earlier[-1] if earlier else None)

    def undo_rating(self, rating_id: int):
        """Take a changed rating back; returns the rating that counts again (or None)."""
        return self.store.undo_rating(rating_id)


def saved_point(settings: dict) -> tuple[float, float]:
    """The point a session stored, refused unless it is two finite numbers."""
    try:
        point = tuple(float(v) for v in settings.get("point", (0.0, 0.0)))
    except (TypeError, ValueError):
        point = ()
    if len(point) != 2 or not all(math.isfinite(v) for v in point):
        raise TsdpoError(f"The saved point {settings.get('point')} is not two finite numbers; the point starts at the origin.")
    return point
