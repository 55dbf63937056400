import sqlite3
import threading

import pytest

from engine.errors import StoreError
from engine.store import SCHEMA_VERSION, Store, migrate


def _session_with_comparison(store):
    s = store.create_session("demo", {"kind": "folder", "ref": "/m"}, "fp123", {"axes": ["help", "verb"]})
    comp = store.add_comparison(s.id, "Why is the sky blue?", {"max_new_tokens": 32, "temperature": 0.0}, 7, [
        {"label": "base", "output": "Rayleigh scattering.", "n_tokens": 4, "seconds": 0.5},
        {"label": "mix", "output": "Because of Rayleigh scattering of sunlight...", "n_tokens": 9, "seconds": 0.9,
         "point": (0.4, -0.2), "weights": {"help": 0.4, "verb": -0.2}},
    ])
    return s, comp


def test_default_path_in_data_dir(tmp_path):
    store = Store()
    assert store.path == tmp_path / "data" / "studio.sqlite3"
    assert store.schema_version == SCHEMA_VERSION


def test_pragmas_wal_and_foreign_keys(tmp_path):
    store = Store(tmp_path / "s.db")
    with store.engine.connect() as con:
        assert con.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert con.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert con.exec_driver_sql("PRAGMA busy_timeout").scalar() == 3000


def test_round_trip_history_and_rating_committed_at_once(tmp_path):
    store = Store(tmp_path / "s.db")
    s, comp = _session_with_comparison(store)
    base, mix = comp.generations
    store.add_rating(comp.id, "winner", winner_id=mix.id, scores={mix.id: {"helpfulness": 5, "verbosity": 2}},
                     note="clearer", blind=True)
    store.add_rating(comp.id, "both_bad")
    store.pin_point(s.id, "sweet spot", 0.4, -0.2)
    store.pin_point(s.id, "sweet spot", 0.5, -0.1)  # moving a pinned point keeps one row
    # A second connection (another process would see the same) finds everything already on disk.
    other = Store(tmp_path / "s.db")
    row = other.session(s.id)
    assert row.settings == {"axes": ["help", "verb"]} and row.model_fingerprint == "fp123"
    (c,) = row.comparisons
    assert c.prompt == "Why is the sky blue?" and c.seed == 7 and c.params["max_new_tokens"] == 32
    assert [g.label for g in c.generations] == ["base", "mix"]
    assert (c.generations[1].point_x, c.generations[1].point_y) == (0.4, -0.2)
    assert c.generations[1].weights == {"help": 0.4, "verb": -0.2}
    assert [(r.outcome, r.winner_id, r.blind) for r in c.ratings] == [("winner", mix.id, True), ("both_bad", None, False)]
    assert c.ratings[0].scores == {str(mix.id): {"helpfulness": 5, "verbosity": 2}}
    assert [(p.name, p.x, p.y) for p in row.pinned] == [("sweet spot", 0.5, -0.1)]
    assert other.sessions()[0].id == s.id


def test_bad_ratings_are_refused(tmp_path):
    store = Store(tmp_path / "s.db")
    s, comp = _session_with_comparison(store)
    s2, comp2 = _session_with_comparison(store)
    with pytest.raises(StoreError, match="not part of comparison"):
        store.add_rating(comp.id, "winner", winner_id=comp2.generations[0].id)
    with pytest.raises(StoreError, match="1 to 5"):
        store.add_rating(comp.id, "tie", scores={comp.generations[0].id: {"helpfulness": 6}})
    with pytest.raises(StoreError, match="outcome"):
        store.add_rating(comp.id, "great")
    with pytest.raises(StoreError, match="names the winning generation"):
        store.add_rating(comp.id, "winner")
    assert store.session(s.id).comparisons[0].ratings == []


def test_sessions_are_listed_most_recent_first(tmp_path):
    store = Store(tmp_path / "s.db")
    a = store.create_session("a", {"kind": "embedded", "ref": ""})
    b = store.create_session("b", {"kind": "embedded", "ref": ""})
    assert [s.name for s in store.sessions()] == ["b", "a"]
    store.add_comparison(a.id, "p", {}, 0, [{"label": "base", "output": "x", "n_tokens": 1, "seconds": 0.1}])
    assert [s.name for s in store.sessions()] == ["a", "b"]


def test_older_schema_is_migrated_not_wiped(tmp_path):
    path = tmp_path / "old.db"
    assert migrate(path, target=1) == 0
    con = sqlite3.connect(path)
    con.execute("INSERT INTO sessions (id, name, model_ref, settings, created_at, updated_at) "
                "VALUES (1, 'kept', '{\"kind\": \"embedded\", \"ref\": \"\"}', '{}', '2026-01-01 00:00:00', '2026-01-01 00:00:00')")
    con.commit()
    con.close()
    store = Store(path)
    assert store.migrated_from == 1 and store.schema_version == SCHEMA_VERSION
    assert store.session(1).name == "kept"
    store.pin_point(1, "p", 0.0, 1.0)  # the table added by migration 2 works
    backup = tmp_path / "old.db.v1.bak"
    assert backup.is_file()
    assert sqlite3.connect(backup).execute("SELECT name FROM sessions").fetchall() == [("kept",)]


def _untouched(path, fn):
    before = path.read_bytes()
    with pytest.raises(StoreError) as info:
        fn()
    assert path.read_bytes() == before
    return str(info.value)


