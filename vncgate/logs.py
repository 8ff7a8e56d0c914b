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


class EscapingFormatter(logging.Formatter):
    """Every message, traceback and stack line escaped; traceback lines indented."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))

    def formatException(self, exc_info: Any) -> str:
        return "\n".join("    " + escape(line) for line in super().formatException(exc_info).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + escape(line) for line in stack_info.splitlines())


def setup(level: Union[int, str]) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(EscapingFormatter(FORMAT))
    logging.basicConfig(level=level, handlers=[handler])
