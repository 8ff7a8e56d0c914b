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


class RemoteViewer(_Worker):
    """A viewer of a console another gateway follows: its socket pair's far end is the
    session's backend. This thread sends the log's tail, then each new chunk; a second one
    (Typing) sends what the viewer types to the store."""

    def __init__(self, store: Any, instance_id: str, on_end: Callable[["RemoteViewer"], None]) -> None:
        super().__init__(f"serial-remote-{instance_id}")
        self.store, self.instance_id, self.on_end = store, instance_id, on_end
        self.mine, self.theirs = socket.socketpair()
        self.mine.settimeout(SEND_TIMEOUT)
        self.cursor: Optional[str] = None
        self.typing = Typing(self)

    def start(self) -> None:
        super().start()
        self.typing.start()

    def step(self) -> None:
        if self.cursor is None:
            found = self.store.console_log(self.instance_id)
            data, self.cursor = found if found else (b"", "0-0")
            data = data[-TAIL_BYTES:]
        else:
            data, self.cursor = self.store.console_log_after(self.instance_id, self.cursor)
        if data:
            try:
                self.mine.sendall(data)
            except OSError:  # the session ended, or its client stopped reading
                self.stop()

    def stop(self) -> None:
        super().stop()
        try:
            self.mine.shutdown(socket.SHUT_RDWR)  # wakes Typing's recv
        except OSError:
            pass

    def finish(self) -> None:
        self.stop()
        self.typing.join(SEND_TIMEOUT)
        self.mine.close()
        self.on_end(self)


class Typing(threading.Thread):
    """A remote viewer's keystrokes, to the store's input stream for the follower."""

    def __init__(self, viewer: RemoteViewer) -> None:
        super().__init__(name=f"serial-typing-{viewer.instance_id}", daemon=True)
        self.viewer = viewer

    def run(self) -> None:
        viewer = self.viewer
        while not viewer.stopping.is_set():
            try:
                data = viewer.mine.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                data = b""
            if not data:  # the session ended
                viewer.stop()
                return
            try:
                viewer.store.send_console_input(viewer.instance_id, data)
            except store_module.StoreError as error:  # lost, like keys typed into a cut line
                log.warning("serial console %s: typed input lost: %s", viewer.instance_id, error)


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
        self._failing = False

    def wake(self, _ids: Iterable[str] = ()) -> None:
        self._woken.set()

    def run(self) -> None:
        while not self._stopping.is_set():
            self._woken.clear()
            try:
                self.round()
            except store_module.StoreError as error:
                if not self._failing:
                    log.warning("following paused: %s", error)
                    self._failing = True
            except Exception:  # survive our own faults too: logged, tried again next round
                log.exception("following failed")
            self._woken.wait(RENEW_EVERY)

    def round(self) -> None:
        follows = self.store.list_follows()
        self.held = self.store.claim_follows(self.gateway_id, [follow.instance_id for follow in follows], LEASE)
        self.sync([follow for follow in follows if follow.instance_id in self.held], follows)
        if self._failing:
            log.info("following resumed")
            self._failing = False

    def stop(self) -> None:
        self._stopping.set()
        self._woken.set()
        self.join()
        try:
            if self.held:
                self.store.release_follows(self.gateway_id, self.held)
        except store_module.StoreError as error:  # they lapse by themselves within LEASE
            log.warning("follow leases not let go: %s", error)
