"""JSON-lines audit events, and the counters /metrics reports from them.

Each event is one line with the time and event name first. Counting here, where
the events are written, keeps the metrics and the audit trail from disagreeing.
"""

import collections
import datetime
import json
import os
import re
import threading
import time

# A word with a token's shape: 43 URL-safe characters standing alone (what a token, or an API
# key after its vgk_, looks like), holding upper and lower case letters as random ones do. Hashes
# (64 hex digits), token ids (8), session ids (12) and lower-case names never match.
_TOKEN_SHAPED = re.compile(r"(?<![A-Za-z0-9-])(vgk_)?(?=[A-Za-z0-9_-]{0,42}[a-z])(?=[A-Za-z0-9_-]{0,42}[A-Z])"
                           r"[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")
REDACTED = "<redacted>"


def redact(value):
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

    def __init__(self, fd=2, clock=time.time):
        self.fd = fd
        self.clock = clock
        self._lock = threading.Lock()  # the counters only
        self.handshakes = collections.Counter()  # (path, result) -> count
        self.bytes_up = 0    # client -> backend, ended sessions
        self.bytes_down = 0  # backend -> client, ended sessions

    @classmethod
    def open(cls, path):
        """Audit to a file (appended, owner-only), or stderr when path is empty."""
        if not path:
            return cls()
        return cls(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600))

    def record(self, event, **fields):
        stamp = datetime.datetime.fromtimestamp(self.clock(), datetime.timezone.utc)
        line = json.dumps({"time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                           "event": event, **{key: redact(value) for key, value in fields.items()}},
                          separators=(",", ":"))
        with self._lock:
            if event == "attempt":
                self.handshakes[fields.get("path", "-"), fields.get("result", "-")] += 1
            elif event == "session-end":
                self.bytes_up += fields.get("bytes_up", 0)
                self.bytes_down += fields.get("bytes_down", 0)
        data = memoryview((line + "\n").encode())
        while data:  # one write appends the whole line; a short one happens only on a full disk
            data = data[os.write(self.fd, data):]

    def close(self):
        if self.fd != 2:
            os.close(self.fd)
