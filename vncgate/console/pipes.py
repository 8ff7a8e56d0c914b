"""The kernel primitives a spliced relay moves bytes with: splice (os.splice) and tee(2)
(libc's, through ctypes; Python's os has none), reading what waits in a pipe, and PipePool,
the small shared pool of splice pipes lent while bytes move (PIPES, the process's one), so
the pipes in use are bounded and an idle session holds none.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import threading
from typing import Any

PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; named in fcntl from Python 3.10
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
CAN_SPLICE = hasattr(os, "splice")


def _libc_tee() -> Any:
    """libc's tee(2) through ctypes (Python's os has splice but no tee), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).tee
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
    function.restype = ctypes.c_ssize_t
    return function


_TEE = _libc_tee()
CAN_TEE = CAN_SPLICE and _TEE is not None


def tee(read_end: int, write_end: int, count: int) -> int:
    """Up to count bytes at the front of one pipe duplicated into another; the first keeps
    them (nothing is consumed). Returns how many; raises OSError as os.splice does."""
    while True:
        done = _TEE(read_end, write_end, count, 0)
        if done >= 0:
            return done
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))


def read_pipe(read_end: int, count: int) -> bytes:
    """Exactly count bytes that are waiting in a pipe."""
    parts = []
    while count:
        part = os.read(read_end, count)
        if not part:
            raise OSError(errno.EIO, "the pipe held fewer bytes than it was given")
        parts.append(part)
        count -= len(part)
    return b"".join(parts)


class PipePool:
    """Splice pipes lent while bytes move. At most `limit` exist at once (2 fds each: the
    gateway's fd budget counts them); up to `keep` drained ones wait for the next chunk."""

    def __init__(self, limit: int = 64, keep: int = 16, size: int = PIPE_SIZE) -> None:
        self.limit = limit
        self.keep = keep
        self.size = size
        self._free: list[tuple[int, int, int]] = []  # (read end, write end, capacity)
        self._lent = 0
        self._lock = threading.Lock()

    def take(self) -> tuple[int, int, int] | None:
        """A drained pipe, or None when all are lent or the process has no fds to make one."""
        with self._lock:
            if self._free:
                self._lent += 1
                return self._free.pop()
            if self._lent >= self.limit:
                return None
            self._lent += 1
        try:
            read_end, write_end = os.pipe()
        except OSError:
            self._returned()
            return None
        try:
            fcntl.fcntl(write_end, F_SETPIPE_SZ, self.size)
        except OSError:
            pass  # past the user's pipe-page allowance: the default size still works
        return read_end, write_end, fcntl.fcntl(write_end, F_GETPIPE_SZ)

    def give_back(self, pipe: tuple[int, int, int], drained: bool = True) -> None:
        with self._lock:
            self._lent -= 1
            if drained and len(self._free) < self.keep:
                self._free.append(pipe)
                return
        os.close(pipe[0])
        os.close(pipe[1])

    def _returned(self) -> None:
        with self._lock:
            self._lent -= 1


PIPES = PipePool()


def splice_out(read_end: int, fd: int, count: int) -> None:
    """All count bytes waiting in a pipe, spliced to fd (a socket, a file)."""
    while count:
        count -= os.splice(read_end, fd, count, flags=os.SPLICE_F_MOVE)
