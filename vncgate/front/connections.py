"""The gateway's connections: which it holds, which are still in their handshake (counted per
client address network), which are still sending their request head (the first to be shed
when the gateway is full), and which were shed. One lock; no I/O but waking a shed socket's
reader, which the caller does (admit returns it).

Every accepted connection is registered until its thread (the handshake's, or its relay's)
lets it go: stop() wakes the ones still in their handshake and waits for the registry to empty.
"""

from __future__ import annotations

import collections
import socket
import threading

from vncgate.refusals import Refused

SHED_AT_ONCE = 64  # connections being closed to make room at most (each holds its fds until its thread ends)


class Connections:
    def __init__(self) -> None:
        # accepted socket -> what it is now (itself, or its TLS wrapper)
        self._open: dict[socket.socket, socket.socket] = {}
        # client address network -> its connections not relaying yet
        self._pending: collections.Counter[str] = collections.Counter()
        # accepted socket -> its address network, until it relays (None: a trusted proxy's, until pending_as)
        self._handshaking: dict[socket.socket, str | None] = {}
        self._in_head: dict[socket.socket, None] = {}  # accepted socket -> None, oldest first: still reading its head
        self._shed: set[socket.socket] = set()  # sockets closed to make room, until their thread ends
        self._lock = threading.Lock()
        self._all_ended = threading.Condition(self._lock)

    def admit(self, request: socket.socket, key: str | None, max_pending: int, room: int,
              extra: int) -> socket.socket | None:
        """Register an accepted connection from address network key (None: a trusted proxy's,
        counted later by pending_as). room: the connections max_connections allows, extra: how
        many more the live sessions' extra fds are worth. Returns the connection shed to make
        room (its reader to be woken), if any; raises Refused too-many-pending or max-connections."""
        with self._lock:
            if key is not None:
                self._check_pending(key, max_pending)
            full = len(self._open) - len(self._shed) + extra >= room
            if full and not (self._in_head and len(self._shed) < SHED_AT_ONCE):
                raise Refused("max-connections")
            shed = None
            if full:  # the oldest connection still sending its request head makes room
                oldest = next(iter(self._in_head))
                del self._in_head[oldest]
                self._shed.add(oldest)
                shed = self._open[oldest]
            self._open[request] = request
            if key is not None:
                self._pending[key] += 1
            self._handshaking[request] = key
            self._in_head[request] = None
        return shed

    def head_read(self, request: socket.socket) -> None:
        """request's head is in: from now on it is not shed to make room."""
        with self._lock:
            self._in_head.pop(request, None)

    def was_shed(self, request: socket.socket) -> bool:
        with self._lock:
            return request in self._shed

    def pending_as(self, request: socket.socket, key: str, max_pending: int) -> None:
        """A trusted proxy's connection, now known to be from address network key: counted in
        its share. Raises Refused too-many-pending when key has its share."""
        with self._lock:
            if self._handshaking.get(request, key) is not None:
                return  # counted by its own address at accept, or relaying already
            self._check_pending(key, max_pending)
            self._pending[key] += 1
            self._handshaking[request] = key

    def _check_pending(self, key: str, max_pending: int) -> None:
        """Refused too-many-pending when address network key has its share (holding the lock)."""
        if self._pending[key] >= max_pending:
            raise Refused("too-many-pending", f"{self._pending[key]} connections in handshake")

    def handshake_over(self, request: socket.socket) -> None:
        """request's handshake is over (it relays now, or ended): its address has one fewer pending."""
        with self._lock:
            key = self._handshaking.pop(request)
            self._in_head.pop(request, None)
            if key is None:  # a trusted proxy's, not counted
                return
            self._pending[key] -= 1
            if not self._pending[key]:
                del self._pending[key]

    def track(self, plain: socket.socket, wrapped: socket.socket) -> None:
        """Follow a connection into its TLS wrapper, so that stop() can still wake it."""
        with self._lock:
            if plain in self._open:
                self._open[plain] = wrapped

    def ended(self, request: socket.socket) -> None:
        """request is closed and its thread is done with it."""
        with self._lock:
            self._open.pop(request, None)
            self._in_head.pop(request, None)
            self._shed.discard(request)
            if not self._open:
                self._all_ended.notify_all()

    def count(self) -> int:
        with self._lock:
            return len(self._open)

    def in_handshake(self) -> list[socket.socket]:
        """The connections (as they are now: TLS-wrapped or not) still in their handshake."""
        with self._lock:
            return [self._open[request] for request in self._handshaking]

    def wait_all_ended(self, timeout: float) -> bool:
        with self._lock:
            return self._all_ended.wait_for(lambda: not self._open, timeout)
