"""Files written whole or not at all: every file this package writes goes through :func:`write_atomically`.

A save that fails half-way (a full disk, a kill, an exception while serialising) must never cost the previous
file. So the bytes go to a temporary file in the destination's folder, are flushed and ``fsync``-ed, and only
then renamed over the destination with ``os.replace``, which POSIX and Windows make atomic within one file
system. A reader sees the old file or the new one, never a mixture; a failure removes the temporary file.
"""

import contextlib
import io
import os
import pathlib
import pickle
import uuid
import warnings
from collections.abc import Callable

from stable_baselines3.common.vec_env import VecNormalize

#: What ``save`` methods accept as a destination: a path, or an open binary stream (written as is).
Destination = str | pathlib.Path | io.BufferedIOBase


def resolve_path(path: str | pathlib.Path, suffix: str | None) -> pathlib.Path:
    """Where SB3's ``open_path`` would write ``path``, with the same rules and warnings.

    The suffix is added only when the name has none (``"run_lr0.001"`` stays as it is); a destination that is a
    folder becomes ``<path>_2``; missing parent folders are created.

    :param path: the destination the user gave
    :param suffix: the default suffix without its dot (``"zip"``, ``"pkl"``), or None to keep the name as given
    :return: the file to write
    """
    path = pathlib.Path(path)
    if suffix and path.suffix == "":
        path = pathlib.Path(f"{path}.{suffix}")
    while path.is_dir():
        warnings.warn(f"Path '{path}' is a folder. Will save instead to {path}_2", stacklevel=3)
        path = pathlib.Path(f"{path}_2")
    if not path.parent.exists():
        warnings.warn(f"Path '{path.parent}' does not exist. Will create it.", stacklevel=3)
        path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_atomically(
    destination: Destination, write: Callable[[io.BufferedIOBase], None], suffix: str | None = None
) -> None:
    """Write a file through ``write`` so that it appears complete or not at all.

    :param destination: a path (resolved by :func:`resolve_path`), or an open binary stream, which is handed
        to ``write`` directly (a stream cannot be swapped atomically; its owner decides what it is worth)
    :param write: writes the whole content into the binary file object it is given
    :param suffix: default suffix of the file name, as in :func:`resolve_path`
    :raises: whatever ``write`` or the file system raises, after removing the temporary file; the previous
        content of ``destination`` is untouched
    """
    if isinstance(destination, io.BufferedIOBase):
        write(destination)
        return
    path = resolve_path(destination, suffix)
    # A hidden name in the same folder (the rename must not cross file systems); created with O_EXCL and
    # mode 0o666 so that the umask gives it the permissions a plain ``open`` would.
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with open(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        raise
    _sync_folder(path.parent)


def _sync_folder(folder: pathlib.Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened (Windows)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass  # some file systems refuse fsync on folders; the data itself is already on disk
    finally:
        os.close(descriptor)


class AtomicVecNormalize(VecNormalize):
    """``VecNormalize`` whose :meth:`save` is atomic, for ``CheckpointCallback(save_vecnormalize=True)``.

    SB3's ``VecNormalize.save`` writes in place. Wrap the training environment in this class instead of
    ``VecNormalize`` (same arguments) and the statistics files that ``CheckpointCallback`` writes are atomic too.
    ``VecNormalize.load`` reads them back (as an ``AtomicVecNormalize``).
    """

    def save(self, save_path: str | pathlib.Path) -> None:
        """Pickle the normalisation statistics and settings to ``save_path``, atomically.

        :param save_path: the file to write (no suffix is added, as in SB3)
        """
        write_atomically(save_path, lambda file: pickle.dump(self, file, protocol=pickle.HIGHEST_PROTOCOL))
