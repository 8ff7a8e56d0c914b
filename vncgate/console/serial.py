"""Serial consoles: one backend connection per console, shared by its viewers, and the console log.

A Hub holds the one TCP connection to a serial endpoint (qemu's -serial tcp:…,server=on,
libvirt's <serial type='tcp'>). What the console prints goes to every attached viewer and,
while the console is followed, to its console log on disk; what any viewer types goes to
the console. A viewer is one end of a socketpair whose other end the session's relay
treats as its backend, so the websocket path, revocation, kills and audit work for serial
consoles exactly as for VNC.

A followed hub reconnects with backoff whenever the endpoint goes away (the VM restarts)
and keeps its viewers meanwhile. A hub made for viewers alone ends with its backend, or
when its last viewer leaves. Each hub's state is changed by its own thread only: the
other threads hand it work through a queue and a wake-up socket.
"""

import collections
import logging
import os
import selectors
import socket
import threading
import time
import urllib.parse

from vncgate.console import backends
from vncgate.refusals import Refused

log = logging.getLogger("vncgate.console.serial")

READ_SIZE = 64 * 1024
TAIL_BYTES = 64 * 1024  # of the log, sent to a viewer as it attaches
VIEWER_SEND_TIMEOUT = 5.0  # a viewer that takes nothing for this long is dropped, not waited for
BACKOFF_FIRST, BACKOFF_MOST = 0.25, 5.0


# -- the console log on disk ---------------------------------------------------------------

def log_path(folder, instance_id):
    """The log file of one instance: its id %-escaped, so no id can climb or hide."""
    return os.path.join(folder, urllib.parse.quote(instance_id, safe="-_").replace(".", "%2E") + ".log")


class ConsoleLog:
    """The newest bytes of one console as two files: NAME.log (being written) and NAME.log.1.
    When NAME.log reaches limit/2 bytes it replaces NAME.log.1, so together they always hold
    the newest output, between limit/2 and limit bytes of it, and never more."""

    def __init__(self, folder, instance_id, limit):
        os.makedirs(folder, mode=0o700, exist_ok=True)
        self.path = log_path(folder, instance_id)
        self.half = max(1, limit // 2)
        self.file = open(self.path, "ab")
        self.size = self.file.tell()

    def write(self, data):
        view = memoryview(data)
        while view:
            if self.size >= self.half:
                self._rotate()
            piece = view[:self.half - self.size]
            self.file.write(piece)
            self.size += len(piece)
            view = view[len(piece):]
        self.file.flush()

    def _rotate(self):
        self.file.close()
        os.replace(self.path, self.path + ".1")
        self.file = open(self.path, "ab")
        self.size = 0

    def close(self):
        self.file.close()


def read_log(folder, instance_id, lines=None):
    """The console log of instance_id, oldest byte first: all that is kept, or its last
    `lines` lines. None when the instance has never been followed. This is what the
    HTTP API's GET /api/v1/consoles/log serves."""
    path = log_path(folder, instance_id)
    data, found = b"", False
    for name in (path + ".1", path):
        try:
            with open(name, "rb") as handle:
                data += handle.read()
            found = True
        except FileNotFoundError:
            pass
    if not found:
        return None
    return data if lines is None else last_lines(data, lines)


def last_lines(data, count):
    """The last count lines of data (a final line without its newline counts)."""
    if count <= 0:
        return b""
    start = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(count):
        start = data.rfind(b"\n", 0, start)
        if start < 0:
            return data
    return data[start + 1:]


def follow_log(folder, instance_id, write, stopping, poll=0.2):
    """Write what is appended to the log from now on, across rotations, until stopping is set."""
    path = log_path(folder, instance_id)
    handle = None
    try:
        while not stopping.is_set():
            if handle is None:
                try:
                    handle = open(path, "rb")
                except FileNotFoundError:
                    stopping.wait(poll)
                    continue
                handle.seek(0, os.SEEK_END)
            data = handle.read()
            if data:
                write(data)
                continue
            try:
                rotated = os.stat(path).st_ino != os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:
                rotated = False
            if rotated:  # the rest of the old file was read above: go on at the new one's start
                handle.close()
                handle = open(path, "rb")
                continue
            stopping.wait(poll)
    finally:
        if handle is not None:
            handle.close()


# -- hubs --------------------------------------------------------------------------------

class Hub(threading.Thread):
    """One serial endpoint: its backend connection, its viewers, its log while followed."""

    def __init__(self, host, port, timeout, allow, backend=None):
        super().__init__(name=f"serial-{host}:{port}")
        self.host, self.port, self.timeout, self.allow = host, port, timeout, allow
        self.backend = backend
        self.follow = None
        self.log = None
        self.viewers = set()
        self.closed = False  # set by the hub's thread when it ends; attach() then fails
        self._work = collections.deque()
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

    def attach(self):
        """A new viewer: the socket its session relays to. None when the hub has ended."""
        mine, theirs = socket.socketpair()
        if not self._call(self._add_viewer, mine):
            mine.close()
            theirs.close()
            return None
        return theirs

    def set_follow(self, follow, log_dir=None, log_bytes=None):
        """Start (a Follow) or stop (None) following; the log opens or closes with it."""
        return self._call(self._set_follow, follow, log_dir, log_bytes)

    def stop(self):
        self._call(self._end)

    def _call(self, task, *args):
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

    def run(self):
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
            tail = (read_log(os.path.dirname(self.log.path), self.follow.instance_id) or b"")[-TAIL_BYTES:]
            if tail and not self._send(viewer, tail):
                return
        self.viewers.add(viewer)
        self._selector.register(viewer, selectors.EVENT_READ, self._from_viewer)

    def _set_follow(self, follow, log_dir, log_bytes):
        if self.log is not None:
            self.log.close()
            self.log = None
        self.follow = follow
        if follow is not None:
            try:
                self.log = ConsoleLog(log_dir, follow.instance_id, log_bytes)
            except OSError as error:  # still followed and shared, but not logged: say so, once
                log.error("cannot keep the console log of %s in %s: %s", follow.instance_id, log_dir, error)
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
    """The gateway's hubs, by backend address: followed ones (synced from the store) and the
    ones viewers opened."""

    def __init__(self, log_dir, log_bytes, timeout, allow):
        """allow: the allow.BackendAllow every serial endpoint is checked against, at each connection."""
        self.allow = allow
        self.log_dir = log_dir
        self.log_bytes = log_bytes
        self.timeout = timeout
        self._hubs = {}  # (host, port) -> Hub
        self._lock = threading.Lock()

    def open_backend(self, details, timeout):
        """For a serial session: (the viewer's socket, b""), as backends.open_backend answers.
        Raises Refused backend-… when no hub has the console and it cannot be reached."""
        key = (details.host, details.port)
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

    def sync(self, follows):
        """Follow exactly these (store.Follow records); called at start and every touch_interval."""
        wanted = {(follow.host, follow.port): follow for follow in follows}
        with self._lock:
            for key, hub in list(self._hubs.items()):
                if hub.closed:
                    del self._hubs[key]
                elif hub.follow is not None and wanted.get(key) != hub.follow:
                    hub.set_follow(None)
            for key, follow in wanted.items():
                hub = self._hubs.get(key) or self._start(key)
                if hub.follow != follow:
                    hub.set_follow(follow, self.log_dir, self.log_bytes)

    def stop(self):
        with self._lock:
            hubs = list(self._hubs.values())
            self._hubs.clear()
        for hub in hubs:
            hub.stop()
        for hub in hubs:
            hub.join()
