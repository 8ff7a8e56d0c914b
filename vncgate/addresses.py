"""Networks and port ranges: the syntax of `backend_allow` and of an API key's `networks` scope.

A list is items separated by commas or spaces. An item is a network (an address, or CIDR),
optionally followed by `:PORT` or `:LOW-HIGH`; an IPv6 network with ports is written in
brackets: `10.0.0.0/8`, `192.0.2.7:5900-5999`, `fd00::/8`, `[fd00::/8]:5900`.
"""

import dataclasses
import ipaddress
from typing import Optional, Union

Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


@dataclasses.dataclass(frozen=True)
class Reach:
    """One network and the ports in it that consoles may be reached at."""
    network: Network
    low: int = 1
    high: int = 65535

    def holds(self, address: str, port: int) -> bool:
        ip = parse_address(address)
        return ip is not None and ip in self.network and self.low <= port <= self.high

    def __str__(self) -> str:
        single = self.network.prefixlen == self.network.max_prefixlen
        network = str(self.network.network_address) if single else str(self.network)
        if (self.low, self.high) == (1, 65535):
            return network
        ports = str(self.low) if self.low == self.high else f"{self.low}-{self.high}"
        return f"[{network}]:{ports}" if self.network.version == 6 else f"{network}:{ports}"


def parse_address(text: str) -> Optional[Union[ipaddress.IPv4Address, ipaddress.IPv6Address]]:
    """The address text names (an IPv4-mapped IPv6 address as its IPv4 one), or None for a name."""
    try:
        ip = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _ports(text: str) -> tuple:
    low_text, dash, high_text = text.partition("-")
    if not low_text.isascii() or not low_text.isdigit() or (dash and not (high_text.isascii()
                                                                          and high_text.isdigit())):
        raise ValueError(f"{text!r} is not PORT or LOW-HIGH")
    low, high = int(low_text[:6]), int(high_text[:6]) if dash else int(low_text[:6])
    if not 1 <= low <= high <= 65535:
        raise ValueError(f"ports {text!r} must be from 1 to 65535, low to high")
    return low, high


def parse_item(item: str) -> Reach:
    """One item; ValueError says what is wrong with it."""
    if item.startswith("["):
        network_text, _, rest = item[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"{item!r}: write [IPV6/BITS]:PORTS")
        ports = rest[1:] if rest else ""
    elif item.count(":") == 1:
        network_text, _, ports = item.partition(":")
    else:
        network_text, ports = item, ""
    try:
        network = ipaddress.ip_network(network_text, strict=False)
    except ValueError:
        raise ValueError(f"{item!r} is not an address or network") from None
    return Reach(network, *(_ports(ports) if ports else (1, 65535)))


def parse(text: str) -> tuple:
    """Every item of a list (a tuple of Reach); ValueError names the first bad one."""
    return tuple(parse_item(item) for item in text.replace(",", " ").split())


def holds(reaches: tuple, address: str, port: int) -> bool:
    return any(reach.holds(address, port) for reach in reaches)
