"""The process's file descriptors: how many sessions they hold, and what to do when they run out.

A session holds two sockets (client and backend), and more by kind: a recorded one its
two recording files (RECORDED_EXTRA), a serial viewer the console hub's end of its
socketpair (SERIAL_EXTRA); the gateway counts those extra fds against its connections.
The splice pipes are a bounded pool (console/pipes.py: PIPES) and the rest (store connections,
audit log, files the web side sends) fits in a reserve; both scale with a small limit
(pipes() and reserve()), so that 1,024 fds still hold 400 sessions and more. From the fd limit the gateway works out how many
connections it can hold and never admits more, so fds normally never run out. When
they do anyway (another process shares ENFILE, the limit was lowered at runtime),
a spare descriptor kept open for the purpose lets the gateway accept the waiting
client and answer it 503 instead of leaving it in the backlog.
"""

from __future__ import annotations

import errno
import os
import resource

PER_CONNECTION = 2  # the client's socket and the backend's
RESERVED = 96  # store connections (16 pooled SQLite connections x 3 files), audit, web files, TLS
RECORDED_EXTRA = 2  # a recorded session's .fbs and .input files
SERIAL_EXTRA = 1  # a serial viewer's socketpair end held by its console's hub
EXHAUSTION = (errno.EMFILE, errno.ENFILE)
ACCEPT_SHORTAGES = EXHAUSTION + (errno.ENOBUFS, errno.ENOMEM)


def limit() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def open_count() -> int:
    return len(os.listdir("/proc/self/fd")) - 1  # less the one listdir held


def reserve(fd_limit: int) -> int:
    """The fixed reserve (store, audit, files): RESERVED, less under a small limit (a 32nd of it)."""
    return min(RESERVED, max(32, fd_limit // 32))


def pipes(fd_limit: int, most: int) -> int:
    """How many splice pipes the pool may hold under fd_limit: most, less under a small limit."""
    return min(most, max(4, fd_limit // 32))


def connections_allowed(pipe_fds: int, fd_limit: int | None = None) -> tuple[int, int, int]:
    """(connections the fd limit holds, the limit, fds set aside for everything else)."""
    fd_limit = fd_limit or limit()
    reserved = open_count() + pipe_fds + reserve(fd_limit)
    return max(1, (fd_limit - reserved) // PER_CONNECTION), fd_limit, reserved


def is_exhaustion(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in EXHAUSTION


def exhausted() -> bool:
    """True when the process cannot open one more descriptor (probed only on an error path)."""
    try:
        os.close(os.open(os.devnull, os.O_RDONLY))
        return False
    except OSError as error:
        return is_exhaustion(error)


class Spare:
    """One descriptor held back, to be given up for a moment when every other one is taken."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self.restore()

    def release(self) -> bool:
        """Close the spare; False when there was none to close."""
        if self._fd is None:
            return False
        os.close(self._fd)
        self._fd = None
        return True

    def restore(self) -> None:
        if self._fd is None:
            try:
                self._fd = os.open(os.devnull, os.O_RDONLY)
            except OSError:
                pass  # still short: the next release() finds none and the caller backs off

    def close(self) -> None:
        self.release()
