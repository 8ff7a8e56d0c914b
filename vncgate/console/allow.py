"""Where consoles may be reached: `backend_allow`, checked when a token is minted and again at
each connection, against the address a name resolves to then.

A token is a TCP connection the gateway makes on a stranger's behalf, so what it may reach is
bounded. Never, whatever the config says: the gateway's own port on any of this machine's
addresses (its /metrics, its API), the store's address and port, and addresses nothing can
live at (unspecified, multicast, broadcast). With backend_allow unset, every other address
but link-local (169.254.0.0/16, fe80::/10: cloud metadata services) is allowed, loopback
included, so that `qemu -vnc 127.0.0.1:N` works for local testing; with it set, only what it
lists.
"""

import ipaddress
import socket
import threading
from typing import Optional

from vncgate import addresses
from vncgate.store import targets

LINK_LOCAL = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fe80::/10"))


class BackendAllow:
    """The gateway's rule for console addresses; refusal() says why one is out, or None."""

    def __init__(self, listed: tuple = (), own_ports: tuple = (), store: tuple = ()) -> None:
        """listed: backend_allow (addresses.Reach items); own_ports: the gateway's listening
        ports; store: the store's (host, port) pairs, resolved here once."""
        self.listed = tuple(listed)
        self.own_ports = set(own_ports)
        self.store = set()  # (address, port) of a store on another machine
        self.store_ports = set()  # ports of a store on this one: at any of its addresses
        for host, port in store:
            for address in resolve(host, port) or [host]:
                ip = addresses.parse_address(address)
                if ip is not None and _is_local(ip):
                    self.store_ports.add(port)
                elif ip is not None:
                    self.store.add((ip, port))
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: object) -> "BackendAllow":
        database = getattr(config, "database", "")
        store = targets.RedisTarget.parse(database).hosts if targets.is_redis_url(database) else ()
        ports = (getattr(config, "port", 0),)
        return cls(getattr(config, "backend_allow", ()), tuple(port for port in ports if port), store)

    def add_own_port(self, port: int) -> None:
        """The port the gateway bound (known once it listens: --port 0 picks one)."""
        with self._lock:
            self.own_ports = self.own_ports | {port}

    def refusal(self, address: str, port: int) -> Optional[str]:
        """Why a console may not be at address:port (an IP address), or None when it may."""
        ip = addresses.parse_address(address)
        if ip is None:
            return f"{address} is not an address"
        if ip.is_unspecified or ip.is_multicast or ip == ipaddress.ip_address("255.255.255.255"):
            return f"{ip} is no console's address"
        if (ip, port) in self.store or (port in self.store_ports and _is_local(ip)):
            return f"{ip}:{port} is the token store"
        if port in self.own_ports and _is_local(ip):
            return f"{ip}:{port} is this gateway's own port"
        if self.listed:
            return None if addresses.holds(self.listed, str(ip), port) else f"{ip}:{port} is outside backend_allow"
        if any(ip in network for network in LINK_LOCAL):
            return f"{ip} is link-local"
        return None

    def check_target(self, host: str, port: int, within: tuple = ()) -> Optional[str]:
        """At mint: why host:port may not be a console's, or None. A name is resolved and every
        address it has now must be allowed (and it is checked again at each connection); a name
        that does not resolve passes only while backend_allow is unset. within: a narrower list
        (an API key's networks) that must hold the address too; it takes addresses only."""
        literal = addresses.parse_address(host)
        if within and literal is None:
            return f"{host} is a name, and this key may mint consoles by address only"
        found = [str(literal)] if literal is not None else resolve(host, port)
        if not found:
            return f"{host} does not resolve, and backend_allow is set" if self.listed else None
        for address in found:
            why = self.refusal(address, port)
            if why is None and within and not addresses.holds(within, address, port):
                why = f"{address}:{port} is outside this key's networks"
            if why:
                return why
        return None


def resolve(host: str, port: int) -> list:
    """The addresses a name has now (each once, in the resolver's order); [] when none."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, ValueError):
        return []
    found: list = []
    for info in infos:
        if info[4][0] not in found:
            found.append(info[4][0])
    return found


def _is_local(ip: object) -> bool:
    """Whether ip is one of this machine's addresses (loopback, or one it can bind)."""
    if getattr(ip, "is_loopback", False):
        return True
    family = socket.AF_INET6 if getattr(ip, "version", 4) == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
        return True
    except OSError:
        return False
