"""The gateway as a service: readiness, status and the watchdog for systemd, and a stop that drains.

On the first SIGTERM with drain_timeout > 0 the gateway drains instead of stopping:
/healthz answers 503 draining at once, so load balancers take it out of rotation;
for drain_notice seconds (no more than drain_timeout) it still serves new consoles,
the time a balancer needs to notice (its check interval times its fall count); then it
stops accepting and closes its listening socket (the next gateway may bind the port),
and its live sessions go on until they end or drain_timeout has passed since the
SIGTERM, when they end with reason shutdown. A second SIGTERM, or SIGINT, ends
everything at once. With drain_timeout = 0 the first SIGTERM does that.

The heartbeat thread tells systemd the number of live sessions (STATUS=) and, when
it runs a watchdog, sends WATCHDOG=1 only while the accept loop has turned recently
and the store answers: a gateway that is hung or cut off from its store is restarted.
"""

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from vncgate.control import systemd

log = logging.getLogger("vncgate.control.service")

STATUS_EVERY = 5.0  # seconds between STATUS= lines when no watchdog asks for more
STOP_MARGIN = 30.0  # seconds asked of systemd beyond drain_timeout: ending the sessions, the store's last writes


class Service:
    """Owns the drain (its own thread, once stopping) and the heartbeat thread; close() stops both."""

    def __init__(self, gateway: Any, notifier: systemd.Notifier, watchdog: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.gateway = gateway
        self.notifier = notifier
        self.watchdog = watchdog
        self.clock = clock
        self.drain_timeout = gateway.config.drain_timeout
        self.notice = min(gateway.config.drain_notice, self.drain_timeout)
        self.stopping = threading.Event()
        self.hurry = threading.Event()  # a second SIGTERM, or SIGINT: end everything now
        self.stop_signal_at: float | None = None
        self._closed = threading.Event()
        self._unhealthy = ""
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)

    # -- the main thread's ---------------------------------------------------------------

    def ready(self) -> None:
        """The gateway listens: READY=1, and the heartbeat starts."""
        self._heartbeat.start()
        self.notifier.send("READY=1", f"STATUS={self.status()}")

    def wait_drained(self) -> None:
        """After the accept loop ended: until the live sessions end, drain_timeout passes, or a hurry."""
        if self.stop_signal_at is None:
            return
        deadline = self.stop_signal_at + self.drain_timeout
        while self.gateway.connection_count() and not self.hurry.is_set():
            left = deadline - self.clock()
            if left <= 0:
                log.info("drain_timeout passed: ending %d live sessions", len(self.gateway.sessions.live()))
                return
            self.hurry.wait(min(1.0, left))
        if not self.hurry.is_set():
            log.info("drained: every session has ended")

    def close(self) -> None:
        self._closed.set()
        if self._heartbeat.is_alive():
            self._heartbeat.join(5.0)
        self.notifier.close()

    # -- signals ---------------------------------------------------------------------------

    def on_signal(self, name: str, hurry: bool = False) -> None:
        """SIGTERM (hurry=False) or SIGINT (hurry=True), from the signal handler: never blocks."""
        if self.stopping.is_set() or hurry or not self.drain_timeout:
            if self.stopping.is_set():
                log.info("%s again: ending every session now", name)
            self.hurry.set()
        if self.stopping.is_set():
            return
        self.stopping.set()
        self.stop_signal_at = self.clock()
        threading.Thread(target=self._drain, args=(name,), name="drain", daemon=True).start()

    def _drain(self, name: str) -> None:
        try:
            self.gateway.draining = True
            # systemd's stop timeout (TimeoutStopSec=) grows to the drain and the stop after it.
            extend = int((self.drain_timeout + STOP_MARGIN) * 1e6)
            self.notifier.send("STOPPING=1", f"STATUS={self.status()}", f"EXTEND_TIMEOUT_USEC={extend}")
            if not self.hurry.is_set():
                log.info("%s: draining: /healthz answers 503; new consoles served for %.0f s more, live sessions "
                         "(%d) for up to %.0f s", name, self.notice, len(self.gateway.sessions.live()),
                         self.drain_timeout)
                self.hurry.wait(self.notice)
            else:
                log.info("%s: stopping", name)
            self.gateway.stop_accepting()  # the main thread goes on in wait_drained, then stop()
            log.info("stopped accepting (the port is free); %d connections go on", self.gateway.connection_count())
        except Exception:  # the stop must happen: say why it went wrong, and stop anyway
            log.exception("the drain failed; stopping at once")
            self.hurry.set()
            self.gateway.stop_accepting()

    # -- the heartbeat -----------------------------------------------------------------------

    def status(self) -> str:
        live = len(self.gateway.sessions.live())
        if not self.stopping.is_set():
            return f"serving: {live} live sessions"
        if self.hurry.is_set() or self.stop_signal_at is None:
            return f"stopping: ending {live} live sessions"
        left = max(0.0, self.stop_signal_at + self.drain_timeout - self.clock())
        return f"draining: {live} live sessions, {left:.0f} s left"

    def healthy(self) -> bool:
        """The accept loop turned within the watchdog's interval (or has ended: stopping), the
        gateway's long-lived threads are up, and the store answers (the /healthz probe's)."""
        interval = self.watchdog or STATUS_EVERY
        problem = ""
        down = [name for name, up in self.gateway.threads().items() if not up]
        if not self.stopping.is_set() and self.clock() - self.gateway.loop_beat > interval:
            problem = f"the accept loop has not turned for {self.clock() - self.gateway.loop_beat:.1f} s"
        elif down:
            problem = f"threads down: {', '.join(down)}"
        elif not self.gateway.prober.alive(min(1.0, interval / 4)):  # bounded, however the store hangs
            problem = "the store does not answer"
        if problem != self._unhealthy:
            if problem:
                log.warning("watchdog: %s; not telling systemd all is well", problem)
            else:
                log.info("watchdog: healthy again")
            self._unhealthy = problem
        return not problem

    def _beat(self) -> None:
        every = min(STATUS_EVERY, self.watchdog / 4) if self.watchdog else STATUS_EVERY
        while not self._closed.wait(every):
            try:
                lines = [f"STATUS={self.status()}"]
                if self.watchdog and self.healthy():
                    lines.append("WATCHDOG=1")
                self.notifier.send(*lines)
            except Exception:  # the heartbeat survives its own errors; a missed beat is the watchdog's to judge
                log.exception("heartbeat failed")
