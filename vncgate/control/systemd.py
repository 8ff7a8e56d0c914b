"""What systemd hands a service and expects back, with the standard library only.

- Readiness and status: sd_notify's protocol, one datagram of "KEY=value" lines to the
  AF_UNIX socket named by $NOTIFY_SOCKET (a path, or "@name" in the abstract namespace).
- The watchdog: $WATCHDOG_USEC (and $WATCHDOG_PID, when set, must be this process).
- Socket activation: $LISTEN_PID (this process) and $LISTEN_FDS, the sockets from fd 3 on.
- The journal: $JOURNAL_STREAM names the device and inode of the stream journald reads;
  when stderr is that stream, log lines need no timestamp of their own.
Everything here is a no-op outside systemd, so the gateway runs the same without it.
"""

import logging
import os
import socket
from collections.abc import MutableMapping

log = logging.getLogger("vncgate.control.systemd")

LISTEN_FDS_START = 3


class Notifier:
    """Sends sd_notify messages; without $NOTIFY_SOCKET every send is a no-op that returns False."""

    def __init__(self, address: str = "") -> None:
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(1.0)  # a datagram socket's send does not wait long, but never forever

    @classmethod
    def from_environment(cls, environ: MutableMapping[str, str] = os.environ) -> "Notifier":
        return cls(environ.get("NOTIFY_SOCKET", ""))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """One datagram of these KEY=value lines; False when not sent (no socket, or it failed)."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)
        except OSError as error:
            log.debug("sd_notify to %r failed: %s", self.address, error)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(environ: MutableMapping[str, str] = os.environ) -> float | None:
    """Seconds within which systemd expects WATCHDOG=1, or None when it expects none."""
    usec, pid = environ.get("WATCHDOG_USEC", ""), environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6


def listen_sockets(environ: MutableMapping[str, str] = os.environ) -> list[socket.socket]:
    """The sockets systemd passed to this process (socket activation), in order; [] when none.
    The variables are removed so that no child process takes the sockets for its own."""
    pid, count = environ.get("LISTEN_PID", ""), environ.get("LISTEN_FDS", "")
    if pid != str(os.getpid()) or not count.isdigit():
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    sockets = []
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


def journal_reads_stderr(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Whether stderr is the stream $JOURNAL_STREAM names (journald adds the time itself)."""
    device, _, inode = environ.get("JOURNAL_STREAM", "").partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(2)
    except OSError:
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))
