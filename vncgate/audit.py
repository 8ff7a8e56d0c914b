"""JSON-lines audit events, and the counters /metrics reports from them.

Each event is one line with the time and event name first. Counting here, where
the events are written, keeps the metrics and the audit trail from disagreeing.

The audit trail is a resource strangers can make the gateway spend, so it is bounded
three ways: a line is at most MAX_FIELD characters a field (a longer one is cut, with a
marker saying how much); a refused address's refusals are written at most once per
SAMPLE_SECONDS (sampled(): the others are counted and the next written line says how
many were left out); and with audit_max_bytes the file is rotated, keeping audit_keep
older files. A write the disk refuses (ENOSPC, EIO) never reaches a handler: the line
is dropped, counted (vncgate_audit_dropped_total) and logged once a minute at most.
"""

import collections
import datetime
import json
import logging
import os
import re
import threading
import time
from typing import Any, Callable, Optional

log = logging.getLogger("vncgate.audit")

MAX_FIELD = 512  # characters a string field keeps; the rest is cut with CUT_MARK
CUT_MARK = "...[cut {} chars]"
SAMPLE_SECONDS = 10.0  # a sampled key's lines: one per this many seconds
SAMPLE_KEYS = 10_000  # sampled keys remembered at most
WARN_EVERY = 60.0  # seconds between two warnings about dropped lines


def bounded(value: Any) -> Any:
    """value, with a string longer than MAX_FIELD cut and marked."""
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + CUT_MARK.format(len(value) - MAX_FIELD)
    return value

# A word with a token's shape: 43 URL-safe characters standing alone (what a token, or an API
# key after its vgk_, looks like), holding upper and lower case letters as random ones do. Hashes
# (64 hex digits), token ids (8), session ids (12) and lower-case names never match.
_TOKEN_SHAPED = re.compile(r"(?<![A-Za-z0-9-])(vgk_)?(?=[A-Za-z0-9_-]{0,42}[a-z])(?=[A-Za-z0-9_-]{0,42}[A-Z])"
                           r"[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")
REDACTED = "<redacted>"


