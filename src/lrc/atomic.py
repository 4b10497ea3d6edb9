"""Folders that appear whole or not at all: checkpoints and exports are written under a temporary name,
flushed to disk, then renamed into place (a rename within one file system is atomic). A process killed at any
moment leaves either the previous folder or the new one, plus at most a hidden leftover that the next write
removes; nothing half-written ever carries the final name.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

RETIRED = ".old-"  # a folder being deleted: renamed first, so a kill mid-delete leaves no half folder in place


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries (the names just created or renamed in it). Some file systems refuse: then the
    rename is as durable as they make it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file under `path`, then every folder, flushed to disk: the rename that publishes `path` must not
    reach the disk before the data it names (after a power loss the folder would be complete in name only)."""
    folders = [path]
    for p in sorted(path.rglob("*")):
        if p.is_dir():
            folders.append(p)
        elif p.is_file():
            fsync_file(p)
    for d in reversed(folders):
        fsync_dir(d)


def remove_dir(path: Path) -> None:
    """Delete a folder so that it is never seen half-deleted under its own name: rename, then delete."""
    if not path.exists():
        return
    retired = path.with_name(RETIRED + path.name)
    shutil.rmtree(retired, ignore_errors=True)
    path.rename(retired)
    shutil.rmtree(retired, ignore_errors=True)


def publish_dir(tmp: Path, final: Path) -> None:
    """Put the complete folder `tmp` (its files already flushed by the caller, e.g. `fsync_tree`) at `final`,
    replacing an existing `final`, which stays whole until the moment it is renamed away."""
    fsync_dir(tmp)
    if final.exists():
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        else:
            remove_dir(final)
    tmp.rename(final)
    fsync_dir(final.parent)


def clear_leftovers(root: Path, prefixes: tuple[str, ...]) -> None:
    """Remove what a killed write left in `root`: folders whose names start with one of `prefixes`."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.is_dir() and p.name.startswith(prefixes):
            shutil.rmtree(p, ignore_errors=True)
