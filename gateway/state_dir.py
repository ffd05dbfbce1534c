"""The gateway's state directory: private (0700) and held by one gateway at a time."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
from pathlib import Path

from gateway.errors import SettingsError, StateDirInUse

log = logging.getLogger(__name__)


class StateDir:
    """An opened state directory; the lock is held until :meth:`close`."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self._lock_fd: int | None = lock_fd

    @property
    def store_path(self) -> Path:
        return self.path / "state.db"

    @classmethod
    def open(cls, path: Path) -> StateDir:
        path = path.absolute()
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
            mode = stat.S_IMODE(path.stat().st_mode)
            if mode != 0o700:
                # It holds keys and the store: nobody else may read it.
                log.warning("state dir %s had mode %o; setting 0700", path, mode)
                path.chmod(0o700)
            fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise SettingsError(f"cannot use state dir {path}: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateDirInUse(
                f"state dir {path} is in use by another gateway (pid {holder})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(path, fd)

    def close(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None
