"""One rule for text that strangers choose and operators read: names, log lines, table cells.

The characters that can forge or hide output on a terminal or in a line-oriented file: C0
controls (ESC starts an escape sequence, CR/LF start a line), DEL, C1 controls (U+009B is an
8-bit CSI), the Unicode line and paragraph separators, and the bidirectional controls (U+202E
shows text reversed). A name holding one is refused (name_problem); text on its way to a
terminal or a log line shows each as an escape (escape).
"""

import codecs
import re

CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
MAX_NAME = 1024


def name_problem(value: str) -> str:
    """Why value cannot be a name (an instance id, a host, a domain), or "" when it can."""
    if not value:
        return "is empty"
    if len(value) > MAX_NAME:
        return f"is longer than {MAX_NAME} characters"
    bad = CONTROL.search(value)
    if bad:
        return f"holds the control character U+{ord(bad.group()):04X}"
    return ""


def escape(text: str, keep: str = "") -> str:
    """text with every control character but those in keep as \\n, \\xNN or \\uNNNN."""
    return CONTROL.sub(lambda match: match.group() if match.group() in keep
                       else match.group().encode("unicode_escape").decode("ascii"), text)


class TerminalWriter:
    """Bytes (a console's output) made safe for a terminal, chunk by chunk: UTF-8 decoded
    across chunk boundaries (a bad byte as \\xNN), line ends kept as line ends (CR LF as LF),
    every other control character escaped."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("backslashreplace")
        self._cr = False  # the last chunk ended in CR: it may be half of a CR LF

    def feed(self, data: bytes, final: bool = False) -> str:
        text = ("\r" if self._cr else "") + self._decoder.decode(data, final)
        self._cr = text.endswith("\r") and not final
        if self._cr:
            text = text[:-1]
        return escape(text.replace("\r\n", "\n"), keep="\n\t")
