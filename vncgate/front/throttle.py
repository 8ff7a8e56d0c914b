"""Slowing down token guessing: a token bucket of failed attempts per client address.

Every failed console attempt (no token, bad token) takes one token from its
address's bucket; an empty bucket answers 429 without touching the store, so a
guessing flood costs the gateway almost nothing and other addresses are not
slowed. Buckets refill continuously; full ones are forgotten, so memory stays
bounded by the addresses failing right now.
"""

import functools
import ipaddress
import threading
import time
from collections.abc import Callable

# Refusals a client brings on itself (bad or missing credentials, malformed or unwanted
# requests): each one costs its address a token of the failure bucket, and an address
# whose bucket is empty gets 429 (its lines sampled) instead of the answer.
FAILURES = frozenset({
    "bad-request", "handshake-timeout", "tls-required", "tls-not-configured", "tls-handshake-failed", "bad-upgrade",
    "origin-not-allowed", "not-found", "not-allowed-here", "method-not-allowed", "no-token", "unknown-token",
    "expired-token", "wrong-console-type", "sealed-password-unreadable", "refused-consumed", "shed",
})


@functools.lru_cache(maxsize=4096)
def address_key(address: str, v4_prefix: int = 24, v6_prefix: int = 64) -> str:
    """The key a client address is counted by (pending connections, failures): its IPv4
    /v4_prefix or IPv6 /v6_prefix network, so that one host's many addresses count as one.
    An IPv4-mapped IPv6 address counts as IPv4; anything else that is not an address, as itself."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%", 1)[0])
    except ValueError:
        return address
    ip = getattr(ip, "ipv4_mapped", None) or ip
    prefix = v4_prefix if ip.version == 4 else v6_prefix
    return str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


class FailureThrottle:
    def __init__(self, burst: float, per_second: float, clock: Callable[[], float] = time.monotonic,
                 max_addresses: int = 100_000) -> None:
        self.burst = burst
        self.per_second = per_second
        self.clock = clock
        self.max_addresses = max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (tokens, when)
        self._lock = threading.Lock()

    def _level(self, address: str, now: float) -> float:
        tokens, when = self._buckets.get(address, (self.burst, now))
        return min(self.burst, tokens + (now - when) * self.per_second)

    def allowed(self, address: str) -> bool:
        with self._lock:
            return self._level(address, self.clock()) >= 1

    def take(self, key: str) -> bool:
        """Spend one token of key's bucket if it has one (a request rate limit); False when empty."""
        now = self.clock()
        with self._lock:
            if self._level(key, now) < 1:
                return False
            self._spend(key, now)
            return True

    def failed(self, address: str) -> None:
        now = self.clock()
        with self._lock:
            self._spend(address, now)

    def charge(self, key: str, reason: str) -> bool:
        """Count a refusal against key's bucket when it is the client's own failure (FAILURES);
        False when the bucket was empty already: the client is then told "throttled" instead."""
        return reason not in FAILURES or self.take(key)

    def _spend(self, key: str, now: float) -> None:
        if len(self._buckets) >= self.max_addresses:
            self._forget_full(now)
        self._buckets[key] = (max(0.0, self._level(key, now) - 1), now)

    def _forget_full(self, now: float) -> None:
        for address in [address for address in self._buckets if self._level(address, now) >= self.burst]:
            del self._buckets[address]
        if len(self._buckets) >= self.max_addresses:  # a flood from many addresses: start afresh
            self._buckets.clear()