def redact(value: object) -> object:
    """A field's value with every token-shaped word replaced: whatever a client sent where a
    name or an id goes (DELETE /api/v1/consoles/TOKEN), a token never reaches the audit file."""
    if isinstance(value, str):
        return _TOKEN_SHAPED.sub(REDACTED, value)
    if isinstance(value, dict):
        return {key: redact(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(item) for item in value]
    return value


class Audit:
    """Appends each event to a file descriptor in one write(2): an audit file opened with
    O_APPEND, or stderr. No lock is held while writing: at a SIGTERM thousands of sessions
    end at once, and a lock held across a system call (which hands the GIL over) makes
    every one of them queue behind it."""

    def __init__(self, fd: int = 2, clock: Callable[[], float] = time.time, path: str = "",
                 max_bytes: int = 0, keep: int = 5, monotonic: Callable[[], float] = time.monotonic) -> None:
        """path, max_bytes, keep: the file fd is open on, rotated past max_bytes (0: never) to
        path.1 .. path.keep."""
        self.fd = fd
        self.clock = clock
        self.monotonic = monotonic
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._lock = threading.Lock()  # the counters only
        self._rotating = threading.Lock()
        self._retired: Optional[int] = None  # the fd before the last rotation, closed at the next
        self.size = os.fstat(fd).st_size if path else 0
        self.handshakes: collections.Counter = collections.Counter()  # (path, result) -> count
        self.bytes_up = 0    # client -> backend, ended sessions
        self.bytes_down = 0  # backend -> client, ended sessions
        self.dropped = 0  # lines the disk refused
        self.suppressed = 0  # lines left out by sampled()
        self._next_warning = 0.0
        self._samples: dict = {}  # key -> [when the last line was written, lines left out since]

    @classmethod
    def open(cls, path: str, max_bytes: int = 0, keep: int = 5) -> "Audit":
        """Audit to a file (appended, owner-only), or stderr when path is empty."""
        if not path:
            return cls()
        return cls(_open(path), path=path, max_bytes=max_bytes, keep=keep)

    def reopen(self) -> None:
        """SIGHUP after logrotate moved the file: write to a new file of the same name. dup2
        swaps the descriptor in one step, so a line being written goes to one file or the other."""
        if not self.path:
            return
        fresh = _open(self.path)
        try:
            with self._rotating:
                os.dup2(fresh, self.fd)
                self.size = os.fstat(self.fd).st_size
        finally:
            os.close(fresh)

    def count(self, event: str, fields: dict) -> None:
        """The counters an event adds to, whether its line is written or not."""
        with self._lock:
            if event == "attempt":
                self.handshakes[fields.get("path", "-"), fields.get("result", "-")] += 1
            elif event == "session-end":
                self.bytes_up += fields.get("bytes_up", 0)
                self.bytes_down += fields.get("bytes_down", 0)

    def record(self, event: str, /, **fields: Any) -> None:
        self.count(event, fields)
        self._write(event, fields)

    def sampled(self, source: str, event: str, /, **fields: Any) -> None:
        """An event repeated by one source (a throttled address): its first line, then one per
        SAMPLE_SECONDS with "suppressed": how many were left out since; all are counted."""
        self.count(event, fields)
        now = self.monotonic()
        with self._lock:
            sample = self._samples.get(source)
            if sample is not None and now - sample[0] < SAMPLE_SECONDS:
                sample[1] += 1
                self.suppressed += 1
                return
            if len(self._samples) >= SAMPLE_KEYS:
                self._samples = {kept: value for kept, value in self._samples.items()
                                 if now - value[0] < SAMPLE_SECONDS}
                if len(self._samples) >= SAMPLE_KEYS:  # that many sources at once: start afresh
                    self._samples.clear()
            left_out = sample[1] if sample else 0
            self._samples[source] = [now, 0]
        self._write(event, {**fields, **({"suppressed": left_out} if left_out else {})})

    def _write(self, event: str, fields: dict) -> None:
        stamp = datetime.datetime.fromtimestamp(self.clock(), datetime.timezone.utc)
        via = getattr(fields.get("client"), "via", None)  # the proxy that named the client (front.proxied)
        line = json.dumps({"time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                           "event": event, **{key: bounded(redact(value)) for key, value in fields.items()},
                           **({"via": bounded(redact(via))} if via else {})}, separators=(",", ":"))
        data = memoryview((line + "\n").encode())
        try:
            while data:  # one write appends the whole line; a short one happens only on a full disk
                data = data[os.write(self.fd, data):]
        except OSError as error:  # a full or failing disk: the handler's answer still goes out
            self._dropped(error)
            return
        if self.max_bytes:
            self.size += len(line) + 1  # not exact under concurrent writers; the rotation fstat()s
            if self.size > self.max_bytes:
                self._rotate()

    def _dropped(self, error: OSError) -> None:
        now = self.monotonic()
        with self._lock:
            self.dropped += 1
            warn = now >= self._next_warning
            if warn:
                self._next_warning = now + WARN_EVERY
        if warn:
            log.warning("audit lines dropped (%d so far): cannot write the audit log: %s",
                        self.dropped, error.strerror or error)

    def _rotate(self) -> None:
        """path -> path.1 -> ... -> path.keep (the oldest deleted); a new path. One thread rotates;
        writers meanwhile still append to the old fd (it is closed at the next rotation, never
        while a writer may hold its number)."""
        if not self._rotating.acquire(blocking=False):
            return
        try:
            if os.fstat(self.fd).st_size <= self.max_bytes:
                self.size = os.fstat(self.fd).st_size
                return
            for number in range(self.keep - 1, 0, -1):  # path.keep is overwritten: the oldest goes
                try:
                    os.replace(f"{self.path}.{number}", f"{self.path}.{number + 1}")
                except FileNotFoundError:
                    pass
            os.replace(self.path, f"{self.path}.1")
            fd = _open(self.path)
            if self._retired is not None:
                os.close(self._retired)
            self._retired, self.fd, self.size = self.fd, fd, 0
        except OSError as error:
            self._dropped(error)
        finally:
            self._rotating.release()

    def close(self) -> None:
        if self.fd != 2:
            os.close(self.fd)
        if self._retired is not None:
            os.close(self._retired)
            self._retired = None


def _open(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
