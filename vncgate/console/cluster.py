"""Serial consoles shared by the gateways of one store: who follows each console, its log in
the store, and viewers on gateways that do not hold its connection.

Exactly one gateway follows a console: the one holding its lease in the store (the
Follower renews it every second; it lapses LEASE seconds after its holder died, and is let
go when the holder stops). With a store that shares consoles (Redis), the follower writes
what the console prints to the store's log (StoreLog), and takes what viewers elsewhere
typed from the store (InputPump); a viewer on another gateway is a RemoteViewer: the log's
tail, then every new chunk, in order, and its keystrokes sent to the store. A store that
does not (SQLite, one host) keeps the log in files and every viewer's gateway opens the
console itself, as before.
"""

import logging
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any, Optional

from vncgate import store as store_module
from vncgate import supervise

log = logging.getLogger("vncgate.console.cluster")

LEASE = 3.0  # seconds a follow lease lasts unless renewed: the takeover time after a holder dies
RENEW_EVERY = 1.0  # seconds between the follower's rounds (follows are pushed sooner)
TAIL_BYTES = 64 * 1024  # of the log, sent to a viewer as it attaches
SEND_TIMEOUT = 5.0  # a remote viewer that takes nothing for this long is dropped
RETRY_FIRST, RETRY_MOST = 0.1, 2.0


class StoreLog:
    """The console log of a followed console, kept in the store (bounded there, bytes exact)."""

    def __init__(self, store: Any, instance_id: str, limit: int) -> None:
        self.store, self.instance_id, self.limit = store, instance_id, limit
        self._failing = False

    def write(self, data: bytes) -> None:
        try:
            self.store.append_console_log(self.instance_id, data, self.limit)
        except store_module.StoreError as error:
            if not self._failing:
                log.warning("console log of %s not written to the store: %s", self.instance_id, error)
                self._failing = True
            return
        if self._failing:
            log.info("console log of %s written to the store again", self.instance_id)
            self._failing = False

    def tail(self, count: int) -> bytes:
        try:
            found = self.store.console_log(self.instance_id)
        except store_module.StoreError:
            return b""
        return found[0][-count:] if found else b""

    def close(self) -> None:
        pass


