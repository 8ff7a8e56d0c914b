"""The recordings' file format: FBS 001.000 blocks (u32 length, the bytes padded to 4, u32
milliseconds; big-endian), written by BlockWriter (whole blocks only, spliced from a pipe or
copied) and checked and indexed by read_blocks, which says what is wrong with a damaged file
as a ReplayError. The layout of a recording's files is described in recording.py.
"""

from __future__ import annotations

import os
import struct

from vncgate.console import pipes, rfb
from vncgate.console.streams import Chunk

FBS_MAGIC = b"FBS 001.000\n"
INPUT_MAGIC = b"VGI 001.000\n"
# What a 3.3 viewer reads before ServerInit: the version, then security type None.
PREFIX = rfb.RFB_3_3 + struct.pack("!I", rfb.NONE)
MAX_BLOCK = 64 << 20  # no writer makes larger blocks; a larger length is damage
_U32 = struct.Struct("!I")


class ReplayError(rfb.RfbError):
    """A recording that cannot be played; .reason is the audit word (a refusals row); .told
    what the viewer is told after the row's sentence, if anything."""

    told = ""


def _pad(length: int) -> int:
    return -length % 4


class BlockWriter:
    """One file of timestamped blocks; counts the bytes it wrote. A block that cannot be
    written whole is cut off again, so the file always ends at a block's end."""

    def __init__(self, path: str, magic: bytes) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self.size = 0
        try:
            self._block((magic,), len(magic))
        except OSError:
            os.close(self.fd)
            raise

    @staticmethod
    def block_size(length: int) -> int:
        return 8 + length + _pad(length)

    def write(self, data: Chunk, ms: int) -> None:
        self._block((_U32.pack(len(data)), data, _trailer(len(data), ms)), self.block_size(len(data)))

    def splice(self, read_end: int, length: int, ms: int) -> None:
        """A block whose length bytes wait in a pipe: spliced into the file, never read here."""
        start = self.size
        try:
            self._put((_U32.pack(length),))
            pipes.splice_out(read_end, self.fd, length)
            self._put((_trailer(length, ms),))
        except OSError:
            self._cut(start)
            raise
        self.size = start + self.block_size(length)

    def _block(self, parts: tuple[Chunk, ...], size: int) -> None:
        try:
            self._put(parts)
        except OSError:
            self._cut(self.size)
            raise
        self.size += size

    def _put(self, parts: tuple[Chunk, ...]) -> None:
        written = os.writev(self.fd, parts)
        total = sum(len(part) for part in parts)
        if written < total:  # a short write (the disk filling up): the rest, or the error why not
            rest = memoryview(b"".join(parts))[written:]
            while rest:
                rest = rest[os.write(self.fd, rest):]

    def _cut(self, size: int) -> None:
        try:
            os.ftruncate(self.fd, size)
            os.lseek(self.fd, size, os.SEEK_SET)
        except OSError:
            pass  # the file stays cut mid-block: the replay says "truncated"

    def close(self) -> None:
        os.close(self.fd)


def _trailer(length: int, ms: int) -> bytes:
    return b"\0" * _pad(length) + _U32.pack(ms)


def read_blocks(path: str | None) -> list[tuple[int, int, int]]:
    """Check a whole .fbs file and index it: [(offset of the data, length, ms)]. Raises ReplayError."""
    if path is None:
        raise ReplayError("recording-missing", "not a session id")
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise ReplayError("recording-missing", f"{os.path.basename(path)} does not exist") from None
    except OSError as error:
        raise ReplayError("recording-missing", f"{os.path.basename(path)}: {error.strerror}") from None
    with handle:
        size = os.fstat(handle.fileno()).st_size
        if handle.read(len(FBS_MAGIC)) != FBS_MAGIC:
            raise ReplayError("recording-foreign", "no FBS 001.000 header")
        blocks, last = [], 0
        while True:
            head = handle.read(4)
            if not head:
                break
            if len(head) < 4:
                raise ReplayError("recording-truncated", f"a block header is cut at byte {handle.tell()}")
            length = _U32.unpack(head)[0]
            offset = handle.tell()
            if length > MAX_BLOCK:
                raise ReplayError("recording-corrupt", f"a block of {length} bytes at byte {offset - 4}")
            end = offset + length + _pad(length)
            if end + 4 > size:
                raise ReplayError("recording-truncated", f"the block at byte {offset - 4} is cut")
            handle.seek(end)
            ms = _U32.unpack(handle.read(4))[0]
            if ms < last:
                raise ReplayError("recording-corrupt", f"time runs backwards at byte {end}")
            blocks.append((offset, length, ms))
            last = ms
    return blocks
