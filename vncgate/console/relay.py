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
"""

import ctypes
import errno
import fcntl
import os
import select
import socket
import ssl
import threading
import time

from vncgate.net import tls

BUFFER_SIZE = 256 * 1024
COPY_SIZE = 64 * 1024  # a spliced direction's chunk when no pipe is free
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; named in fcntl from Python 3.10
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
CAN_SPLICE = hasattr(os, "splice")
LINGER = 1.0  # seconds the backend's last bytes may still flow after the client's side ended


def _libc_tee():
    """libc's tee(2) through ctypes (Python's os has splice but no tee), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).tee
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint)
    function.restype = ctypes.c_ssize_t
    return function


_TEE = _libc_tee()
CAN_TEE = CAN_SPLICE and _TEE is not None


def tee(read_end, write_end, count):
    """Up to count bytes at the front of one pipe duplicated into another; the first keeps
    them (nothing is consumed). Returns how many; raises OSError as os.splice does."""
    while True:
        done = _TEE(read_end, write_end, count, 0)
        if done >= 0:
            return done
        code = ctypes.get_errno()
        if code != errno.EINTR:
            raise OSError(code, os.strerror(code))


def read_pipe(read_end, count):
    """Exactly count bytes that are waiting in a pipe."""
    parts = []
    while count:
        part = os.read(read_end, count)
        if not part:
            raise OSError(errno.EIO, "the pipe held fewer bytes than it was given")
        parts.append(part)
        count -= len(part)
    return b"".join(parts)


