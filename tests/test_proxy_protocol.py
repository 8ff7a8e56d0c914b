"""Unit tests of the PROXY protocol parser (sans-IO) and of reading forwarding headers."""

import ipaddress
import socket
import struct
import threading
import time

import pytest

from tests import harness
from vncgate.front import proxied
from vncgate.net import http
from vncgate.net import proxy_protocol as pp
from vncgate.refusals import Refused

SIG = pp.V2_SIGNATURE
TRUSTED = (ipaddress.ip_network("127.0.0.1/32"), ipaddress.ip_network("10.0.0.0/8"))


# -- signatures -------------------------------------------------------------------------

@pytest.mark.parametrize("data, expected", [
    (b"", None), (b"P", None), (b"PROX", None), (b"PROXY ", True), (b"PROXY TCP4", True),
    (b"\r", None), (b"\r\n\r\n\x00\r\nQUI", None), (SIG, True),
    (b"POST / HTTP/1.1", False), (b"PROPFIND", False), (b"GET / HTTP/1.1", False), (b"\x16\x03\x01", False),
    (b"\r\n\r\n\x00\r\nQUIX\n", False),  # a v2 signature with one byte wrong
    (b"PROXY\t", False),
])
def test_signature(data, expected):
    assert pp.signature(data) is expected


# -- v1 ---------------------------------------------------------------------------------

def test_v1_tcp4_and_tcp6_name_the_source_and_take_only_the_line():
    line = b"PROXY TCP4 192.0.2.7 192.0.2.1 56324 443\r\n"
    assert pp.parse(line + b"GET / HTTP/1.1\r\n") == pp.Header(1, len(line), ("192.0.2.7", 56324))
    line = b"PROXY TCP6 2001:db8::7 2001:db8::1 65535 443\r\n"
    assert pp.parse(line + b"\x16\x03") == pp.Header(1, len(line), ("2001:db8::7", 65535))


def test_v1_unknown_names_no_client():
    assert pp.parse(b"PROXY UNKNOWN\r\n") == pp.Header(1, 15, None)
    assert pp.parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n").source is None


@pytest.mark.parametrize("partial", [b"PROXY ", b"PROXY TCP4 192.0.2.7", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"])
def test_v1_incomplete_asks_for_more(partial):
    assert pp.parse(partial) is None


@pytest.mark.parametrize("line, detail", [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 " + b"2" * 100, "within 107 bytes"),  # no CRLF in 107 bytes
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),  # a bare LF
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "family"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "words"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "words"),  # two spaces
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "words"),
    (b"PROXY TCP4 ::1 ::2 1 2\r\n", "not TCP4"),
    (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "not TCP6"),
    (b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n", "not TCP4"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n", "control"),
    (b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n", "ASCII"),
])
def test_v1_malformations(line, detail):
    with pytest.raises(pp.Malformed, match=detail):
        pp.parse(line)


# -- v2 ---------------------------------------------------------------------------------

def v2(version_command=0x21, family_protocol=0x11, body=b"", length=None):
    return SIG + struct.pack("!BBH", version_command, family_protocol,
                             len(body) if length is None else length) + body


IPV4_BODY = bytes([127, 0, 0, 7, 127, 0, 0, 1]) + struct.pack("!HH", 40000, 443)


def test_v2_inet_and_inet6_name_the_source_and_skip_tlvs():
    header = v2(body=IPV4_BODY + b"\x04\x00\x01X")  # one TLV (NOOP) after the addresses
    assert pp.parse(header + b"rest") == pp.Header(2, len(header), ("127.0.0.7", 40000))
    six = pp.v2_header(("2001:db8::7", 1234), ("2001:db8::1", 443))
    assert pp.parse(six) == pp.Header(2, len(six), ("2001:db8::7", 1234))