class _Worker(threading.Thread):
    """A thread that repeats step() until stopped, surviving store outages with backoff."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.stopping = threading.Event()
        self._delay = RETRY_FIRST

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                try:
                    self.step()
                    self._delay = RETRY_FIRST
                except store_module.StoreError as error:
                    log.debug("%s: %s; again in %.1fs", self.name, error, self._delay)
                    self.stopping.wait(self._delay)
                    self._delay = min(RETRY_MOST, self._delay * 2)
                except Exception:  # its own fault: said once, and this worker ends
                    log.exception("%s failed", self.name)
                    return
        finally:
            self.finish()

    def step(self) -> None:
        raise NotImplementedError

    def finish(self) -> None:
        pass

    def stop(self) -> None:
        self.stopping.set()


class InputPump(_Worker):
    """On the follower: what viewers on other gateways typed, to the console once, in order."""

    def __init__(self, store: Any, instance_id: str, send: Callable[[bytes], Any]) -> None:
        super().__init__(f"serial-input-{instance_id}")
        self.store, self.instance_id, self.send = store, instance_id, send
        self.cursor: Optional[str] = None

    def step(self) -> None:
        if self.cursor is None:  # from now on: what was typed before a takeover is not replayed
            self.cursor = self.store.console_input_cursor(self.instance_id)
        data, self.cursor = self.store.console_input_after(self.instance_id, self.cursor)
        if data:
            self.send(data)


def _position(cursor: str) -> tuple:
    """A stream cursor ("MS-SEQ") as something that orders."""
    ms, _, seq = cursor.partition("-")
    return int(ms), int(seq or 0)


class RemoteViewer:
    """A viewer of a console another gateway follows: its socket pair's far end (.theirs) is
    the session's backend. The console's RemoteFeed sends it what comes after its cursor;
    its Typing thread sends what it types to the store."""

    def __init__(self, store: Any, instance_id: str) -> None:
        self.store, self.instance_id = store, instance_id
        self.mine, self.theirs = socket.socketpair()
        self.mine.settimeout(SEND_TIMEOUT)
        self.cursor = "0-0"  # what it has been sent up to
        self.ended = threading.Event()
        self.typing = Typing(self)

    def send(self, data: bytes) -> bool:
        try:
            self.mine.sendall(data)
            return True
        except OSError:  # the session ended, or its client stopped reading: it goes, the others stay
            self.end()
            return False

    def end(self) -> None:
        self.ended.set()
        try:
            self.mine.shutdown(socket.SHUT_RDWR)  # wakes Typing's recv, which closes it
        except OSError:
            pass


class Typing(threading.Thread):
    """A remote viewer's keystrokes, to the store's input stream for the follower."""

    def __init__(self, viewer: RemoteViewer) -> None:
        super().__init__(name=f"serial-typing-{viewer.instance_id}", daemon=True)
        self.viewer = viewer

    def run(self) -> None:
        viewer = self.viewer
        try:
            while not viewer.ended.is_set():
                try:
                    data = viewer.mine.recv(4096)
                except socket.timeout:
                    continue
                except OSError:
                    data = b""
                if not data:  # the session ended
                    return
                try:
                    viewer.store.send_console_input(viewer.instance_id, data)
                except store_module.StoreError as error:  # lost, like keys typed into a cut line
                    log.warning("serial console %s: typed input lost: %s", viewer.instance_id, error)
        finally:
            viewer.end()
            viewer.mine.close()


class RemoteFeed(_Worker):
    """The remote viewers of one console on this gateway: one reader of the store's log for
    all of them, each sent every chunk after its own cursor, in order. It ends with its last viewer."""

    def __init__(self, store: Any, instance_id: str, on_end: Callable[["RemoteFeed"], None]) -> None:
        super().__init__(f"serial-feed-{instance_id}")
        self.store, self.instance_id, self.on_end = store, instance_id, on_end
        self.viewers: list = []
        self.cursor: Optional[str] = None
        self._rewind: Optional[str] = None  # a new viewer's cursor, behind what was read already
        self._lock = threading.Lock()
        self.closed = False

    def attach(self) -> Optional[socket.socket]:
        """A new viewer: the log's tail sent, then fed from where the tail ends. None when the
        feed has ended (the caller makes another)."""
        viewer = RemoteViewer(self.store, self.instance_id)
        found = self.store.console_log(self.instance_id)
        data, viewer.cursor = found if found else (b"", "0-0")
        with self._lock:
            if self.closed:
                viewer.theirs.close()
                viewer.mine.close()
                return None
            viewer.typing.start()
            if not viewer.send(data[-TAIL_BYTES:]):
                return viewer.theirs
            self.viewers.append(viewer)
            if self.cursor is None:
                self.cursor = viewer.cursor
            elif self._rewind is None or _position(viewer.cursor) < _position(self._rewind):
                self._rewind = viewer.cursor
        return viewer.theirs

    def step(self) -> None:
        with self._lock:
            self.viewers = [viewer for viewer in self.viewers if not viewer.ended.is_set()]
            if not self.viewers:  # its last viewer left: the feed ends (a newcomer makes another)
                self.closed = True
                self.stopping.set()
                return
            if self._rewind is not None and _position(self._rewind) < _position(self.cursor or "0-0"):
                self.cursor = self._rewind
            self._rewind = None
            cursor = self.cursor or "0-0"
        entries = self.store.console_log_entries(self.instance_id, cursor)
        with self._lock:
            viewers = list(self.viewers)
            if entries:
                self.cursor = entries[-1][0]
        for entry_id, data in entries:
            position = _position(entry_id)
            for viewer in viewers:
                if position > _position(viewer.cursor) and viewer.send(data):
                    viewer.cursor = entry_id

    def stop(self) -> None:
        super().stop()
        with self._lock:
            self.closed = True
            viewers = list(self.viewers)
        for viewer in viewers:
            viewer.end()

    def finish(self) -> None:
        self.stop()
        for viewer in list(self.viewers):
            viewer.typing.join(SEND_TIMEOUT)
        self.on_end(self)


class Follower(threading.Thread):
    """Every RENEW_EVERY seconds (or at once when woken: a pushed follow or unfollow), take or
    renew the leases of the followed consoles and follow exactly those held; at stop, let them
    go so another gateway takes over at its next round."""

    def __init__(self, store: Any, gateway_id: str, sync: Callable[[list, list], None]) -> None:
        super().__init__(name="follower", daemon=True)
        self.store, self.gateway_id, self.sync = store, gateway_id, sync
        self.held: set = set()
        self._stopping = threading.Event()
        self._woken = threading.Event()
        # A store outage pauses it quietly; any other error is logged once, retried, and shown
        # (vncgate_thread_up, /healthz) until a round works again.
        self.guard = supervise.Guard("following", log, quiet=(store_module.StoreError,))

    @property
    def up(self) -> bool:
        return self.is_alive() and self.guard.up

    def wake(self, _ids: Iterable[str] = ()) -> None:
        self._woken.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            self._woken.clear()
            self.guard.run(self.round)
            self._woken.wait(RENEW_EVERY if self.guard.up else max(RENEW_EVERY, self.guard.backoff))

    def round(self) -> None:
        follows = self.store.list_follows()
        self.held = self.store.claim_follows(self.gateway_id, [follow.instance_id for follow in follows], LEASE)
        self.sync([follow for follow in follows if follow.instance_id in self.held], follows)

    def stop(self) -> None:
        self._stopping.set()
        self._woken.set()
        self.join()
        try:
            if self.held:
                self.store.release_follows(self.gateway_id, self.held)
        except store_module.StoreError as error:  # they lapse by themselves within LEASE
            log.warning("follow leases not let go: %s", error)
