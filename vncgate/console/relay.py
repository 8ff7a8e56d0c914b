"""Moving bytes both ways between a client and a backend, counting them.

One thread per direction, each blocking in recv: in CPython that is the cheapest
loop (the GIL is released inside the system calls) and it lets one direction
stall on a slow reader without holding up the other. A direction is a Source
and a Sink, so the websocket path plugs in its framing without the relay
knowing about it. stop() from any thread wakes both directions by shutting the
sockets down.

A spliced direction waits for its socket to be readable holding nothing but the
socket: the kernel pipe it splices through is lent by a small shared pool while
bytes move and given back once drained, so an idle session holds two file
descriptors, not six, and the pipes in use are bounded. When every pipe is lent
(or none can be made), the chunk is copied through user space instead.

A recorded session's server side is spliced too (TeeDirection): tee(2) duplicates each
chunk's pages into a second pooled pipe, which the recorder splices into its file, so the
recorded bytes never enter Python either.

This module keeps the Directions and the Relay; the pipe primitives (splice, tee, the pipe
pool) are in pipes.py, the Sources and Sinks in streams.py.
"""

from __future__ import annotations

import os
import select
import socket
import ssl
import threading
import time
from typing import TYPE_CHECKING, Callable, Union

from vncgate.console.pipes import (
    CAN_SPLICE,
    CAN_TEE,
    PIPES,
    PipePool,
    read_pipe,
    tee,
)
from vncgate.console.streams import (
    SocketSink,
    SocketSource,
    tapped,
)
from vncgate.net import tls

if TYPE_CHECKING:
    from vncgate.console.recording import Recorder
    from vncgate.console.streams import Sink, Source, SpliceSink

Sock = Union[socket.socket, tls.TlsStream]

# The pipe primitives moved to pipes.py, the Sources and Sinks to streams.py; their names
# stay importable from here.

COPY_SIZE = 64 * 1024  # a spliced direction's chunk when no pipe is free
LINGER = 1.0  # seconds the backend's last bytes may still flow after the client's side ended


class Ended(OSError):
    """A direction's protocol says the whole session is over; .reason is the audit word."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class Direction:
    """One way of a relay: moves bytes until EOF, counts them, and reports how it ended."""

    # What each kind of Direction provides (declared for the type checker only).
    move: Callable[[Relay], None]
    close_write: Callable[[], None]

    def __init__(self, name: str) -> None:
        self.name = name
        self.bytes = 0
        self.failed: OSError | None = None  # the OSError that ended it, if any

    def pump(self, relay: Relay) -> None:
        try:
            self.move(relay)
            relay.ended(self)  # on record first: the half-close may make the other side end at once
            if not relay.woken:  # half-close: the other way keeps going (woken: both are ending)
                self.close_write()
        except Ended as end:  # this side's protocol ends the session as a whole
            relay.stop(end.reason)
        except OSError as error:
            self.failed = error
            relay.stop(f"{self.name}-error")  # an error is not a half-close: end both ways
        relay.ended(self)


class CopyDirection(Direction):
    """Through user space: a Source's chunks written to a Sink (framing, TLS)."""

    def __init__(self, name: str, source: Source, sink: Sink) -> None:
        super().__init__(name)
        self.source = source
        self.sink = sink
        self.close_write = sink.close_write

    def move(self, relay: Relay) -> None:
        write = self.sink.write
        for chunk in self.source.chunks():
            write(chunk)
            self.bytes += len(chunk)
            relay.last_active = time.monotonic()