def test_v2_local_and_unspecified_name_no_client():
    assert pp.parse(pp.v2_header(None)) == pp.Header(2, 16, None)
    assert pp.parse(v2(0x20, 0x11, IPV4_BODY)).source is None  # LOCAL: addresses ignored
    assert pp.parse(v2(0x21, 0x00)).source is None  # PROXY, AF_UNSPEC
    assert pp.parse(v2(0x21, 0x31, bytes(216))).source is None  # AF_UNIX: no address to use


@pytest.mark.parametrize("cut", [12, 15, 16, 20, 27])
def test_v2_truncated_asks_for_more(cut):
    assert pp.parse(v2(body=IPV4_BODY)[:cut]) is None


@pytest.mark.parametrize("header, detail", [
    (v2(0x11, 0x11, IPV4_BODY), "version 1"),
    (v2(0x31, 0x11, IPV4_BODY), "version 3"),
    (v2(0x22, 0x11, IPV4_BODY), "command 2"),
    (v2(0x21, 0x41, IPV4_BODY), "family 4"),
    (v2(0x21, 0x13, IPV4_BODY), "protocol 3"),
    (v2(0x21, 0x12, IPV4_BODY), "not a stream"),  # UDP
    (v2(0x21, 0x11, IPV4_BODY[:8]), "cannot hold"),
    (v2(0x21, 0x21, IPV4_BODY), "cannot hold"),  # INET6 with an INET body
    (v2(0x21, 0x11, b"", length=pp.V2_MAX + 1), "over"),  # oversized: refused before it arrives
    (v2(0x21, 0x11, b"", length=0xFFFF), "over"),
])
def test_v2_malformations(header, detail):
    with pytest.raises(pp.Malformed, match=detail):
        pp.parse(header)


def test_v2_length_past_the_buffer_waits_then_is_bounded():
    """A length larger than what was sent is more to wait for (the caller's deadline ends it), never a read past the buffer."""
    assert pp.parse(v2(body=IPV4_BODY, length=len(IPV4_BODY) + 100)) is None


# -- forwarding headers -----------------------------------------------------------------------

def request(**headers):
    return http.Request("GET", "/", "HTTP/1.1", {name.replace("_", "-"): value for name, value in headers.items()})


PROXY_PEER = proxied.Client("127.0.0.1:5000")


def test_x_forwarded_for_right_most_untrusted_address_is_the_client():
    client = proxied.from_request(request(x_forwarded_for="6.6.6.6, 192.0.2.9, 10.1.1.1"), PROXY_PEER, TRUSTED)
    assert (client, client.via) == ("192.0.2.9:0", "127.0.0.1:5000")
    assert client.address == "192.0.2.9"


def test_all_trusted_gives_the_left_most():
    assert proxied.from_request(request(x_forwarded_for="10.0.0.1, 10.0.0.2"), PROXY_PEER, TRUSTED) == "10.0.0.1:0"


def test_forwarding_headers_from_an_untrusted_peer_are_ignored():
    peer = proxied.Client("192.0.2.50:7000")
    client = proxied.from_request(request(x_forwarded_for="10.9.9.9", forwarded="for=10.9.9.9"), peer, TRUSTED)
    assert (client, client.via) == ("192.0.2.50:7000", None)
    assert proxied.from_request(request(x_forwarded_for="10.9.9.9"), PROXY_PEER, ()) == PROXY_PEER


def test_no_forwarding_header_is_the_proxy_itself():
    assert proxied.from_request(request(), PROXY_PEER, TRUSTED) is PROXY_PEER


def test_client_written_garbage_left_of_the_client_is_never_read():
    assert proxied.from_request(request(x_forwarded_for="<script>, 192.0.2.9"), PROXY_PEER, TRUSTED) == "192.0.2.9:0"


@pytest.mark.parametrize("value, client", [
    ("for=192.0.2.60;proto=http;by=203.0.113.43", "192.0.2.60:0"),
    ('for="[2001:db8:cafe::17]:4711"', "2001:db8:cafe::17:4711"),
    ('For="192.0.2.43:47011", for=10.0.0.9', "192.0.2.43:47011"),
    ('for=unknown, for=192.0.2.1;host="a,b"', "192.0.2.1:0"),  # a comma inside quotes splits nothing
])
def test_forwarded(value, client):
    assert proxied.from_request(request(forwarded=value, x_forwarded_for="10.9.9.9"), PROXY_PEER, TRUSTED) == client


