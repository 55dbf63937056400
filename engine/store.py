"""Sessions, directions, generations and ratings in SQLite, through SQLAlchemy 2.

The schema is versioned with ``PRAGMA user_version`` and ordered migrations; an older database is
backed up and migrated, never wiped. A file that is not ours, damaged, or from a newer version is left
untouched with a clear error. Every write is its own short transaction, so a rating is on disk the
moment ``add_rating`` returns. A Store may be shared between threads: each call opens its own Session.
"""

from __future__ import annotations

import json
import sqlite3
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterator, Optional

from sqlalchemy import REAL, ForeignKey, Integer, Text, TypeDecorator, create_engine, event, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, selectinload, sessionmaker

from engine.errors import StoreError
from engine.paths import atomic_write_text, default_db_path

# Each entry migrates from version i to i+1. Never edit a released entry: add a new one.
MIGRATIONS: list[list[str]] = [
    [  # 1: the initial schema
        """CREATE TABLE sessions (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL,
            model_ref TEXT NOT NULL,
            model_fingerprint TEXT,
            settings TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL)""",
        """CREATE TABLE directions (
            id INTEGER PRIMARY KEY,
            session_id INTEGER REFERENCES sessions(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('steering', 'tangent', 'scalarized')),
            objective TEXT NOT NULL,
            path TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            model_fingerprint TEXT,
            meta TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL)""",
        """CREATE TABLE comparisons (
            id INTEGER PRIMARY KEY,
            session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            prompt TEXT NOT NULL,
            params TEXT NOT NULL DEFAULT '{}',
            seed INTEGER,
            created_at TEXT NOT NULL)""",
        """CREATE TABLE generations (
            id INTEGER PRIMARY KEY,
            comparison_id INTEGER NOT NULL REFERENCES comparisons(id) ON DELETE CASCADE,
            position INTEGER NOT NULL,
            label TEXT NOT NULL,
            point_x REAL,
            point_y REAL,
            weights TEXT NOT NULL DEFAULT '{}',
            output TEXT NOT NULL,
            n_tokens INTEGER NOT NULL,
            seconds REAL NOT NULL,
            stopped INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL)""",
        """CREATE TABLE ratings (
            id INTEGER PRIMARY KEY,
            comparison_id INTEGER NOT NULL REFERENCES comparisons(id) ON DELETE CASCADE,
            outcome TEXT NOT NULL CHECK (outcome IN ('winner', 'tie', 'both_bad')),
            winner_id INTEGER REFERENCES generations(id) ON DELETE CASCADE,
            scores TEXT NOT NULL DEFAULT '{}',
            note TEXT NOT NULL DEFAULT '',
            blind INTEGER NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            CHECK ((outcome = 'winner') = (winner_id IS NOT NULL)))""",
    ],
    [  # 2: named points on the plane, and indexes for the history queries
        """CREATE TABLE pinned_points (
            id INTEGER PRIMARY KEY,
            session_id INTEGER NOT NULL REFERENCES sessions(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            x REAL NOT NULL,
            y REAL NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (session_id, name))""",
        "CREATE INDEX ix_directions_session ON directions(session_id)",
        "CREATE INDEX ix_comparisons_session ON comparisons(session_id)",
        "CREATE INDEX ix_generations_comparison ON generations(comparison_id)",
        "CREATE INDEX ix_ratings_comparison ON ratings(comparison_id)",
    ],
    [  # 3: a pinned point keeps the mix it named (switching the plane's layout does not change what a pin means)
        "ALTER TABLE pinned_points ADD COLUMN weights TEXT NOT NULL DEFAULT '{}'",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)
OUTCOMES = ("winner", "tie", "both_bad")
DIRECTION_KINDS = ("steering", "tangent", "scalarized")  # a direction's label: how it was made


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


# The migrations above are the one source of the schema. The ORM below names the same columns with types
# stored exactly as the migrations declare them (TEXT, INTEGER, REAL); a test reads a migrated database and
# fails on any column where the two disagree.

class _Stored(TypeDecorator):
    """A Python value kept in a column of the migrations' declared type, through ``encode`` and ``decode``."""

    impl = Text
    cache_ok = True
    encode = decode = staticmethod(lambda v: v)

    def process_bind_param(self, value, dialect):
        return None if value is None else self.encode(value)

    def process_result_value(self, value, dialect):
        return None if value is None else self.decode(value)


class JsonText(_Stored):
    """A JSON value in a TEXT column."""

    cache_ok = True  # SQLAlchemy asks each TypeDecorator class itself

    encode, decode = staticmethod(json.dumps), staticmethod(json.loads)


class UtcText(_Stored):
    """A naive UTC datetime in a TEXT column, as 'YYYY-MM-DD HH:MM:SS.ffffff' (which sorts as time does)."""

    cache_ok = True  # SQLAlchemy asks each TypeDecorator class itself

    encode = staticmethod(lambda v: v.isoformat(sep=" ", timespec="microseconds"))
    decode = staticmethod(datetime.fromisoformat)


class IntBool(_Stored):
    """A bool in an INTEGER column (0 or 1)."""

    cache_ok = True  # SQLAlchemy asks each TypeDecorator class itself

    impl = Integer
    encode, decode = staticmethod(lambda v: int(bool(v))), staticmethod(bool)


class Base(DeclarativeBase):
    type_annotation_map = {dict: JsonText, datetime: UtcText, bool: IntBool, float: REAL, str: Text}


class _Row(Base):
    """What every table has: an integer id and the time the row was made (UTC)."""

    __abstract__ = True
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(default=_now)


class SessionRow(_Row):
    __tablename__ = "sessions"
    name: Mapped[str] = mapped_column()
    model_ref: Mapped[dict] = mapped_column()
    model_fingerprint: Mapped[Optional[str]] = mapped_column()
    settings: Mapped[dict] = mapped_column(default=dict)
    updated_at: Mapped[datetime] = mapped_column(default=_now)
    directions: Mapped[list["DirectionRow"]] = relationship(back_populates="session", order_by="DirectionRow.id")
    comparisons: Mapped[list["Comparison"]] = relationship(back_populates="session", order_by="Comparison.id")
    pinned: Mapped[list["PinnedPoint"]] = relationship(order_by="PinnedPoint.id")


class DirectionRow(_Row):
    __tablename__ = "directions"
    session_id: Mapped[Optional[int]] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column()
    kind: Mapped[str] = mapped_column()
    objective: Mapped[str] = mapped_column()
    path: Mapped[str] = mapped_column()
    sha256: Mapped[str] = mapped_column()
    model_fingerprint: Mapped[Optional[str]] = mapped_column()
    meta: Mapped[dict] = mapped_column(default=dict)
    session: Mapped[Optional[SessionRow]] = relationship(back_populates="directions")


class Comparison(_Row):
    """One prompt run through 1-4 columns with the same sampling parameters and seed."""

    __tablename__ = "comparisons"
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    prompt: Mapped[str] = mapped_column()
    params: Mapped[dict] = mapped_column(default=dict)
    seed: Mapped[Optional[int]] = mapped_column()
    session: Mapped[SessionRow] = relationship(back_populates="comparisons")
    generations: Mapped[list["Generation"]] = relationship(back_populates="comparison", order_by="Generation.position")
    ratings: Mapped[list["Rating"]] = relationship(back_populates="comparison", order_by="Rating.id")


class Generation(_Row):
    __tablename__ = "generations"
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column()
    label: Mapped[str] = mapped_column()
    point_x: Mapped[Optional[float]] = mapped_column()
    point_y: Mapped[Optional[float]] = mapped_column()
    weights: Mapped[dict] = mapped_column(default=dict)
    output: Mapped[str] = mapped_column()
    n_tokens: Mapped[int] = mapped_column()
    seconds: Mapped[float] = mapped_column()
    stopped: Mapped[bool] = mapped_column(default=False)
    comparison: Mapped[Comparison] = relationship(back_populates="generations")


class Rating(_Row):
    __tablename__ = "ratings"
    comparison_id: Mapped[int] = mapped_column(ForeignKey("comparisons.id", ondelete="CASCADE"))
    outcome: Mapped[str] = mapped_column()
    winner_id: Mapped[Optional[int]] = mapped_column(ForeignKey("generations.id", ondelete="CASCADE"))
    scores: Mapped[dict] = mapped_column(default=dict)  # {generation id: {attribute: 1..5}}
    note: Mapped[str] = mapped_column(default="")
    blind: Mapped[bool] = mapped_column(default=False)
    comparison: Mapped[Comparison] = relationship(back_populates="ratings")


class PinnedPoint(_Row):
    __tablename__ = "pinned_points"
    session_id: Mapped[int] = mapped_column(ForeignKey("sessions.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column()
    x: Mapped[float] = mapped_column()
    y: Mapped[float] = mapped_column()
    weights: Mapped[dict] = mapped_column(default=dict)  # direction name -> weight when pinned ({} before schema 3)


def _locked(exc: BaseException) -> bool:
    text = str(getattr(exc, "orig", exc))
    return "locked" in text or "busy" in text


def _friendly(exc: BaseException, path: Path, action: str) -> StoreError:
    text = str(getattr(exc, "orig", exc))
    if _locked(exc):
        return StoreError(
            f"The database {path} is locked by another program (another studio window or a `tsdpo` command?) and "
            f"could not {action}. Close that program and try again; everything saved before is intact."
        )
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return StoreError(
            f"{path} is damaged or is not a tsdpo-studio database ({text}). It was left untouched: move it aside "
            "or choose another database (--db or TSDPO_DB), and a new one will be created."
        )
    if "readonly" in text or "unable to open" in text:
        return StoreError(f"Could not {action}: {path} cannot be written ({text}). Check the folder's permissions.")
    return StoreError(f"Could not {action} in {path}: {text}")


def migrate(path: Path, target: int = SCHEMA_VERSION, busy_timeout_s: float = 3.0) -> int:
    """Bring the database at ``path`` to schema ``target``; return the version it had."""
    try:
        con = sqlite3.connect(str(path), timeout=busy_timeout_s, isolation_level=None)
    except sqlite3.Error as exc:
        raise _friendly(exc, path, "open the database") from exc
    try:
        version = con.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} was written by a newer tsdpo-studio (schema {version}; this version knows up to "
                f"{SCHEMA_VERSION}). Upgrade tsdpo-studio, or choose another database (--db or TSDPO_DB)."
            )
        if version == 0 and tables:
            raise StoreError(
                f"{path} is an SQLite database of another program (tables: {', '.join(sorted(tables)[:5])}). "
                "It was left untouched; choose another database path (--db or TSDPO_DB)."
            )
        if version >= target:
            return version
        if version > 0:  # keep a copy of the data as it was before we change its shape
            backup = path.with_name(f"{path.name}.v{version}.bak")
            with sqlite3.connect(str(backup)) as dst:
                con.backup(dst)
        con.execute("BEGIN IMMEDIATE")
        try:
            for v in range(version, target):
                for statement in MIGRATIONS[v]:
                    con.execute(statement)
            con.execute(f"PRAGMA user_version = {int(target)}")
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        return version
    except sqlite3.Error as exc:
        raise _friendly(exc, path, "open the database") from exc
    finally:
        con.close()


class Store:
    def __init__(self, path: str | Path | None = None, busy_timeout_s: float = 3.0,
                 retry_delays: tuple[float, ...] = (0.25, 0.5, 1.0)):
        self.retry_delays = tuple(retry_delays)  # back-off between tries of a write the database is locked for
        self.path = Path(path) if path else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.migrated_from = migrate(self.path, busy_timeout_s=busy_timeout_s)
        self.engine = create_engine(f"sqlite:///{self.path}",
                                    connect_args={"timeout": busy_timeout_s, "check_same_thread": False})
        ms = int(busy_timeout_s * 1000)

        @event.listens_for(self.engine, "connect")
        def _pragmas(dbapi_con, _record):
            cur = dbapi_con.cursor()
            cur.execute("PRAGMA foreign_keys = ON")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute(f"PRAGMA busy_timeout = {ms}")
            cur.close()

        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def schema_version(self) -> int:
        with self.engine.connect() as con:
            return con.exec_driver_sql("PRAGMA user_version").scalar_one()

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self, action: str) -> Iterator:
        try:
            with self._sessions.begin() as s:
                yield s
        except DBAPIError as exc:
            raise _friendly(exc, self.path, action) from exc

    def _write(self, action: str, fn: Callable):
        """Run ``fn(session)`` in one transaction; while another program holds the database, try again with
        back-off before giving up with a message (nothing is half-written either way)."""
        for attempt in range(len(self.retry_delays) + 1):
            try:
                with self._sessions.begin() as s:
                    return fn(s)
            except DBAPIError as exc:
                if _locked(exc) and attempt < len(self.retry_delays):
                    time.sleep(self.retry_delays[attempt])
                    continue
                raise _friendly(exc, self.path, action) from exc

    # ---------------------------------------------------------------- sessions
    def create_session(self, name: str, model_ref: dict, fingerprint: Optional[str] = None,
                       settings: Optional[dict] = None) -> SessionRow:
        def write(s):
            row = SessionRow(name=name, model_ref=model_ref, model_fingerprint=fingerprint, settings=settings or {})
            s.add(row)
            return row

        return self._write("create the session", write)

    def update_session(self, session_id: int, **fields) -> SessionRow:
        for key in fields:
            if key not in ("name", "model_ref", "model_fingerprint", "settings"):
                raise ValueError(f"unknown session field {key!r}")

        def write(s):
            row = self._get(s, SessionRow, session_id)
            for key, value in fields.items():
                setattr(row, key, value)
            row.updated_at = _now()
            return row

        return self._write("save the session", write)

    def sessions(self, limit: int = 20) -> list[SessionRow]:
        """Most recently used first."""
        with self._tx("list sessions") as s:
            return list(s.scalars(select(SessionRow).order_by(SessionRow.updated_at.desc(), SessionRow.id.desc()).limit(limit)))

    def session(self, session_id: int) -> SessionRow:
        """A session with its directions, pinned points and full history loaded."""
        with self._tx("read the session") as s:
            row = s.scalar(
                select(SessionRow).where(SessionRow.id == session_id).options(
                    selectinload(SessionRow.directions), selectinload(SessionRow.pinned),
                    selectinload(SessionRow.comparisons).selectinload(Comparison.generations),
                    selectinload(SessionRow.comparisons).selectinload(Comparison.ratings)))
            if row is None:
                raise StoreError(f"There is no session {session_id} in {self.path}.")
            return row

    @staticmethod
    def _get(s, cls, key):
        row = s.get(cls, key)
        if row is None:
            raise StoreError(f"There is no {cls.__tablename__[:-1].replace('_', ' ')} {key}.")
        return row

    def _touch(self, s, session_id: int) -> None:
        self._get(s, SessionRow, session_id).updated_at = _now()

    # ---------------------------------------------------------------- directions
    def add_direction(self, *, name: str, kind: str, objective: str, path: str, sha256: str,
                      model_fingerprint: Optional[str] = None, meta: Optional[dict] = None,
                      session_id: Optional[int] = None) -> DirectionRow:
        if kind not in DIRECTION_KINDS:
            raise ValueError(f"direction kind must be one of {DIRECTION_KINDS}, got {kind!r}")
        def write(s):
            row = DirectionRow(session_id=session_id, name=name, kind=kind, objective=objective, path=str(path),
                               sha256=sha256, model_fingerprint=model_fingerprint, meta=meta or {})
            s.add(row)
            return row

        return self._write("save the direction", write)

    def directions(self, session_id: Optional[int] = None) -> list[DirectionRow]:
        with self._tx("list directions") as s:
            q = select(DirectionRow).order_by(DirectionRow.id)
            if session_id is not None:
                q = q.where(DirectionRow.session_id == session_id)
            return list(s.scalars(q))

    def find_direction(self, name: str) -> Optional[DirectionRow]:
        """The newest direction with this name."""
        with self._tx("find the direction") as s:
            return s.scalar(select(DirectionRow).where(DirectionRow.name == name).order_by(DirectionRow.id.desc()))

    # ---------------------------------------------------------------- comparisons and ratings
    def add_comparison(self, session_id: int, prompt: str, params: dict, seed: Optional[int],
                       generations: list[dict]) -> Comparison:
        """Store a prompt with its columns. Each generation dict has label, output, n_tokens, seconds and
        optionally point (x, y), weights and stopped."""
        def write(s):
            self._touch(s, session_id)
            comp = Comparison(session_id=session_id, prompt=prompt, params=params, seed=seed)
            for i, g in enumerate(generations):
                point = g.get("point") or (None, None)
                comp.generations.append(Generation(
                    position=i, label=g["label"], point_x=point[0], point_y=point[1], weights=g.get("weights") or {},
                    output=g["output"], n_tokens=int(g["n_tokens"]), seconds=float(g["seconds"]),
                    stopped=bool(g.get("stopped", False))))
            s.add(comp)
            return comp

        return self._write("save the generations", write)

    def add_rating(self, comparison_id: int, outcome: str, winner_id: Optional[int] = None,
                   scores: Optional[dict] = None, note: str = "", blind: bool = False) -> Rating:
        if outcome not in OUTCOMES:
            raise StoreError(f"A rating outcome is one of {', '.join(OUTCOMES)}, not {outcome!r}.")
        if (outcome == "winner") != (winner_id is not None):
            raise StoreError("A 'winner' rating names the winning generation; 'tie' and 'both_bad' name none.")
        clean: dict[str, dict[str, int]] = {}
        for gen_id, attrs in (scores or {}).items():
            for attr, value in attrs.items():
                if not isinstance(value, int) or not 1 <= value <= 5:
                    raise StoreError(f"Scores are whole numbers from 1 to 5; {attr} got {value!r}.")
            clean[str(gen_id)] = dict(attrs)
        def write(s):
            comp = self._get(s, Comparison, comparison_id)
            ids = {g.id for g in comp.generations}
            if winner_id is not None and winner_id not in ids:
                raise StoreError(f"Generation {winner_id} is not part of comparison {comparison_id}.")
            if any(int(k) not in ids for k in clean):
                raise StoreError(f"Scores name generations outside comparison {comparison_id}.")
            self._touch(s, comp.session_id)
            # A second rating is an edit: the earlier one stays in the table (undo brings it back), and an
            # empty note keeps the note written before.
            earlier = comp.ratings[-1] if comp.ratings else None
            kept_note = note or (earlier.note if earlier is not None else "")
            row = Rating(comparison_id=comparison_id, outcome=outcome, winner_id=winner_id, scores=clean,
                         note=kept_note, blind=blind)
            s.add(row)
            return row

        return self._write("save the rating", write)

    def undo_rating(self, rating_id: int) -> Optional[Rating]:
        """Take back the newest rating of its comparison; returns the rating that counts again (or None)."""
        def write(s):
            row = self._get(s, Rating, rating_id)
            comp = row.comparison
            if comp.ratings[-1].id != row.id:
                raise StoreError(f"Rating {rating_id} is not the newest rating of comparison {comp.id}; only that one can be undone.")
            self._touch(s, comp.session_id)
            s.delete(row)
            s.flush()
            s.refresh(comp)
            return comp.ratings[-1] if comp.ratings else None

        return self._write("undo the rating", write)

    def ratings(self, comparison_id: int) -> list[Rating]:
        """Every rating of a comparison, oldest first (the newest counts)."""
        with self._tx("read the ratings") as s:
            return list(s.scalars(select(Rating).where(Rating.comparison_id == comparison_id).order_by(Rating.id)))

    def history(self, session_id: int) -> list[Comparison]:
        return list(self.session(session_id).comparisons)

    # ---------------------------------------------------------------- pinned points
    def pin_point(self, session_id: int, name: str, x: float, y: float,
                  weights: Optional[dict[str, float]] = None) -> PinnedPoint:
        """Pin (or move) a named point, with the mix it names (direction -> weight)."""
        mix = {str(k): float(v) for k, v in (weights or {}).items()}

        def write(s):
            row = s.scalar(select(PinnedPoint).where(PinnedPoint.session_id == session_id, PinnedPoint.name == name))
            if row is None:
                row = PinnedPoint(session_id=session_id, name=name, x=x, y=y, weights=mix)
                s.add(row)
            else:
                row.x, row.y, row.weights = x, y, mix
            self._touch(s, session_id)
            return row

        return self._write("pin the point", write)

    def pinned_points(self, session_id: int) -> list[PinnedPoint]:
        with self._tx("list pinned points") as s:
            return list(s.scalars(select(PinnedPoint).where(PinnedPoint.session_id == session_id).order_by(PinnedPoint.id)))



def ratings_to_trl(store: Store, session_id: int, exclude_truncated: bool = False) -> list[dict]:
    """What a person rated, as TRL preference rows: the winner is chosen, each other column rejected.

    Ties and 'both bad' carry no preference between columns and give no rows; when a comparison was
    rated more than once the latest rating counts. Each side says whether it was cut off: ``truncated``
    (it reached the token limit without ending) or ``stopped`` (Stop was pressed), so a trainer can drop
    or weigh down pairs that compare unfinished replies; ``exclude_truncated`` leaves those pairs out instead."""
    rows = []
    for comp in store.history(session_id):
        if not comp.ratings:
            continue
        rating = comp.ratings[-1]
        if rating.outcome != "winner":
            continue
        limit = (comp.params or {}).get("max_new_tokens")
        winner = next(g for g in comp.generations if g.id == rating.winner_id)
        for g in comp.generations:
            if exclude_truncated and any(is_truncated(x, limit) or x.stopped for x in (winner, g)):
                continue
            if g.id != winner.id and g.output.strip() != winner.output.strip():
                rows.append({"prompt": comp.prompt, "chosen": winner.output, "rejected": g.output,
                             "chosen_label": winner.label, "rejected_label": g.label, "blind": rating.blind,
                             "chosen_truncated": is_truncated(winner, limit), "rejected_truncated": is_truncated(g, limit),
                             "chosen_stopped": bool(winner.stopped), "rejected_stopped": bool(g.stopped),
                             "comparison_id": comp.id})
    return rows


def is_truncated(g: "Generation", limit: Optional[int]) -> bool:
    """A reply that used every token it was allowed without ending (its end-of-turn was never generated)."""
    return limit is not None and not g.stopped and g.n_tokens >= int(limit)


def export_ratings_trl(store: Store, session_id: int, path: str | Path, exclude_truncated: bool = False) -> int:
    """Write the session's ratings as TRL JSONL (prompt/chosen/rejected); returns the number of pairs."""
    import json

    rows = ratings_to_trl(store, session_id, exclude_truncated)
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return len(rows)
