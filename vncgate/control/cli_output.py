"""What vncgate-token writes for an operator to read: tables, and a console's log. On a
terminal, every control character a stranger chose (an instance name, a guest's output) is
shown as an escape (vncgate.text), so that it cannot move the cursor, recolour, reverse or
forge what the operator reads, or set their clipboard (OSC 52); to a pipe or a file, and with
`log --raw`, the text and bytes go as they are.
"""

from typing import Callable, TextIO

from vncgate import text


def is_terminal(out: TextIO) -> bool:
    isatty = getattr(out, "isatty", None)
    return bool(isatty and isatty())


def write_table(out: TextIO, header: tuple, rows: list) -> None:
    """Columns, padded to the widest cell; cells escaped on a terminal."""
    table = [header] + rows
    if is_terminal(out):
        table = [tuple(text.escape(cell) for cell in line) for line in table]
    widths = [max(len(line[column]) for line in table) for column in range(len(header))]
    for line in table:
        out.write("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() + "\n")


def log_writer(out: TextIO, raw: bool) -> Callable[[bytes], object]:
    """Where a console's bytes go: as they are to a file or pipe (or with raw), but on a terminal
    with line ends kept and every other control character shown as an escape."""
    if is_terminal(out) and not raw:
        terminal = text.TerminalWriter()
        return lambda chunk: out.write(terminal.feed(chunk))
    sink = getattr(out, "buffer", None)
    if sink is not None:
        return sink.write
    return lambda chunk: out.write(chunk.decode("utf-8", "replace"))
