"""The inbox's rules: what counts as work, how a file is identified, how a folder is walked,
and where a file goes when its row is written."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from mnistq.protocol import EXTENSIONS

_TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".swp", ".swx", ".download", "~")


def wanted(path: str | Path) -> bool:
    """An image by extension, not hidden, not an editor's or downloader's temporary file."""
    name = os.path.basename(path)
    if not name or name.startswith((".", "#", "~$")) or name.lower().endswith(_TEMP_SUFFIXES):
        return False
    return os.path.splitext(name)[1].lower() in EXTENSIONS


def file_id(path: str, st: os.stat_result) -> str:
    """Stable while the file is untouched; new when a file is dropped again under the same name.

    ctime is in it because a rename into the inbox sets it, even when mtime is preserved (mv).
    """
    if stat.S_ISDIR(st.st_mode):  # a folder's times change with its contents; its name is enough
        key = f"{path}\0{st.st_ino}"
    else:
        key = f"{path}\0{st.st_ino}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def scan(inbox: Path, skip: tuple[Path, ...]) -> Iterator[tuple[str, os.stat_result]]:
    """Every wanted regular file below the inbox, lazily (a flood is never one big list)."""
    for top, dirs, files in os.walk(inbox):
        dirs[:] = [d for d in dirs if not d.startswith(".") and Path(top, d) not in skip]
        # A folder named like an image is reported (as an error row), and still descended into.
        for name in [*files, *dirs]:
            path = os.path.join(top, name)
            if not wanted(path):
                continue
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError:
                continue
            yield path, st


def move_out(path: str, inbox: Path, target_dir: Path, file_id: str) -> str | None:
    """Move a finished file to target_dir, keeping its subfolder; never overwrite an earlier one."""
    if os.path.isdir(path):
        return None  # a folder named x.png keeps its place (and whatever is inside it)
    try:
        rel = Path(path).relative_to(inbox)
    except ValueError:
        rel = Path(os.path.basename(path))
    dest = target_dir / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        dest = dest.with_name(f"{dest.stem}.{file_id[:8]}{dest.suffix}")
    try:
        # link + unlink rather than rename: inotify reports a rename out of the watched folder as
        # IN_MOVED_FROM, which watchdog holds back 0.5 s to pair it, delaying every later event.
        os.link(path, dest)
    except FileNotFoundError:
        return None  # already gone (moved by a previous run, or by the user)
    except FileExistsError:  # a file of that name appeared meanwhile: never overwrite it
        dest = dest.with_name(f"{dest.stem}.{os.getpid()}.{file_id[:8]}{dest.suffix}")
        os.link(path, dest)
    except OSError:  # another filesystem, or one without hard links
        try:
            shutil.move(path, dest)
        except FileNotFoundError:
            return None
        return str(dest)
    os.unlink(path)
    return str(dest)