@pytest.mark.parametrize("headers", [
    {"x_forwarded_for": "nonsense"},
    {"x_forwarded_for": "192.0.2.1, , 10.0.0.1"},  # empty item reached in the walk
    {"x_forwarded_for": "192.0.2.1:99999x"},
    {"forwarded": "for=unknown"},
    {"forwarded": "for=_hidden"},
    {"forwarded": "proto=https"},
    {"forwarded": 'for="[::1'},
    {"forwarded": "for=[::1]:70000"},
    {"forwarded": "for"},
    {"x_forwarded_for": ", ".join(["10.0.0.1"] * 40)},  # too many trusted hops in a row
])
def test_unreadable_forwarding_headers_are_refused(headers):
    with pytest.raises(Refused) as refused:
        proxied.from_request(request(**headers), PROXY_PEER, TRUSTED)
    assert (refused.value.reason, refused.value.status) == ("bad-forwarded-header", 400)


# -- reading a header from a socket -----------------------------------------------------------

def dripped(pieces, gap=0.05):
    """A connected socket whose peer sends pieces with a gap between them, then keeps it open."""
    ours, theirs = socket.socketpair()

    def send():
        for piece in pieces:
            theirs.sendall(piece)
            time.sleep(gap)
    threading.Thread(target=send, daemon=True).start()
    return ours, theirs


def test_a_header_in_pieces_is_read_whole_and_nothing_after_it():
    header = pp.v2_header(("192.0.2.5", 999))
    ours, theirs = dripped([header[:5], header[5:14], header[14:], b"\x16\x03rest"])
    with ours, theirs:
        client = proxied.from_proxy_header(ours, time.monotonic() + 5, ("127.0.0.1", 40000), TRUSTED)
        assert (client, client.via) == ("192.0.2.5:999", "127.0.0.1:40000")
        ours.settimeout(5)
        assert ours.recv(2) == b"\x16\x03"  # the TLS ClientHello after it is left for the TLS layer


def test_no_header_reads_nothing_and_names_the_peer():
    ours, theirs = dripped([b"PO", b"ST / HTTP/1.1\r\n"])
    with ours, theirs:
        client = proxied.from_proxy_header(ours, time.monotonic() + 5, ("192.0.2.9", 5), TRUSTED)
        assert (client, client.via) == ("192.0.2.9:5", None)
        ours.settimeout(5)
        assert harness.wait_for(lambda: ours.recv(4, socket.MSG_PEEK) == b"POST")  # all still there


@pytest.mark.parametrize("pieces, reason", [
    ([pp.v2_header(("192.0.2.5", 1))[:20]], "handshake-timeout"),  # truncated, then silent
    ([b"PROXY TCP4 1.2.3.4"], "handshake-timeout"),
    ([b"\r\n\r\n"], "handshake-timeout"),  # a prefix of the v2 signature, then silent
    ([b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n"], "bad-proxy-header"),
])
def test_a_header_that_stops_or_breaks_is_refused_by_the_deadline(pieces, reason):
    ours, theirs = dripped(pieces)
    with ours, theirs:
        started = time.monotonic()
        with pytest.raises(Refused) as refused:
            proxied.from_proxy_header(ours, started + 0.5, ("127.0.0.1", 1), TRUSTED)
        assert refused.value.reason == reason
        assert time.monotonic() - started < 1.5


def test_a_header_from_an_untrusted_peer_is_refused():
    ours, theirs = dripped([pp.v1_header(("192.0.2.5", 1), ("192.0.2.6", 2))])
    with ours, theirs, pytest.raises(Refused) as refused:
        proxied.from_proxy_header(ours, time.monotonic() + 5, ("192.0.2.77", 1), TRUSTED)
    assert (refused.value.reason, refused.value.status) == ("proxy-not-trusted", 400)
