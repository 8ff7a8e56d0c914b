"""The Sources and Sinks a relay direction reads and writes: a socket read into one reused
buffer (SocketSource), exact-size reads for the protocol bytes the gateway speaks itself
(ChunkReader), a Source shown to a recorder first (TappedSource, tapped), a socket whose reads
and writes share one deadline (DeadlineSocket), and a socket written or spliced into
(SocketSink).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable, Protocol, Union

from vncgate.console.pipes import splice_out

if TYPE_CHECKING:
    from vncgate.net.tls import TlsStream

Chunk = Union[bytes, bytearray, memoryview]


class Source(Protocol):
    """What a relay direction reads: chunks until the end (views may live only until the next)."""

    def chunks(self) -> Iterator[Chunk]: ...


class Sink(Protocol):
    """What a relay direction writes to."""

    def write(self, data: Chunk, /) -> None: ...

    def close_write(self) -> None: ...


class SpliceSink(Sink, Protocol):
    """A Sink a spliced direction writes to: bytes waiting in a pipe are spliced on (write_from)."""

    def write_from(self, read_end: int, count: int, /) -> None: ...

BUFFER_SIZE = 256 * 1024


class SocketSource:
    """Reads a socket into one reused buffer; yields views that live until the next read."""

    def __init__(self, sock: socket.socket | TlsStream | DeadlineSocket, initial: bytes = b"") -> None:
        self.sock = sock
        self.initial = initial
        self.buffer = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buffer)

    def chunks(self) -> Iterator[Chunk]:
        if self.initial:
            yield self.initial
        recv_into, view = self.sock.recv_into, self.view
        while True:
            count = recv_into(view)
            if not count:
                return
            yield view[:count]


class ChunkReader:
    """Exact-size reads over a Source, for the few protocol bytes the gateway speaks itself
    (RFB security) before relaying; .surplus is what was read beyond them. Afterwards it
    is itself the Source of the rest: the surplus, then the source's further chunks."""

    def __init__(self, source: Source, initial: bytes = b"") -> None:
        self._chunks = source.chunks()
        self.surplus = initial

    def read_exact(self, count: int) -> bytes:
        while len(self.surplus) < count:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise ConnectionError("the client closed during the handshake")
            self.surplus += bytes(chunk)  # copied: a SocketSource reuses its buffer
        data, self.surplus = self.surplus[:count], self.surplus[count:]
        return data

    def chunks(self) -> Iterator[Chunk]:
        if self.surplus:
            yield self.surplus
        yield from self._chunks


class TappedSource:
    """A Source whose every chunk is shown to observe(chunk) first (a session's recorder)."""

    def __init__(self, source: Source, observe: Callable[[Chunk], object]) -> None:
        self.source = source
        self.observe = observe

    def chunks(self) -> Iterator[Chunk]:
        observe = self.observe
        for chunk in self.source.chunks():
            observe(chunk)
            yield chunk


def tapped(source: Source, observe: Callable[[Chunk], object] | None) -> Source:
    """source, seen by observe when there is one."""
    return source if observe is None else TappedSource(source, observe)


class DeadlineSocket:
    """A socket whose every read and write waits only until one deadline (socket.timeout
    after): for the bytes the gateway speaks itself, which a client may drip or pad."""

    def __init__(self, sock: socket.socket | TlsStream, seconds: float) -> None:
        self.sock = sock
        self.deadline: float | None = time.monotonic() + seconds

    def _armed(self) -> socket.socket | TlsStream:
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the deadline has passed")
            self.sock.settimeout(remaining)
        return self.sock

    def recv(self, size: int) -> bytes:
        return self._armed().recv(size)

    def recv_into(self, view: memoryview | bytearray) -> int:
        return self._armed().recv_into(view)

    def sendall(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)  # send by send: each waits only until the one deadline
        while view:
            view = view[self._armed().send(view):]

    def lift(self) -> None:
        """No deadline from now on: the relay waits as long as the session lasts."""
        self.deadline = None
        self.sock.settimeout(None)


class SocketSink:
    """Bytes to a socket: written (write), or spliced from a pipe (write_from)."""

    def __init__(self, sock: socket.socket | TlsStream) -> None:
        self.sock = sock
        self.write: Callable[[Chunk], None] = sock.sendall

    def write_from(self, read_end: int, count: int) -> None:
        splice_out(read_end, self.sock.fileno(), count)

    def close_write(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)
