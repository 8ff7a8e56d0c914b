"""Serial consoles: one backend connection per console, shared by its viewers (the console
log itself: consolelog.py).

A Hub holds the one TCP connection to a serial endpoint (qemu's -serial tcp:…,server=on,
libvirt's <serial type='tcp'>). What the console prints goes to every attached viewer and,
while the console is followed, to its console log (a file, or the store); what any viewer types goes to
the console. A viewer is one end of a socketpair whose other end the session's relay
treats as its backend, so the websocket path, revocation, kills and audit work for serial
consoles exactly as for VNC.

A followed hub reconnects with backoff whenever the endpoint goes away (the VM restarts)
and keeps its viewers meanwhile. A hub made for viewers alone ends with its backend, or
when its last viewer leaves. Each hub's state is changed by its own thread only: the
other threads hand it work through a queue and a wake-up socket.
"""

from __future__ import annotations

import collections
import logging
import selectors
import socket
import threading
import time
from typing import Any, Callable, Union

from vncgate.console import backends, cluster
from vncgate.console.allow import BackendAllow
from vncgate.console.consolelog import (  # noqa: F401 (the log's names, still importable from here)
    ConsoleLog,
    console_output,
    follow_log,
    follow_output,
    last_lines,
    log_path,
    read_log,
)
from vncgate.refusals import Refused
from vncgate.store.common import ConnectionDetails, Follow

log = logging.getLogger("vncgate.console.serial")

READ_SIZE = 64 * 1024
TAIL_BYTES = 64 * 1024  # of the log, sent to a viewer as it attaches
VIEWER_SEND_TIMEOUT = 5.0  # a viewer that takes nothing for this long is dropped, not waited for
BACKOFF_FIRST, BACKOFF_MOST = 0.25, 5.0

# Where a followed console's output is kept: a file, or the store (cluster.StoreLog).
Log = Union[ConsoleLog, cluster.StoreLog]


# -- hubs --------------------------------------------------------------------------------

