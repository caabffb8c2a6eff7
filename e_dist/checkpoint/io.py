"""Writing checkpoint files so that a crash never leaves one that looks
complete, and reading them with clear errors.

- :func:`atomic_save` writes to a temporary name in the same directory,
  flushes it to disk and renames it over the target: a reader sees the old
  file or the whole new one, never a part.
- :func:`commit` marks a checkpoint directory complete once every process has
  written its files: a manifest of every file's size and SHA-256, written
  atomically and last. :func:`verify` checks a directory against it.
- :func:`load` reads with ``weights_only=True`` and turns torch's errors for
  missing, truncated or corrupted files into :class:`CheckpointError`s that
  name the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

MANIFEST = "e_dist_complete.json"
_CHUNK = 1 << 22
# What atomic_write_bytes / atomic_save (".NAME.tmpPID") and DCP ("NAME.tmp")
# write before renaming.
_TEMPORARY = re.compile(r"^\..*\.tmp\d*$|^.*\.tmp$")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or of the wrong kind."""


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that it appears whole or not at all."""
    _write_atomically(path, lambda f: f.write(data))


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically (see :func:`atomic_write_bytes`)."""
    _write_atomically(path, lambda f: torch.save(obj, f))


def _write_atomically(
    path: str | os.PathLike, write: Callable[[IO[bytes]], Any]
) -> None:
    # A temporary name in the same folder, flushed to disk, then renamed: a
    # crash leaves the old file or none, never part of the new one.
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_directory(path.parent)


def load(path: str | os.PathLike, what: str = "checkpoint", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` onto the CPU, with errors that
    say which file is missing, truncated or corrupted. With ``mmap``, tensors
    are mapped, not read: opening a large file to look at its structure
    costs little."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        if "weights_only" in str(err):
            raise CheckpointError(
                f"{what} {path} holds objects that torch.load(weights_only=True) "
                f"refuses to unpickle; it was not written by e_dist: {err}"
            ) from err
        raise CheckpointError(_corrupted(path, what, err)) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as err:
        raise CheckpointError(_corrupted(path, what, err)) from err


def load_bytes(data: bytes, name: str, what: str = "checkpoint") -> Any:
    """:func:`load` for bytes already read (checked against a manifest)."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # any failure: reported with the file's name
        raise CheckpointError(_corrupted(Path(name), what, err)) from err


def _corrupted(path: Path, what: str, err: BaseException) -> str:
    size = path.stat().st_size if path.exists() else 0
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return f"{what} {path} is truncated or corrupted ({size} bytes): {first}"


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def commit(directory: str | os.PathLike, info: dict[str, Any] | None = None) -> None:
    """Mark ``directory`` complete: a manifest of every file in it (size and
    SHA-256), written atomically, after every file. Call it on one process
    once all processes have finished writing (after a barrier)."""
    directory = Path(directory)
    files = {}
    for path in sorted(directory.rglob("*")):
        # Hidden files count (DCP's .metadata); temporary ones do not.
        if path.is_file() and path.name != MANIFEST and not _TEMPORARY.match(path.name):
            rel = path.relative_to(directory).as_posix()
            files[rel] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    manifest = {"format": "e_dist.checkpoint", "version": 1, "files": files}
    manifest.update(info or {})
    atomic_write_bytes(directory / MANIFEST, json.dumps(manifest, indent=1).encode())


def verify(directory: str | os.PathLike, checksums: bool = True) -> dict[str, Any]:
    """The manifest of a complete checkpoint directory, after checking that
    every file it lists is there with its size (and, with ``checksums``, its
    SHA-256). Raises :class:`CheckpointError` naming what is wrong."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint {directory} does not exist")
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint {directory} is incomplete: it has no {MANIFEST}, so its "
            "writing was interrupted (or it was not written by e_dist)"
        )
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{path} is corrupted: {err}") from err
    for rel, entry in files.items():
        file = directory / rel
        if not file.is_file():
            raise CheckpointError(f"checkpoint {directory} lacks {rel}")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"checkpoint file {file} is truncated or corrupted: {size} bytes, "
                f"{entry['bytes']} written"
            )
        if checksums and sha256(file) != entry["sha256"]:
            raise CheckpointError(
                f"checkpoint file {file} is corrupted: its SHA-256 differs from the "
                "one recorded when it was written"
            )
    return manifest


def write_latest(directory: str | os.PathLike, tag: str, name: str = "latest") -> None:
    """Point ``directory/latest`` at ``tag``, atomically."""
    atomic_write_bytes(Path(directory) / name, tag.encode())


def read_latest(directory: str | os.PathLike, name: str = "latest") -> str | None:
    """The tag that ``directory/latest`` names, or None when there is none."""
    path = Path(directory) / name
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    if not tag:
        raise CheckpointError(f"{path} is empty")
    return tag
