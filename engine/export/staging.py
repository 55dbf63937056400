"""Where an export is written: a hidden folder beside the target that becomes the target only once it is
complete, so an interrupted or failed export leaves nothing half-written and an export being overwritten
stays whole until the new one is in place. ``clean_stale`` undoes what a killed export left behind."""

from __future__ import annotations

import errno
import glob
import os
import shutil
from pathlib import Path

from engine.export.base import ExportError
from engine.paths import can_create_in, format_bytes, with_default_modes


def check_target(out: Path, overwrite: bool) -> None:
    """Refuse a target that would lose something: a file, or a non-empty folder without overwrite."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; export into a new folder (choose another --out).")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportError(f"{out} already exists and is not empty. Choose a new folder, or pass --overwrite "
                          "(the old contents are replaced only once the new export is complete).")
    probe = out.parent
    while not probe.exists():  # the folders to create go below the nearest one that exists
        probe = probe.parent
    if not probe.is_dir() or not can_create_in(probe):
        raise ExportError(f"Cannot create {out}: {probe} is not a folder you can write to. Choose another location.")


STAGING, HIDDEN_OLD = "tsdpo-export", "tsdpo-old"


def clean_stale(out: Path) -> list[str]:
    """Undo what an export that was killed left beside ``out``: its staging folders are removed, and an old
    export it had moved aside (killed between the two renames) is put back. Only folders of processes that
    are no longer running are touched. Returns what was done, one line each."""
    import psutil

    done = []
    if not out.parent.is_dir():
        return done
    for p in sorted(out.parent.glob(f".{glob.escape(out.name)}.tsdpo-*-*")):
        kind, _, pid = p.name[len(out.name) + 2:].rpartition("-")
        if kind not in (STAGING, HIDDEN_OLD) or not pid.isdigit() or not p.is_dir():
            continue
        if int(pid) != os.getpid() and psutil.pid_exists(int(pid)):
            continue  # another export is writing there right now
        if kind == HIDDEN_OLD and not out.exists():
            os.replace(p, out)
            done.append(f"restored the earlier export {out} (an interrupted overwrite had moved it to {p.name})")
        else:
            size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}, left by an interrupted export ({format_bytes(size)})")
    return done


def check_space(parent: Path, needed: int) -> None:
    probe = parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise ExportError(f"The export needs about {format_bytes(needed)} but {probe} has {format_bytes(free)} free. "
                          "Free some space, or export to another disk.")


class Staging:
    """A hidden temporary folder beside ``out`` that becomes ``out`` only when everything is written."""

    def __init__(self, out: Path, overwrite: bool):
        self.out = out
        self.overwrite = overwrite
        self.tmp = out.parent / f".{out.name}.{STAGING}-{os.getpid()}"

    def __enter__(self) -> Path:
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp.mkdir()
        except OSError as exc:
            raise ExportError(f"Cannot write the export beside {self.out} ({exc.strerror or exc}). "
                              "Choose a folder you can write to.") from exc
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ExportError(f"The disk ran out of space while writing the export to {self.out.parent}; "
                                  "nothing was left behind. Free some space, or export to another disk.") from exc
            return False
        check_target(self.out, self.overwrite)  # another process may have written there meanwhile
        with_default_modes(self.tmp)
        old = None
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.{HIDDEN_OLD}-{os.getpid()}"
            os.replace(self.out, old)
        os.replace(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