def test_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "new.db"
    Store(path).close()
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    con.close()
    assert "newer tsdpo-studio" in _untouched(path, lambda: Store(path))


def test_corrupt_file_is_refused_untouched(tmp_path):
    path = tmp_path / "corrupt.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    msg = _untouched(path, lambda: Store(path))
    assert "damaged or is not a tsdpo-studio database" in msg and "left untouched" in msg


def test_foreign_sqlite_file_is_refused(tmp_path):
    path = tmp_path / "other.db"
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE invoices (id INTEGER)")
    con.commit()
    con.close()
    assert "another program" in _untouched(path, lambda: Store(path))


def test_locked_database_gives_clear_error_and_keeps_data(tmp_path):
    path = tmp_path / "s.db"
    store = Store(path, busy_timeout_s=0.2)
    s, comp = _session_with_comparison(store)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreError, match="locked by another program"):
            store.add_rating(comp.id, "tie")
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    store.add_rating(comp.id, "tie")  # works again once the lock is gone
    assert [r.outcome for r in store.session(s.id).comparisons[0].ratings] == ["tie"]
    assert store.session(s.id).comparisons[0].generations[1].output.startswith("Because")


def test_store_is_usable_from_several_threads(tmp_path):
    store = Store(tmp_path / "s.db")
    s, comp = _session_with_comparison(store)
    errors = []

    def rate():
        try:
            for _ in range(10):
                store.add_rating(comp.id, "tie")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=rate) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(store.session(s.id).comparisons[0].ratings) == 30


def test_ratings_export_as_trl_pairs_that_load_back(tmp_path):
    from engine.data import load_pairs
    from engine.store import export_ratings_trl

    store = Store(tmp_path / "s.db")
    s, comp = _session_with_comparison(store)
    base, mix = comp.generations
    store.add_rating(comp.id, "winner", winner_id=base.id)
    store.add_rating(comp.id, "winner", winner_id=mix.id)  # a later rating of the same comparison wins
    comp2 = store.add_comparison(s.id, "Tie?", {}, 0, [{"label": "a", "output": "x", "n_tokens": 1, "seconds": 0.1},
                                                      {"label": "b", "output": "y", "n_tokens": 1, "seconds": 0.1}])
    store.add_rating(comp2.id, "tie")
    n = export_ratings_trl(store, s.id, tmp_path / "rated.jsonl")
    assert n == 1
    pairs = load_pairs(tmp_path / "rated.jsonl")
    assert pairs.format == "trl" and len(pairs) == 1
    p = pairs.pairs[0]
    assert (p.prompt[-1]["content"], p.chosen, p.rejected) == ("Why is the sky blue?", mix.output, base.output)


def test_the_orm_describes_the_schema_the_migrations_make(tmp_path):
    """The migrations are the schema's one source: every ORM column is there with the declared type and NOT NULL
    the migrations gave it, and no migrated column is missing from the ORM."""
    import sqlite3

    from sqlalchemy.dialects import sqlite as sqlite_dialect

    from engine.store import Base, Store

    path = tmp_path / "schema.sqlite3"
    Store(path)
    con = sqlite3.connect(str(path))
    problems = []
    for table in Base.metadata.sorted_tables:
        migrated = {r[1]: {"type": r[2], "notnull": bool(r[3]), "pk": bool(r[5])}
                    for r in con.execute(f"PRAGMA table_info({table.name})")}
        orm = {c.name: c for c in table.columns}
        if set(migrated) != set(orm):
            problems.append(f"{table.name}: migrated {sorted(set(migrated) - set(orm))} vs ORM {sorted(set(orm) - set(migrated))}")
            continue
        for name, col in orm.items():
            declared = col.type.compile(dialect=sqlite_dialect.dialect())
            m = migrated[name]
            if declared != m["type"]:
                problems.append(f"{table.name}.{name}: ORM {declared}, migrations {m['type']}")
            if not m["pk"] and (not col.nullable) != m["notnull"]:
                problems.append(f"{table.name}.{name}: ORM {'NOT NULL' if not col.nullable else 'NULL'}, "
                                f"migrations {'NOT NULL' if m['notnull'] else 'NULL'}")
    con.close()
    assert problems == []


def test_rows_written_by_the_earlier_orm_read_back(tmp_path):
    """Earlier versions stored datetimes and JSON through SQLAlchemy's DateTime and JSON types: the same text."""
    import sqlite3
    from datetime import datetime

    from engine.store import Store

    path = tmp_path / "old.sqlite3"
    Store(path)
    con = sqlite3.connect(str(path), isolation_level=None)
    con.execute("INSERT INTO sessions (name, model_ref, model_fingerprint, settings, created_at, updated_at) VALUES "
                "(?, ?, ?, ?, ?, ?)", ("old", '{"kind": "embedded", "ref": null}', "f", '{"point": [0.5, -0.25]}',
                                       "2026-11-30 09:15:02.123456", "2026-11-30 09:16:00.000000"))
    con.close()
    (row,) = Store(path).sessions()
    assert row.model_ref == {"kind": "embedded", "ref": None} and row.settings == {"point": [0.5, -0.25]}
    assert row.created_at == datetime(2026, 11, 30, 9, 15, 2, 123456)