class SpliceDirection(Direction):
    """A socket to a Sink through a pooled kernel pipe with os.splice: the bytes never enter
    Python (the Sink's write_from splices them on, maybe after a frame header of its own).
    Between chunks it waits in poll() holding no pipe."""

    def __init__(self, name: str, source_sock: Sock, sink: SpliceSink, initial: bytes = b"",
                 pipes: PipePool = PIPES) -> None:
        super().__init__(name)
        self.source_sock = source_sock
        self.sink = sink
        self.initial = initial
        self.pipes = pipes

    def move(self, relay: Relay) -> None:
        if self.initial:
            self.bytes += self._pass(self.initial)
        readable = select.poll()
        readable.register(self.source_sock.fileno(), select.POLLIN)
        while True:
            readable.poll()
            count = self._chunk()
            if not count:
                return
            self.bytes += count
            relay.last_active = time.monotonic()

    def _chunk(self) -> int:
        """Moves what the source has (one chunk); returns how many bytes, 0 at its end."""
        pipe = self.pipes.take()
        return self._copy() if pipe is None else self._splice(pipe)

    def _splice(self, pipe: tuple[int, int, int]) -> int:
        """One chunk through the pipe: as much as is there, then all of it out."""
        read_end, write_end, capacity = pipe
        drained = False
        try:
            count = os.splice(self.source_sock.fileno(), write_end, capacity, flags=os.SPLICE_F_MOVE)
            if count:
                self.sink.write_from(read_end, count)
            drained = True
            return count
        finally:
            self.pipes.give_back(pipe, drained)  # a pipe with bytes left in it is closed, not reused

    def _copy(self) -> int:
        return self._pass(self.source_sock.recv(COPY_SIZE))

    def _pass(self, data: bytes) -> int:
        if data:
            self.sink.write(data)
        return len(data)

    def close_write(self) -> None:
        self.sink.close_write()


class TeeDirection(SpliceDirection):
    """A spliced direction whose bytes a recorder also writes, still without entering Python:
    each chunk spliced into a pipe is tee'd into a second pipe that recorder.server_pipe()
    splices into its file. A chunk is copied instead, and shown to recorder.server(), while
    the recorder follows an RFB handshake (it must read those bytes) or when no second pipe
    is free; once the recorder has stopped, chunks are only spliced."""

    def __init__(self, name: str, source_sock: Sock, sink: SpliceSink, recorder: Recorder, initial: bytes = b"",
                 pipes: PipePool = PIPES) -> None:
        super().__init__(name, source_sock, sink, initial, pipes)
        self.recorder = recorder

    def _chunk(self) -> int:
        if self.recorder.stopped:
            return super()._chunk()
        if self.recorder.following:
            return self._copy()
        pipe = self.pipes.take()
        if pipe is None:
            return self._copy()
        copy = self.pipes.take()
        if copy is None:
            self.pipes.give_back(pipe)
            return self._copy()
        return self._tee(pipe, copy)

    def _tee(self, pipe: tuple[int, int, int], copy: tuple[int, int, int]) -> int:
        read_end, write_end, capacity = pipe
        drained = copy_drained = False
        try:
            count = os.splice(self.source_sock.fileno(), write_end, capacity, flags=os.SPLICE_F_MOVE)
            teed = tee(read_end, copy[1], count) if count else 0
            copy_drained = self.recorder.server_pipe(copy[0], teed)  # recorded before it is passed on
            if teed:
                self.sink.write_from(read_end, teed)
            if teed < count:  # the copy pipe has fewer slots than this one: the rest is copied
                self._pass(read_pipe(read_end, count - teed))
            drained = True
            return count
        finally:
            self.pipes.give_back(pipe, drained)  # a pipe with bytes left in it is closed, not reused
            self.pipes.give_back(copy, copy_drained)

    def _pass(self, data: bytes) -> int:
        if data:
            self.recorder.server(data)
        return super()._pass(data)


def splices(*socks: object) -> bool:
    """Whether bytes between these may be spliced: the kernel has them, none is TLS."""
    return CAN_SPLICE and not any(isinstance(sock, (ssl.SSLSocket, tls.TlsStream)) for sock in socks)


def from_backend(backend_sock: Sock, sink: SpliceSink, leftover: bytes = b"", recorder: Recorder | None = None, *,
                 splice: bool) -> Direction:
    """The backend-to-client Direction into sink: spliced when it may be (splice: see
    splices()), tee'd as well when recorded, else copied through Python (and shown to the
    recorder)."""
    if splice and recorder is None:
        return SpliceDirection("backend", backend_sock, sink, leftover)
    if splice and CAN_TEE and recorder is not None:  # it is not None here: the line above took None
        return TeeDirection("backend", backend_sock, sink, recorder, leftover)
    return CopyDirection("backend", tapped(SocketSource(backend_sock, leftover), recorder.server if recorder else None),
                         sink)


