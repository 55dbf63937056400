"""Where the studio keeps its files. Each location can be moved with an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

from engine.errors import TsdpoError

APP = "tsdpo-studio"


def _dir(env: str, default: str) -> Path:
    p = Path(os.environ.get(env) or default).expanduser()
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # under a regular file, or a folder we may not write
        raise TsdpoError(f"Cannot use {p} as the studio's {'cache' if 'CACHE' in env else 'data'} folder "
                         f"({exc.strerror or exc}). Set {env} to a folder you can write to.") from exc
    if not can_create_in(p):
        raise TsdpoError(f"Cannot write in {p}, the studio's {'cache' if 'CACHE' in env else 'data'} folder "
                         f"(permission denied). Set {env} to a folder you can write to.")
    return p


def can_create_in(folder: Path) -> bool:
    """Whether a file can be created in ``folder``: tried, since permission bits do not tell on a read-only
    file system, or for root."""
    import tempfile

    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".tsdpo-probe-")
    except OSError:
        return False
    os.close(fd)
    os.unlink(name)
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a whole file or nothing: a crash leaves the old file (or none), never half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def cache_dir() -> Path:
    """Converted models and other things that can be rebuilt (TSDPO_CACHE_DIR)."""
    return _dir("TSDPO_CACHE_DIR", platformdirs.user_cache_dir(APP))


def data_dir() -> Path:
    """The database, directions and the log (TSDPO_DATA_DIR)."""
    return _dir("TSDPO_DATA_DIR", platformdirs.user_data_dir(APP))


def default_db_path() -> Path:
    return Path(os.environ.get("TSDPO_DB") or data_dir() / "studio.sqlite3")


def log_path() -> Path:
    return data_dir() / "studio.log"
