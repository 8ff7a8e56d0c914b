"""The gateway's log lines: one event, one line, whatever the text inside it.

Log messages carry words that clients and backends chose (a request line, an RFB
failure reason, an error text). Written raw, a CR/LF or an escape sequence in them
would start a forged line (audit and log share stderr by default) or rewrite an
operator's terminal. Every control character is written as an escape instead, and
a traceback's lines are indented, so that a line starting at column 0 is always one
the gateway began.
"""

import logging
from typing import Any, Union

from vncgate.text import escape

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOURNAL_FORMAT = "%(levelname)s %(name)s: %(message)s"  # journald stamps each line itself
# syslog priorities, as the "<N>" prefix journald reads (SyslogLevelPrefix=yes, its default)
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class EscapingFormatter(logging.Formatter):
    """Every message, traceback and stack line escaped; traceback lines indented."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))

    def formatException(self, exc_info: Any) -> str:
        return "\n".join("    " + escape(line) for line in super().formatException(exc_info).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + escape(line) for line in stack_info.splitlines())


class JournalFormatter(EscapingFormatter):
    """No timestamp, and the line's syslog priority as a "<N>" prefix for journald."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITIES.get(record.levelno, 6)}>{super().format(record)}"


def setup(level: Union[int, str], journal: bool = False) -> None:
    """Log lines to stderr; journal: journald reads stderr (systemd.journal_reads_stderr)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JournalFormatter(JOURNAL_FORMAT) if journal else EscapingFormatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
