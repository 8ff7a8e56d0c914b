"""JSON-lines audit events, and the counters /metrics reports from them.

Each event is one line with the time and event name first. Counting here, where
the events are written, keeps the metrics and the audit trail from disagreeing.
"""

import collections
import datetime
import json
import os
import sys
import threading
import time


def _owner_only(path, flags):
    return os.open(path, flags, 0o600)


class Audit:
    def __init__(self, stream=None, clock=time.time):
        self.stream = stream or sys.stderr
        self.clock = clock
        self._lock = threading.Lock()
        self.handshakes = collections.Counter()  # (path, result) -> count
        self.bytes_up = 0    # client -> backend, ended sessions
        self.bytes_down = 0  # backend -> client, ended sessions

    @classmethod
    def open(cls, path):
        """Audit to a file (appended, line-buffered), or stderr when path is empty."""
        return cls(open(path, "a", buffering=1, encoding="utf-8", opener=_owner_only) if path else None)

    def record(self, event, **fields):
        stamp = datetime.datetime.fromtimestamp(self.clock(), datetime.timezone.utc)
        line = json.dumps({"time": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                           "event": event, **fields}, separators=(",", ":"))
        with self._lock:
            if event == "attempt":
                self.handshakes[fields.get("path", "-"), fields.get("result", "-")] += 1
            elif event == "session-end":
                self.bytes_up += fields.get("bytes_up", 0)
                self.bytes_down += fields.get("bytes_down", 0)
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self):
        if self.stream not in (sys.stderr, sys.stdout):
            self.stream.close()