class Hub(threading.Thread):
    """One serial endpoint: its backend connection, its viewers, its log while followed."""

    def __init__(self, host: str, port: int, timeout: float, allow: BackendAllow,
                 backend: socket.socket | None = None) -> None:
        super().__init__(name=f"serial-{host}:{port}")
        self.host, self.port, self.timeout, self.allow = host, port, timeout, allow
        self.backend = backend
        self.follow: Follow | None = None
        self.log: Log | None = None
        self.viewers: set[socket.socket] = set()
        self.closed = False  # set by the hub's thread when it ends; attach() then fails
        self._work: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = collections.deque()
        self._lock = threading.Lock()
        self._selector = selectors.DefaultSelector()
        self._wake_in, self._wake_out = socket.socketpair()
        self._wake_in.setblocking(False)
        self._selector.register(self._wake_in, selectors.EVENT_READ, self._woken)
        self._next_try = 0.0
        self._delay = BACKOFF_FIRST
        self._refused_warned = False
        self._ending = False
        if backend is not None:
            self._adopt(backend)

    # -- called from other threads --

    def attach(self) -> socket.socket | None:
        """A new viewer: the socket its session relays to. None when the hub has ended."""
        mine, theirs = socket.socketpair()
        if not self._call(self._add_viewer, mine):
            mine.close()
            theirs.close()
            return None
        return theirs

    def set_follow(self, follow: Follow | None, open_log: Callable[[Follow], Log] | None = None) -> bool:
        """Start (a Follow) or stop (None) following; the log opens (open_log(follow): a
        ConsoleLog or what writes the store's) or closes with it."""
        return self._call(self._set_follow, follow, open_log)

    def send(self, data: bytes) -> bool:
        """Bytes typed by a viewer on another gateway: to the console, after what came before."""
        return self._call(self._to_backend, data)

    def stop(self) -> None:
        self._call(self._end)

    def _call(self, task: Callable[..., None], *args: Any) -> bool:
        with self._lock:
            if self.closed:
                return False
            self._work.append((task, args))
        try:
            self._wake_out.send(b"x")
        except OSError:
            pass
        return True

    # -- the hub's own thread --

    def run(self) -> None:
        try:
            while not self._ending:
                if self.backend is None and self.follow is not None and time.monotonic() >= self._next_try:
                    self._connect()
                timeout = None if self.backend is not None or self.follow is None else \
                    max(0.0, self._next_try - time.monotonic())
                for key, _events in self._selector.select(timeout):
                    key.data(key.fileobj)
        finally:
            with self._lock:
                self.closed = True
                work = list(self._work)
            for task, args in work:  # viewers that came too late: they see an ended console
                if task == self._add_viewer:
                    args[0].close()
            for viewer in list(self.viewers):
                self._drop(viewer)
            self._lose_backend()
            if self.log is not None:
                self.log.close()
            self._selector.close()
            self._wake_in.close()
            self._wake_out.close()

    def _woken(self, sock):
        try:
            sock.recv(4096)
        except BlockingIOError:
            pass
        while True:
            with self._lock:
                if not self._work:
                    return
                task, args = self._work.popleft()
            task(*args)

    def _add_viewer(self, viewer):
        viewer.settimeout(VIEWER_SEND_TIMEOUT)
        if self.log is not None:
            tail = self.log.tail(TAIL_BYTES)
            if tail and not self._send(viewer, tail):
                return
        self.viewers.add(viewer)
        self._selector.register(viewer, selectors.EVENT_READ, self._from_viewer)

    def _set_follow(self, follow, open_log):
        if self.log is not None:
            self.log.close()
            self.log = None
        self.follow = follow
        if follow is not None:
            try:
                self.log = open_log(follow)
            except OSError as error:  # still followed and shared, but not logged: say so, once
                log.error("cannot keep the console log of %s: %s", follow.instance_id, error)
            log.info("following the serial console of %s at %s:%s", follow.instance_id, self.host, self.port)
        elif not self.viewers:
            self._end()

    def _end(self):
        self._ending = True

    def _connect(self):
        try:
            self._adopt(backends.connect(self.host, self.port, self.timeout, allow=self.allow))
        except Refused as error:
            self._next_try = time.monotonic() + self._delay
            # Outside backend_allow (a name that resolves elsewhere now): the operator must know, once.
            warn = error.reason == "backend-not-allowed" and not self._refused_warned
            self._refused_warned = self._refused_warned or warn
            (log.warning if warn else log.debug)("serial console %s:%s: %s; again in %.2fs", self.host, self.port,
                                                 error, self._delay)
            self._delay = min(BACKOFF_MOST, self._delay * 2)
            return
        log.info("serial console %s:%s connected", self.host, self.port)
        self._delay = BACKOFF_FIRST

    def _adopt(self, backend):
        backend.settimeout(self.timeout)
        self.backend = backend
        self._selector.register(backend, selectors.EVENT_READ, self._from_backend)

    def _lose_backend(self):
        if self.backend is None:
            return
        self._selector.unregister(self.backend)
        self.backend.close()
        self.backend = None
        self._next_try = time.monotonic() + self._delay

    def _from_backend(self, backend):
        data = _read(backend)
        if not data:
            log.info("serial console %s:%s closed%s", self.host, self.port,
                     "; reconnecting" if self.follow is not None else "")
            self._lose_backend()
            if self.follow is None:
                self._end()
            return
        if self.log is not None:
            self.log.write(data)
        for viewer in list(self.viewers):
            self._send(viewer, data)

    def _from_viewer(self, viewer):
        data = _read(viewer)
        if not data:
            self._drop(viewer)
            if not self.viewers and self.follow is None:
                self._end()
            return
        self._to_backend(data)

    def _to_backend(self, data):
        if self.backend is not None:
            try:
                self.backend.sendall(data)
            except OSError:
                self._lose_backend()

    def _send(self, viewer, data):
        try:
            viewer.sendall(data)
            return True
        except OSError:  # gone, or too slow to keep: its session ends, the others go on
            log.info("serial console %s:%s: dropping a viewer that stopped reading", self.host, self.port)
            self._drop(viewer)
            return False

    def _drop(self, viewer):
        if viewer in self.viewers:
            self.viewers.discard(viewer)
            self._selector.unregister(viewer)
        viewer.close()


def _read(sock):
    """What sock has, b"" at its end or on an error (the same for a hub: that peer is gone)."""
    try:
        return sock.recv(READ_SIZE)
    except OSError:
        return b""


