"""What writing one audit line costs, with and without its token redaction (issue 25).

Usage: python3 bench/audit.py [--lines 20000] [--rounds 5]

A session-end line with the fields a real one has, written to /dev/null through vncgate.audit.Audit,
--lines times per round; median microseconds per line over --rounds, with redaction (the
gateway's) and with redact() replaced by the identity (what it cost before).
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vncgate import audit  # noqa: E402

FIELDS = {"client": "127.0.0.1:40000", "path": "websocket", "console_type": "ws-vnc", "instance_id": "vm-123",
          "token_id": "abcdef12", "session_id": "0123456789ab", "reason": "shutdown", "bytes_up": 100,
          "bytes_down": 1000, "duration": 1.5}


def per_line(trail: audit.Audit, lines: int) -> float:
    began = time.perf_counter()
    for _ in range(lines):
        trail.record("session-end", **FIELDS)
    return (time.perf_counter() - began) / lines * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    trail = audit.Audit(os.open(os.devnull, os.O_WRONLY))
    redacting = [per_line(trail, args.lines) for _ in range(args.rounds)]
    original = audit.redact
    audit.redact = lambda value: value
    try:
        plain = [per_line(trail, args.lines) for _ in range(args.rounds)]
    finally:
        audit.redact = original
    print(f"audit line, redacted: {statistics.median(redacting):.1f} us; "
          f"not redacted: {statistics.median(plain):.1f} us (median of {args.rounds} x {args.lines})")


if __name__ == "__main__":
    main()
