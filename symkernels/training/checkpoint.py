"""Checkpoints that lose nothing: model, optimiser, every RNG state, epoch and metrics, written atomically.

A file is written to a temporary name in the destination folder, flushed to disk (fsync) and renamed over the
destination (:func:`os.replace`, atomic on POSIX and Windows): a reader, or a run killed at any instant, sees
either the previous complete file or the new complete file, never a torn one. A write that fails (a full
disk, a read-only folder) raises an OSError naming the file, and leaves the previous file as it was; a run
killed while writing leaves only a temporary file, which :func:`remove_leftover_temporaries` clears.

A checkpoint is read only after the CRC-32 of every record of its zip container is checked: ``torch.load``
does not check them, and loads a flipped bit in the weights silently.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

FORMAT_VERSION = 1
_REQUIRED = ("format", "epoch", "config", "model", "optimizer", "rng", "history")


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path``; on a clean exit fsync it and rename it to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was; an OSError (disk full,
    folder not writable) is raised again with a message that names ``path``.
    """
    path = Path(path)
    try:
        handle, temporary = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _write_error(path, error) from error
    try:
        with os.fdopen(handle, mode) as file:
            os.chmod(temporary, _FILE_MODE & ~_umask())  # mkstemp makes 0600; give the usual mode
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            raise _write_error(path, error) from error
        raise
    _fsync_folder(path.parent)


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def _write_error(path: Path, error: OSError) -> OSError:
    """``error`` again (same errno, so the same OSError subclass), its message naming what was not written."""
    kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
    message = f"cannot write {path}: {error.strerror or error}; {kept}"
    return OSError(error.errno, message) if error.errno is not None else OSError(message)


def remove_leftover_temporaries(folder: str | Path) -> list[Path]:
    """Remove the temporary files that writers killed mid-write (SIGKILL, power loss) left in ``folder``.

    Only call this while nothing writes into ``folder``; returns what was removed.
    """
    removed = []
    for candidate in Path(folder).glob(".*.tmp"):
        if candidate.is_file():
            with contextlib.suppress(FileNotFoundError):
                candidate.unlink()
                removed.append(candidate)
    return removed


_FILE_MODE = 0o666


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path, "w") as file:
        file.write(text)


def atomic_save(obj: object, path: str | Path) -> None:
    """``torch.save`` with the atomic-replace guarantee."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)  # serialise first: a failure here leaves no temporary file behind
    with atomic_open(path, "wb") as file:
        file.write(buffer.getbuffer())


def save_checkpoint(
    path: str | Path,
    *,
    epoch: int,
    config: dict[str, Any],
    model: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    rng: dict[str, Any],
    history: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> None:
    """Write the state after ``epoch`` complete epochs; ``rng`` holds every generator state resuming needs."""
    atomic_save(
        {
            "format": FORMAT_VERSION,
            "epoch": epoch,
            "config": config,
            "model": model,
            "optimizer": optimizer,
            "rng": rng,
            "history": history,
            **(extra or {}),
        },
        path,
    )


def _check_container(path: Path) -> None:
    """Raise ValueError naming ``path`` when its zip container is truncated or a record fails its CRC-32."""
    damaged = f"{path} is damaged (truncated or corrupted) and was left as it is"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()  # reads every record and checks its CRC-32
    except (zipfile.BadZipFile, EOFError, ValueError) as error:
        raise ValueError(f"{damaged}: not a complete checkpoint file ({error})") from error
    if bad is not None:
        raise ValueError(f"{damaged}: its record {bad!r} fails its checksum")


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read and validate a checkpoint written by :func:`save_checkpoint` (tensors on the CPU).

    Raises FileNotFoundError when there is none, ValueError naming the file when it is damaged or is not a
    symkernels checkpoint; the file itself is never modified.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    _check_container(path)
    try:
        # weights_only stays on: the checkpoint holds tensors, numbers, strings and Python's random state.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise ValueError(f"{path} is not a readable checkpoint: {error}") from error
    if not isinstance(state, dict) or any(key not in state for key in _REQUIRED):
        raise ValueError(f"{path} is not a symkernels training checkpoint (expected keys {list(_REQUIRED)})")
    if state["format"] != FORMAT_VERSION:
        raise ValueError(
            f"{path} has checkpoint format {state['format']}, this version reads {FORMAT_VERSION}"
        )
    return state
