"""The PROXY protocol (HAProxy's, versions 1 and 2): who the client of a balanced connection is.

Sans-IO: signature() says from a connection's first bytes whether they start a PROXY
header, and parse() reads one from a buffer, saying how many bytes it took. The caller
decides whom to believe (only a trusted proxy) and does the reading. Strict: anything
but a well-formed header is Malformed, with a detail for the audit line, and a header
is bounded (107 bytes for v1, MAX_V2 for v2) so that a stranger cannot make the
gateway wait for, or keep, more.
"""

import dataclasses
import ipaddress
import re
import struct

V1_SIGNATURE = b"PROXY "
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107  # the whole line, CRLF included (the specification's bound)
V2_HEADER = 16  # signature, version and command, family and protocol, length
V2_MAX = 2048  # addresses and TLVs: HAProxy's own TLVs fit many times over
_V2_ADDRESSES = {0x1: (12, "!4s4sHH", ipaddress.IPv4Address),  # AF_INET: src, dst, sport, dport
                 0x2: (36, "!16s16sHH", ipaddress.IPv6Address)}  # AF_INET6
_V1_PORT = re.compile(r"0|[1-9][0-9]{0,4}")


class Malformed(ValueError):
    """A PROXY header that is not well formed; str() says what, for the audit line."""


@dataclasses.dataclass(frozen=True)
class Header:
    """length: the header's bytes, to be consumed. source: the client's (address, port), or
    None when the header names no client (v1 UNKNOWN, v2 LOCAL or an unspecified family):
    the connection is then the proxy's own (a health check)."""
    version: int
    length: int
    source: tuple[str, int] | None


def signature(data: bytes) -> bool | None:
    """True when data starts with a PROXY signature, False when it cannot, None when it is
    too short to tell (a prefix of one)."""
    for sign in (V1_SIGNATURE, V2_SIGNATURE):
        if data.startswith(sign):
            return True
        if sign.startswith(data[:len(sign)]):
            return None
    return False


def parse(data: bytes) -> Header | None:
    """The header data starts with (signature() is True); None when more bytes are needed.
    Raises Malformed."""
    if data.startswith(V1_SIGNATURE):
        return _parse_v1(data)
    if data.startswith(V2_SIGNATURE):
        return _parse_v2(data)
    raise Malformed("no PROXY signature")


def _parse_v1(data: bytes) -> Header | None:
    end = data.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(data) >= V1_MAX or b"\n" in data[:V1_MAX]:
            raise Malformed(f"v1 line not ended by CRLF within {V1_MAX} bytes")
        return None
    try:
        line = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise Malformed("v1 line is not ASCII") from None
    if not line.isprintable():
        raise Malformed("v1 line has control characters")
    words = line.split(" ")
    if len(words) >= 2 and words[1] == "UNKNOWN":  # anything may follow; it is ignored
        return Header(1, end + 2, None)
    if len(words) != 6:
        raise Malformed(f"v1 line has {len(words)} words, not 6")
    family, source, _destination, source_port, destination_port = words[1:]
    kind = {"TCP4": ipaddress.IPv4Address, "TCP6": ipaddress.IPv6Address}.get(family)
    if kind is None:
        raise Malformed("v1 family is not TCP4, TCP6 or UNKNOWN")
    for address in words[2:4]:
        try:
            kind(address)
        except ValueError:
            raise Malformed(f"v1 address is not {family}") from None
    for port in (source_port, destination_port):
        if not _V1_PORT.fullmatch(port) or int(port) > 65535:
            raise Malformed("v1 port is not a number from 0 to 65535")
    return Header(1, end + 2, (str(kind(source)), int(source_port)))


def _parse_v2(data: bytes) -> Header | None:
    if len(data) < V2_HEADER:
        return None
    version_command, family_protocol, length = struct.unpack("!BBH", data[12:V2_HEADER])
    version, command = version_command >> 4, version_command & 0xF
    if version != 2:
        raise Malformed(f"v2 header of version {version}")
    if command > 1:
        raise Malformed(f"v2 command {command} is neither LOCAL nor PROXY")
    if length > V2_MAX:
        raise Malformed(f"v2 length {length} is over {V2_MAX}")
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if family > 3 or protocol > 2:
        raise Malformed(f"v2 family {family} or protocol {protocol} is unknown")
    if len(data) < V2_HEADER + length:
        return None
    total = V2_HEADER + length
    if command == 0 or family in (0, 3):  # LOCAL (the proxy's own check), or no IP source
        return Header(2, total, None)
    if protocol != 1:
        raise Malformed("v2 protocol is not a stream")
    size, layout, kind = _V2_ADDRESSES[family]
    if length < size:
        raise Malformed(f"v2 length {length} cannot hold the addresses ({size} bytes)")
    source, _destination, source_port, _destination_port = struct.unpack(layout, data[V2_HEADER:V2_HEADER + size])
    return Header(2, total, (str(kind(source)), source_port))


def v1_header(source: tuple[str, int], destination: tuple[str, int]) -> bytes:
    """A v1 header for a TCP connection (for tests and benches that play the proxy)."""
    family = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {family} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2_header(source: tuple[str, int] | None, destination: tuple[str, int] = ("127.0.0.1", 0),
              tlvs: bytes = b"") -> bytes:
    """A v2 header: PROXY for a TCP source, LOCAL when source is None."""
    if source is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    six = ":" in source[0]
    kind = ipaddress.IPv6Address if six else ipaddress.IPv4Address
    addresses = struct.pack("!16s16sHH" if six else "!4s4sHH", kind(source[0]).packed,
                            kind(destination[0]).packed, source[1], destination[1])
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x21 if six else 0x11, len(addresses) + len(tlvs)) + \
        addresses + tlvs