class Ended(OSError):
    """A direction's protocol says the whole session is over; .reason is the audit word."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class PipePool:
    """Splice pipes lent while bytes move. At most `limit` exist at once (2 fds each: the
    gateway's fd budget counts them); up to `keep` drained ones wait for the next chunk."""

    def __init__(self, limit=64, keep=16, size=PIPE_SIZE):
        self.limit = limit
        self.keep = keep
        self.size = size
        self._free = []  # (read end, write end, capacity)
        self._lent = 0
        self._lock = threading.Lock()

    def take(self):
        """A drained pipe, or None when all are lent or the process has no fds to make one."""
        with self._lock:
            if self._free:
                self._lent += 1
                return self._free.pop()
            if self._lent >= self.limit:
                return None
            self._lent += 1
        try:
            read_end, write_end = os.pipe()
        except OSError:
            self._returned()
            return None
        try:
            fcntl.fcntl(write_end, F_SETPIPE_SZ, self.size)
        except OSError:
            pass  # past the user's pipe-page allowance: the default size still works
        return read_end, write_end, fcntl.fcntl(write_end, F_GETPIPE_SZ)

    def give_back(self, pipe, drained=True):
        with self._lock:
            self._lent -= 1
            if drained and len(self._free) < self.keep:
                self._free.append(pipe)
                return
        os.close(pipe[0])
        os.close(pipe[1])

    def _returned(self):
        with self._lock:
            self._lent -= 1


PIPES = PipePool()


class SocketSource:
    """Reads a socket into one reused buffer; yields views that live until the next read."""

    def __init__(self, sock, initial=b""):
        self.sock = sock
        self.initial = initial
        self.buffer = bytearray(BUFFER_SIZE)
        self.view = memoryview(self.buffer)

    def chunks(self):
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

    def __init__(self, source, initial=b""):
        self._chunks = source.chunks()
        self.surplus = initial

    def read_exact(self, count):
        while len(self.surplus) < count:
            chunk = next(self._chunks, None)
            if chunk is None:
                raise ConnectionError("the client closed during the handshake")
            self.surplus += bytes(chunk)  # copied: a SocketSource reuses its buffer
        data, self.surplus = self.surplus[:count], self.surplus[count:]
        return data

    def chunks(self):
        if self.surplus:
            yield self.surplus
        yield from self._chunks


class TappedSource:
    """A Source whose every chunk is shown to observe(chunk) first (a session's recorder)."""

    def __init__(self, source, observe):
        self.source = source
        self.observe = observe

    def chunks(self):
        observe = self.observe
        for chunk in self.source.chunks():
            observe(chunk)
            yield chunk


def tapped(source, observe):
    """source, seen by observe when there is one."""
    return source if observe is None else TappedSource(source, observe)


class DeadlineSocket:
    """A socket whose every read and write waits only until one deadline (socket.timeout
    after): for the bytes the gateway speaks itself, which a client may drip or pad."""

    def __init__(self, sock, seconds):
        self.sock = sock
        self.deadline = time.monotonic() + seconds

    def _armed(self):
        if self.deadline is not None:
            remaining = self.deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout("the deadline has passed")
            self.sock.settimeout(remaining)
        return self.sock

    def recv(self, size):
        return self._armed().recv(size)

    def recv_into(self, view):
        return self._armed().recv_into(view)

    def sendall(self, data):
        view = memoryview(data)  # send by send: each waits only until the one deadline
        while view:
            view = view[self._armed().send(view):]

    def lift(self):
        """No deadline from now on: the relay waits as long as the session lasts."""
        self.deadline = None
        self.sock.settimeout(None)


def splice_out(read_end, fd, count):
    """All count bytes waiting in a pipe, spliced to fd (a socket, a file)."""
    while count:
        count -= os.splice(read_end, fd, count, flags=os.SPLICE_F_MOVE)


class SocketSink:
    """Bytes to a socket: written (write), or spliced from a pipe (write_from)."""

    def __init__(self, sock):
        self.sock = sock
        self.write = sock.sendall

    def write_from(self, read_end, count):
        splice_out(read_end, self.sock.fileno(), count)

    def close_write(self):
        self.sock.shutdown(socket.SHUT_WR)


class Direction:
    """One way of a relay: moves bytes until EOF, counts them, and reports how it ended."""

    def __init__(self, name):
        self.name = name
        self.bytes = 0
        self.failed = None  # the OSError that ended it, if any

    def pump(self, relay):
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

    def __init__(self, name, source, sink):
        super().__init__(name)
        self.source = source
        self.sink = sink
        self.close_write = sink.close_write

    def move(self, relay):
        write = self.sink.write
        for chunk in self.source.chunks():
            write(chunk)
            self.bytes += len(chunk)
            relay.last_active = time.monotonic()


class SpliceDirection(Direction):
    """A socket to a Sink through a pooled kernel pipe with os.splice: the bytes never enter
    Python (the Sink's write_from splices them on, maybe after a frame header of its own).
    Between chunks it waits in poll() holding no pipe."""

    def __init__(self, name, source_sock, sink, initial=b"", pipes=PIPES):
        super().__init__(name)
        self.source_sock = source_sock
        self.sink = sink
        self.initial = initial
        self.pipes = pipes

    def move(self, relay):
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

    def _chunk(self):
        """Moves what the source has (one chunk); returns how many bytes, 0 at its end."""
        pipe = self.pipes.take()
        return self._copy() if pipe is None else self._splice(pipe)

    def _splice(self, pipe):
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

    def _copy(self):
        return self._pass(self.source_sock.recv(COPY_SIZE))

    def _pass(self, data):
        if data:
            self.sink.write(data)
        return len(data)

    def close_write(self):
        self.sink.close_write()


class TeeDirection(SpliceDirection):
    """A spliced direction whose bytes a recorder also writes, still without entering Python:
    each chunk spliced into a pipe is tee'd into a second pipe that recorder.server_pipe()
    splices into its file. A chunk is copied instead, and shown to recorder.server(), while
    the recorder follows an RFB handshake (it must read those bytes) or when no second pipe
    is free; once the recorder has stopped, chunks are only spliced."""

    def __init__(self, name, source_sock, sink, recorder, initial=b"", pipes=PIPES):
        super().__init__(name, source_sock, sink, initial, pipes)
        self.recorder = recorder

    def _chunk(self):
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

    def _tee(self, pipe, copy):
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

    def _pass(self, data):
        if data:
            self.recorder.server(data)
        return super()._pass(data)


def splices(*socks):
    """Whether bytes between these may be spliced: the kernel has them, none is TLS."""
    return CAN_SPLICE and not any(isinstance(sock, (ssl.SSLSocket, tls.TlsStream)) for sock in socks)


def from_backend(backend_sock, sink, leftover=b"", recorder=None, *, splice):
    """The backend-to-client Direction into sink: spliced when it may be (splice: see
    splices()), tee'd as well when recorded, else copied through Python (and shown to the
    recorder)."""
    if splice and recorder is None:
        return SpliceDirection("backend", backend_sock, sink, leftover)
    if splice and CAN_TEE:
        return TeeDirection("backend", backend_sock, sink, recorder, leftover)
    return CopyDirection("backend", tapped(SocketSource(backend_sock, leftover), recorder and recorder.server), sink)


class Relay:
    """Relays client <-> backend until both directions end or stop() is called."""

    def __init__(self, client_sock, backend_sock, upstream, downstream):
        """upstream (client -> backend) and downstream: Directions, or (Source, Sink) pairs to copy."""
        self.sockets = (client_sock, backend_sock)
        self.upstream = upstream if isinstance(upstream, Direction) else CopyDirection("client", *upstream)
        self.downstream = (downstream if isinstance(downstream, Direction)
                           else CopyDirection("backend", *downstream))
        self.last_active = time.monotonic()
        self.end_reason = None
        self.woken = False  # stop() has shut both sockets down
        self.linger = LINGER
        self._lock = threading.Lock()

    @classmethod
    def raw(cls, client_sock, backend_sock, backend_leftover=b"", client_leftover=b"", upstream_sink=None,
            recorder=None):
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
            upstream = CopyDirection("client", tapped(SocketSource(client_sock, client_leftover), watcher),
                                     upstream_sink(sink) if upstream_sink else sink)
        else:
            upstream = SpliceDirection("client", client_sock, SocketSink(backend_sock), client_leftover)
        downstream = from_backend(backend_sock, SocketSink(client_sock), backend_leftover, recorder, splice=splice)
        return cls(client_sock, backend_sock, upstream, downstream)

    @property
    def bytes_up(self):
        return self.upstream.bytes

    @property
    def bytes_down(self):
        return self.downstream.bytes

    def idle_seconds(self):
        return time.monotonic() - self.last_active

    def run(self):
        """Relay in this thread and one helper thread; returns when both ways are done."""
        try:
            for sock in self.sockets:
                sock.settimeout(None)
                tune(sock)
            helper = threading.Thread(target=self.downstream.pump, args=(self,), name="relay-down", daemon=True)
            helper.start()
            self.upstream.pump(self)
            # The client's side is over (it went, or stop()): the backend's bytes in flight get a
            # short linger, then both ends close. A VNC session has no half-close to keep open:
            # a console that keeps its connection and says nothing must not keep the session.
            helper.join(self.linger)
            if helper.is_alive():
                self.stop(self.end_reason or "client-closed")
                helper.join()
        finally:
            for sock in self.sockets:
                sock.close()
        return self.end_reason

    def ended(self, direction):
        self.ended_by(f"{direction.name}-closed")

    def ended_by(self, reason):
        with self._lock:
            if self.end_reason is None:
                self.end_reason = reason

    def stop(self, reason):
        """End the relay from any thread: both blocked reads return at once. (Once is enough:
        at a SIGTERM every system call saved is a GIL hand-over saved, times thousands.)"""
        self.ended_by(reason)
        with self._lock:
            woken, self.woken = self.woken, True
        if not woken:
            for sock in self.sockets:
                tls.wake(sock)


def tune(sock):
    """Low latency for input events; keepalive so a vanished peer ends its session."""
    if getattr(sock, "family", None) == socket.AF_UNIX:
        return  # a serial viewer's or a replay's socketpair end: nothing to tune
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 6)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