class Consoles:
    """The gateway's hubs, by backend address: followed ones (those whose lease it holds,
    cluster.Follower) and the ones viewers opened; with a store that shares consoles, the
    remote viewers of consoles another gateway follows, and the input pumps of those it does."""

    def __init__(self, log_dir: str, log_bytes: int, timeout: float, allow: BackendAllow, store: Any = None) -> None:
        """allow: the allow.BackendAllow every serial endpoint is checked against, at each connection;
        store: the token store, whose follow leases and (with Redis) log and I/O the consoles share."""
        self.allow = allow
        self.log_dir = log_dir
        self.log_bytes = log_bytes
        self.timeout = timeout
        self.store = store if getattr(store, "shares_consoles", False) else None
        self.followed: dict[str, Follow] = {}  # instance id -> Follow: every followed console, whoever follows it
        self._hubs: dict[tuple[str, int], Hub] = {}  # (host, port) -> Hub
        self._pumps: dict[str, cluster.InputPump] = {}  # instance id -> cluster.InputPump, for the consoles followed here
        self._feeds: dict[str, cluster.RemoteFeed] = {}  # instance id -> cluster.RemoteFeed: the remote viewers of consoles followed elsewhere
        self._lock = threading.Lock()

    def open_backend(self, details: ConnectionDetails, timeout: float) -> tuple[socket.socket, bytes]:
        """For a serial session: (the viewer's socket, b""), as backends.open_backend answers.
        Raises Refused backend-… when no hub has the console and it cannot be reached."""
        key = (details.host, details.port)
        follow = self.followed.get(details.instance_id)
        if self.store is not None and follow is not None and (follow.host, follow.port) == key:
            hub = self._hub(key)
            if hub is None or hub.follow != follow:  # another gateway follows it: through the store
                return self._remote_viewer(details.instance_id), b""
        for _attempt in range(2):  # a hub may end between finding it and attaching to it
            hub = self._hub(key)
            if hub is None:
                backend = backends.connect(details.host, details.port, timeout, allow=self.allow)
                with self._lock:
                    hub = self._hubs.get(key)
                    if hub is None or hub.closed:
                        hub = self._start(key, backend)
                    else:
                        backend.close()
            viewer = hub.attach()
            if viewer is not None:
                return viewer, b""
        raise Refused("backend-closed", "the serial console ended as the viewer attached")

    def _hub(self, key):
        with self._lock:
            hub = self._hubs.get(key)
            return hub if hub is not None and not hub.closed else None

    def _start(self, key, backend=None):
        hub = Hub(*key, self.timeout, self.allow, backend)
        self._hubs[key] = hub
        hub.start()
        return hub

    def _remote_viewer(self, instance_id):
        for _attempt in range(2):  # a feed may end between finding it and attaching to it
            with self._lock:
                feed = self._feeds.get(instance_id)
                new = feed is None or feed.closed
                if new:
                    feed = self._feeds[instance_id] = cluster.RemoteFeed(self.store, instance_id, self._feed_ended)
            viewer = feed.attach()
            if new:  # started once it has a viewer: a feed without one ends
                feed.start()
            if viewer is not None:
                return viewer
        raise Refused("backend-closed", "the serial console's feed ended as the viewer attached")

    def _feed_ended(self, feed):
        with self._lock:
            if self._feeds.get(feed.instance_id) is feed:
                del self._feeds[feed.instance_id]

    def open_log(self, follow: Follow) -> Log:
        """The log of a console followed here: in the store when it shares consoles, else a file."""
        if self.store is not None:
            return cluster.StoreLog(self.store, follow.instance_id, self.log_bytes)
        return ConsoleLog(self.log_dir, follow.instance_id, self.log_bytes)

    def sync(self, follows: list[Follow], followed: list[Follow] | None = None) -> None:
        """Follow exactly these (store.Follow records: the ones this gateway holds the lease of);
        followed: every followed console (default: these), for the viewers of the others."""
        self.followed = {follow.instance_id: follow for follow in (follows if followed is None else followed)}
        wanted = {(follow.host, follow.port): follow for follow in follows}
        if self.store is not None:
            self._sync_pumps({follow.instance_id for follow in follows})
        with self._lock:
            for key, hub in list(self._hubs.items()):
                if hub.closed:
                    del self._hubs[key]
                elif hub.follow is not None and wanted.get(key) != hub.follow:
                    hub.set_follow(None)
            for key, follow in wanted.items():
                hub = self._hubs.get(key) or self._start(key)
                if hub.follow != follow:
                    hub.set_follow(follow, self.open_log)
                pump = self._pumps.get(follow.instance_id)
                if pump is not None:
                    pump.send = hub.send

    def _sync_pumps(self, instance_ids):
        for instance_id in set(self._pumps) - instance_ids:
            self._pumps.pop(instance_id).stop()
        for instance_id in instance_ids - set(self._pumps):
            pump = self._pumps[instance_id] = cluster.InputPump(self.store, instance_id, lambda data: None)
            pump.start()

    def stop(self) -> None:
        with self._lock:
            hubs = list(self._hubs.values())
            self._hubs.clear()
            workers = [*self._pumps.values(), *self._feeds.values()]
            self._pumps.clear()
        for worker in workers:
            worker.stop()
        for worker in workers:
            worker.join()
        for hub in hubs:
            hub.stop()
        for hub in hubs:
            hub.join()