class Relay:
    """Relays client <-> backend until both directions end or stop() is called."""

    def __init__(self, client_sock: Sock, backend_sock: Sock, upstream: Direction | tuple[Source, Sink],
                 downstream: Direction | tuple[Source, Sink]) -> None:
        """upstream (client -> backend) and downstream: Directions, or (Source, Sink) pairs to copy."""
        self.sockets = (client_sock, backend_sock)
        self.upstream = upstream if isinstance(upstream, Direction) else CopyDirection("client", *upstream)
        self.downstream = (downstream if isinstance(downstream, Direction)
                           else CopyDirection("backend", *downstream))
        self.last_active = time.monotonic()
        self.end_reason: str | None = None
        self.woken = False  # stop() has shut both sockets down
        self.linger = LINGER
        self._lock = threading.Lock()
        self._helper: threading.Thread | None = None  # the backend's way, once start()ed

    @classmethod
    def raw(cls, client_sock: Sock, backend_sock: Sock, backend_leftover: bytes = b"", client_leftover: bytes = b"",
            upstream_sink: Callable[[Sink], Sink] | None = None, recorder: Recorder | None = None) -> Relay:
        """A byte-for-byte relay (the XVP path): spliced where the kernel can, else copied (a TLS
        side, as an SSLSocket or a TlsStream, has its bytes in OpenSSL, not the kernel).
        upstream_sink(sink): the Sink the client's bytes go to in front of the backend's (a
        console policy reading them); that direction is then copied, the other still spliced.
        recorder (.client, .server, .server_pipe): sees every chunk both ways before it is
        passed on; the client's few bytes are then copied, the server's tee'd (TeeDirection)."""
        client_sock, backend_sock = (tls.TlsStream(sock) if isinstance(sock, ssl.SSLSocket) else sock
                                     for sock in (client_sock, backend_sock))
        splice = splices(client_sock, backend_sock)
        if upstream_sink is not None or recorder is not None or not splice:
            watcher = recorder.client if recorder else None
            sink = SocketSink(backend_sock)
            upstream: Direction = CopyDirection("client", tapped(SocketSource(client_sock, client_leftover), watcher),
                                                upstream_sink(sink) if upstream_sink else sink)
        else:
            upstream = SpliceDirection("client", client_sock, SocketSink(backend_sock), client_leftover)
        downstream = from_backend(backend_sock, SocketSink(client_sock), backend_leftover, recorder, splice=splice)
        return cls(client_sock, backend_sock, upstream, downstream)

    @property
    def bytes_up(self) -> int:
        return self.upstream.bytes

    @property
    def bytes_down(self) -> int:
        return self.downstream.bytes

    def idle_seconds(self) -> float:
        return time.monotonic() - self.last_active

    def start(self) -> threading.Thread:
        """The backend's bytes flow from here on, in a thread of the relay's own (returned); run()
        moves the client's (in another thread, maybe: the gateway's handshake thread starts a relay
        and ends)."""
        for sock in self.sockets:
            sock.settimeout(None)
            tune(sock)
        helper = threading.Thread(target=self.downstream.pump, args=(self,), name="relay-down", daemon=True)
        helper.start()
        self._helper = helper
        return helper

    def run(self) -> str | None:
        """Relay the client's bytes in this thread (and the backend's in start()'s, started here
        if it was not); returns when both ways are done, their sockets closed."""
        try:
            helper = self._helper or self.start()
            self.upstream.pump(self)
            # The client's side is over (it went, or stop()): the backend's bytes in flight get a
            # short linger, then both ends close. A VNC session has no half-close to keep open:
            # a console that keeps its connection and says nothing must not keep the session.
            helper.join(self.linger)
        finally:
            # Past the linger (the client's way ended it: end_reason is set), or this way failed:
            # the backend's way ends too.
            if self._helper is not None and self._helper.is_alive():
                self.stop(self.end_reason or "internal-error")
                self._helper.join()
            for sock in self.sockets:
                sock.close()
        return self.end_reason

    def ended(self, direction: Direction) -> None:
        self.ended_by(f"{direction.name}-closed")

    def ended_by(self, reason: str) -> None:
        with self._lock:
            if self.end_reason is None:
                self.end_reason = reason

    def stop(self, reason: str) -> None:
        """End the relay from any thread: both blocked reads return at once. (Once is enough:
        at a SIGTERM every system call saved is a GIL hand-over saved, times thousands.)"""
        self.ended_by(reason)
        with self._lock:
            woken, self.woken = self.woken, True
        if not woken:
            for sock in self.sockets:
                tls.wake(sock)


def tune(sock: Sock) -> None:
    """Low latency for input events; keepalive so a vanished peer ends its session."""
    if getattr(sock, "family", None) == socket.AF_UNIX:
        return  # a serial viewer's or a replay's socketpair end: nothing to tune
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
