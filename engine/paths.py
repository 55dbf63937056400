"""Where the studio keeps its files. Each location can be moved with an environment variable."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP = "tsdpo-studio"


def _dir(env: str, default: str) -> Path:
    p = Path(os.environ.get(env) or default).expanduser()
    p.mkdir(parents=True, exist_ok=True)
    return p


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
