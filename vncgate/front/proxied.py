"""Who the client is behind a load balancer: PROXY headers and forwarding headers from trusted proxies.

A connection from an address in trusted_proxies may start with a PROXY header (v1 or
v2, before TLS and before the request line), and its HTTP request may carry
Forwarded (RFC 7239, preferred when both are sent) or X-Forwarded-For. The client is
then the address the header names: for the forwarding headers, the right-most address
that is not itself a trusted proxy (what the proxies in front appended; whatever the
client itself wrote lies further left and is never used). From any other address the
forwarding headers are ignored and a PROXY header is refused.

The client is a Client: the "address:port" text every per-address rule and audit line
already reads (port 0 when only the address is known), carrying the proxy that told
it as .via, which the audit line names too.
"""

import ipaddress
import re
import socket
import time

from vncgate.front.web import address_in
from vncgate.net import http, proxy_protocol
from vncgate.refusals import Refused

PEEK = proxy_protocol.V2_HEADER + proxy_protocol.V2_MAX
MAX_HOPS = 16  # trusted proxies in a row in one forwarding header
# A Forwarded node: "[v6]" or v4, then an optional ":port" (RFC 7239, 6).
_NODE = re.compile(r"(?:\[([0-9A-Fa-f:.]+)\]|([0-9.]+))(?::([0-9]{1,5}))?")
_WAIT_MORE = 0.01  # seconds between looks at a header that has arrived in part


class Client(str):
    """ "address:port" of a client; .via: "address:port" of the proxy that named it, or None."""

    via: str | None

    def __new__(cls, text: str, via: str | None = None) -> "Client":
        client = super().__new__(cls, text)
        client.via = via
        return client

    @property
    def address(self) -> str:
        return self.rsplit(":", 1)[0]


def client_text(address: str, port: int) -> str:
    return f"{address}:{port}"


def from_proxy_header(conn: socket.socket, deadline: float, peer: tuple, trusted: tuple) -> Client:
    """The client of a fresh connection: the source of its PROXY header when its peer is a
    trusted proxy, else the peer. The header's bytes are consumed, nothing after them.
    Raises Refused: proxy-not-trusted, bad-proxy-header, handshake-timeout."""
    itself = Client(client_text(peer[0], peer[1]))
    seen = -1
    while True:
        data = _peek(conn, deadline, "nothing sent in time" if seen < 0 else "PROXY header not complete in time")
        found = proxy_protocol.signature(data) if data else False
        if found is False:
            return itself  # not a PROXY header (or the client left: the request reader says so)
        if found:
            if not address_in(peer[0], trusted):
                raise Refused("proxy-not-trusted", "PROXY header from an address not in trusted_proxies")
            try:
                header = proxy_protocol.parse(data)
            except proxy_protocol.Malformed as error:
                raise Refused("bad-proxy-header", str(error)) from None
            if header is not None:
                _consume(conn, header.length)
                if header.source is None:  # the proxy's own connection (its health check)
                    return itself
                return Client(client_text(*header.source), via=itself)
        if len(data) == seen:  # nothing new yet: a peek would answer at once with the same bytes
            time.sleep(min(_WAIT_MORE, max(0.0, deadline - time.monotonic())))
        seen = len(data)


def _peek(conn: socket.socket, deadline: float, late: str) -> bytes:
    """What has arrived, read but left in place; Refused handshake-timeout (detail: late) at the deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise Refused("handshake-timeout", late)
    conn.settimeout(remaining)
    try:
        return conn.recv(PEEK, socket.MSG_PEEK)
    except socket.timeout:
        raise Refused("handshake-timeout", late) from None


def _consume(conn: socket.socket, count: int) -> None:
    """Read count bytes that a peek has shown are there already."""
    while count:
        chunk = conn.recv(count)
        if not chunk:
            raise Refused("bad-proxy-header", "connection closed in the PROXY header")
        count -= len(chunk)


def from_request(request: http.Request, client: Client, trusted: tuple) -> Client:
    """The client an HTTP request is from: named by its forwarding headers when the connection
    is a trusted proxy's, else client as it is. Raises Refused bad-forwarded-header when a
    trusted proxy's header cannot be read up to the client."""
    hop = client.address
    if not trusted or not address_in(hop, trusted):
        return client
    forwarded, forwarded_for = request.header("forwarded").strip(), request.header("x-forwarded-for").strip()
    if forwarded:
        hops = [_forwarded_for(element) for element in _split(forwarded, ",")]
    elif forwarded_for:
        hops = [_xff_item(item) for item in forwarded_for.split(",")]
    else:
        return client  # no forwarding header: the proxy's own request
    for count, (item, node) in enumerate(reversed(hops)):
        if count >= MAX_HOPS:
            raise Refused("bad-forwarded-header", f"more than {MAX_HOPS} trusted proxies in a row")
        if node is None:
            raise Refused("bad-forwarded-header", f"not an address: {item[:60]!r}")
        if not address_in(node[0], trusted) or count == len(hops) - 1:
            return Client(client_text(*node), via=client.via or client)
    raise AssertionError("unreachable: the loop returns on its last item")


def _address(text: str) -> str | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    return str(ip)


def _xff_item(item: str) -> tuple[str, tuple[str, int] | None]:
    """(the item, (address, port) or None when it is no address): an address, or a node as in
    Forwarded ("[v6]:port", "v4:port"), as some proxies write it."""
    return item, _node(item.strip())


def _node(text: str) -> tuple[str, int] | None:
    """(address, port; 0 when not given) of "v4", "v6", "[v6]", "v4:port" or "[v6]:port"; None for anything else."""
    address = _address(text)
    if address:
        return address, 0
    match = _NODE.fullmatch(text)
    address = match and _address(match.group(1) or match.group(2))
    port = int(match.group(3) or 0) if match else 0
    return (address, port) if address and port <= 65535 else None


def _forwarded_for(element: str) -> tuple[str, tuple[str, int] | None]:
    """(the element, (address, port) of its for= node, or None when it names none we can use:
    missing, "unknown", an obfuscated name, or malformed)."""
    values = {}
    for pair in _split(element, ";"):
        name, equals, value = pair.strip().partition("=")
        if not equals:
            return element, None
        if value.startswith('"'):
            if len(value) < 2 or not value.endswith('"'):
                return element, None
            value = value[1:-1].replace('\\"', '"').replace("\\\\", "\\")
        values[name.strip().lower()] = value
    node = values.get("for", "")
    return element, (None if node.count(":") > 1 and not node.startswith("[") else _node(node))  # v6 in brackets


def _split(text: str, separator: str) -> list[str]:
    """text split at separator, except inside quoted strings."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif char == "\\" and quoted:
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts
