"""Where the studio keeps its files (each location can be moved with an environment variable), and how it
writes them: whole or not at all."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

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


@contextmanager
def atomic_path(path: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` to write a file or a folder into; renamed onto ``path`` when the block
    ends without error, removed when it fails. A crash leaves the old file (or none), never half of one.
    With ``keep_existing`` a ``path`` that appeared meanwhile (another process finished first) is kept."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _remove(tmp)
    try:
        yield tmp
        if keep_existing and path.exists():
            _remove(tmp)
        else:
            with_default_modes(tmp)
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux), else set and put back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def with_default_modes(p: Path) -> None:
    """Give ``p`` (a file, or a folder and all it holds) the permissions a plain ``open`` or ``mkdir`` would:
    safetensors writes its files readable by their owner alone (0600), which leaves an export or a direction in
    a shared folder unreadable to anyone else, such as a server run as another user. A file system without
    permissions (FAT, some network shares) refuses chmod: the file is written all the same."""
    mask = current_umask()
    paths = [p, *p.rglob("*")] if p.is_dir() and not p.is_symlink() else [p]
    for q in paths:
        if not q.is_symlink():
            try:
                os.chmod(q, (0o777 if q.is_dir() else 0o666) & ~mask)
            except OSError:
                pass


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write a whole file or nothing, synced to disk before it replaces the old one."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KB': the one way sizes are written, in the CLI, the studio and the export's messages."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


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
