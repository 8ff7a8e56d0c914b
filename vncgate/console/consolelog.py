"""The console log of a followed serial console: in files (ConsoleLog, the newest bytes in
two halves, for SQLite and one host), or in the store when it shares consoles (Redis,
cluster.StoreLog); reading it (all, the last lines) and following it, for `vncgate-token
log` and GET /api/v1/consoles/log, which answer the same on every gateway."""

from __future__ import annotations

import os
import threading
import urllib.parse
from typing import Any, Callable

# -- the console log on disk ---------------------------------------------------------------

def log_path(folder: str, instance_id: str) -> str:
    """The log file of one instance: its id %-escaped, so no id can climb or hide."""
    return os.path.join(folder, urllib.parse.quote(instance_id, safe="-_").replace(".", "%2E") + ".log")


class ConsoleLog:
    """The newest bytes of one console as two files: NAME.log (being written) and NAME.log.1.
    When NAME.log reaches limit/2 bytes it replaces NAME.log.1, so together they always hold
    the newest output, between limit/2 and limit bytes of it, and never more."""

    def __init__(self, folder: str, instance_id: str, limit: int) -> None:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self.folder, self.instance_id = folder, instance_id
        self.path = log_path(folder, instance_id)
        self.half = max(1, limit // 2)
        self.file = open(self.path, "ab")
        self.size = self.file.tell()

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self.size >= self.half:
                self._rotate()
            piece = view[:self.half - self.size]
            self.file.write(piece)
            self.size += len(piece)
            view = view[len(piece):]
        self.file.flush()

    def _rotate(self) -> None:
        self.file.close()
        os.replace(self.path, self.path + ".1")
        self.file = open(self.path, "ab")
        self.size = 0

    def tail(self, count: int) -> bytes:
        """The log's last count bytes."""
        return (read_log(self.folder, self.instance_id) or b"")[-count:]

    def close(self) -> None:
        self.file.close()


def read_log(folder: str, instance_id: str, lines: int | None = None) -> bytes | None:
    """The console log of instance_id, oldest byte first: all that is kept, or its last
    `lines` lines. None when the instance has never been followed."""
    path = log_path(folder, instance_id)
    data, found = b"", False
    for name in (path + ".1", path):
        try:
            with open(name, "rb") as handle:
                data += handle.read()
            found = True
        except FileNotFoundError:
            pass
    if not found:
        return None
    return data if lines is None else last_lines(data, lines)


def console_output(store: Any, folder: str, instance_id: str, lines: int | None = None) -> bytes | None:
    """What `vncgate-token log` and GET /api/v1/consoles/log answer, the same on every gateway:
    the log in the store when it shares consoles (Redis), else the file log in folder."""
    if not getattr(store, "shares_consoles", False):
        return read_log(folder, instance_id, lines)
    found = store.console_log(instance_id)
    if found is None:
        return None
    return found[0] if lines is None else last_lines(found[0], lines)


def follow_output(store: Any, folder: str, instance_id: str, write: Callable[[bytes], object],
                  stopping: threading.Event) -> None:
    """Write what the console prints from now on until stopping is set (`log --follow`)."""
    if not getattr(store, "shares_consoles", False):
        follow_log(folder, instance_id, write, stopping)
        return
    found = store.console_log(instance_id)
    cursor = found[1] if found else "0-0"
    while not stopping.is_set():
        data, cursor = store.console_log_after(instance_id, cursor)
        if data:
            write(data)


def last_lines(data: bytes, count: int) -> bytes:
    """The last count lines of data (a final line without its newline counts)."""
    if count <= 0:
        return b""
    start = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(count):
        start = data.rfind(b"\n", 0, start)
        if start < 0:
            return data
    return data[start + 1:]


def follow_log(folder: str, instance_id: str, write: Callable[[bytes], object],
               stopping: threading.Event, poll: float = 0.2) -> None:
    """Write what is appended to the log from now on, across rotations, until stopping is set."""
    path = log_path(folder, instance_id)
    handle = None
    try:
        while not stopping.is_set():
            if handle is None:
                try:
                    handle = open(path, "rb")
                except FileNotFoundError:
                    stopping.wait(poll)
                    continue
                handle.seek(0, os.SEEK_END)
            data = handle.read()
            if data:
                write(data)
                continue
            try:
                rotated = os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                rotated = False
            if rotated:  # the rest of the old file was read above: go on at the new one's start
                handle.close()
                handle = open(path, "rb")
                continue
            stopping.wait(poll)
    finally:
        if handle is not None:
            handle.close()
