"""Atomic file and directory writes: after a crash at any point a reader sees the old content or the new, never
half of it. The one home of the temp-then-rename pattern (trainer checkpoints, the ``latest`` pointer, JSON state).

A write goes to a temp name beside its target (same directory, so the rename never crosses filesystems), is
fsynced, and is renamed over the target with ``os.replace`` (atomic on POSIX); the directory is fsynced after
so the rename itself survives a power loss. Temp names end in ``.tmp``: scanners skip them, cleanup removes them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def fsync_dir(path: str | Path) -> None:
    """fsync a directory (makes renames / new entries in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def default_file_mode(path: str | Path) -> None:
    """Give file ``path`` the mode a plain ``open()`` would (0666 & ~umask).

    safetensors (and so transformers' ``save_pretrained``) writes its files 0600: on a shared cluster filesystem
    another user's SGLang server or job could not read the weights while every side file is readable.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and directory under ``path`` (files first, then their directories)."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(root)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically (``<path>.tmp``, fsync, rename, fsync the directory)."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: str | Path, data: Any) -> None:
    """``write_text_atomic`` of ``data`` as JSON (indent 1, sorted keys: stable, diffable state files)."""
    write_text_atomic(path, json.dumps(data, indent=1, sort_keys=True))


def replace_dir(src: str | Path, dst: str | Path) -> None:
    """Move the complete directory ``src`` to ``dst`` (fsynced first), replacing any existing ``dst``.

    An existing ``dst`` is renamed aside to ``<dst>.old.tmp`` and removed after ``src`` took its name, so a crash
    leaves ``dst`` old or new, or (between the two renames only) ``<dst>.old.tmp`` without ``dst``: call
    ``recover_replaced`` on the parent before reading it, which renames the old copy back.
    """
    src, dst = Path(src), Path(dst)
    for f in src.rglob("*.safetensors"):
        default_file_mode(f)
    fsync_tree(src)
    old = dst.with_name(dst.name + ".old" + TMP_SUFFIX)
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    fsync_dir(dst.parent)
    shutil.rmtree(old, ignore_errors=True)


def recover_replaced(parent: str | Path) -> list[Path]:
    """Undo a ``replace_dir`` that crashed between its two renames: every ``<x>.old.tmp`` in ``parent`` whose
    ``<x>`` is missing is renamed back to ``<x>`` (the complete previous copy). Returns the recovered paths.
    Single writer: call it from one process before others read ``parent``."""
    out: list[Path] = []
    suffix = ".old" + TMP_SUFFIX
    parent = Path(parent)
    if not parent.is_dir():
        return out
    for p in sorted(parent.iterdir()):
        if p.is_dir() and p.name.endswith(suffix):
            dst = p.with_name(p.name[: -len(suffix)])
            if not dst.exists():
                os.replace(p, dst)
                out.append(dst)
    if out:
        fsync_dir(parent)
    return out
