"""The bounded request reader: unit cases and a property-based fuzz."""

import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vncgate.net import http
from vncgate.refusals import Refused


class ScriptedSocket:
    """Feeds the reader fixed chunks and records how much it asked for."""

    def __init__(self, chunks):
        self.chunks = list(chunks)
        self.asked = []
        self.delivered = 0

    def settimeout(self, _seconds):
        pass

    def recv(self, size):
        self.asked.append(size)
        if not self.chunks:
            return b""
        chunk = self.chunks.pop(0)
        head, self.chunks[:0] = chunk[:size], [chunk[size:]] if chunk[size:] else []
        self.delivered += len(head)
        return head


    def unread(self):
        return b"".join(self.chunks)


def read(chunks, limit=http.MAX_HEAD):
    return http.read_request(ScriptedSocket(chunks), time.monotonic() + 5, limit)


def test_a_request_split_anywhere_keeps_its_leftover():
    raw = b"CONNECT /console?token=abc HTTP/1.1\r\nHost: g\r\nX-A: 1\r\nx-a: 2\r\n\r\nRFB 003.008\n"
    for cut in range(1, len(raw)):
        sock = ScriptedSocket([raw[:cut], raw[cut:]])
        request, leftover = http.read_request(sock, time.monotonic() + 5)
        assert (request.method, request.path, request.query_value("token")) == ("CONNECT", "/console", "abc")
        assert request.header("X-A") == "1, 2"
        assert leftover + sock.unread() == b"RFB 003.008\n"  # what the relay gets: nothing lost


@pytest.mark.parametrize("raw, detail", [
    (b"\x16\x03\x01\x02\x00", "not an HTTP request"),
    (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", "malformed request line"),
    (b"GET / HTTP/1.1\r\nno colon here\r\n\r\n", "malformed header line"),
    (b"GET / HTTP/1.1\r\n bad: fold\r\n\r\n", "malformed header line"),
    (b"GET /  HTTP/1.1\r\n\r\n", "malformed request line"),
    (b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 65 + b"\r\n", "more than 64 header lines"),
    (b"get / HTTP/1.1\r\n\r\n", "not an HTTP request"),
    (b"GET / HTTP/1.1\r\n", "connection closed"),
])
def test_bad_heads_are_400(raw, detail):
    with pytest.raises(Refused) as error:
        read([raw])
    assert error.value.status == 400 and detail in error.value.detail


def test_duplicate_token_is_400():
    request, _ = read([b"CONNECT /console?token=a&token=b HTTP/1.1\r\n\r\n"])
    with pytest.raises(Refused, match="more than one token"):
        request.query_value("token")


def test_cookie_lookup():
    request, _ = read([b"GET /websockify HTTP/1.1\r\nCookie: a=1; token=xyz; b=2\r\n\r\n"])
    assert request.cookie("token") == "xyz" and request.cookie("missing") == ""


def test_deadline_gives_408():
    left, right = socket.socketpair()
    try:
        right.sendall(b"CONNECT /console?token=x HTTP/1.1\r\n")
        started = time.monotonic()
        with pytest.raises(Refused) as error:
            http.read_request(left, time.monotonic() + 0.3)
        assert error.value.status == 408 and time.monotonic() - started < 2
    finally:
        left.close()
        right.close()


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=st.lists(st.binary(min_size=1, max_size=3000), min_size=1, max_size=8),
       limit=st.integers(min_value=16, max_value=4096))
def test_fuzz_no_exception_escapes_and_no_read_past_the_bound(chunks, limit):
    sock = ScriptedSocket(chunks)
    try:
        request, leftover = http.read_request(sock, time.monotonic() + 5, limit)
    except Refused as error:
        assert error.status == 400  # the scripted peer never stalls, so never 408
    else:
        assert request.method.isupper() and request.version in ("HTTP/1.0", "HTTP/1.1")
        head_end = b"".join(chunks).index(b"\r\n\r\n") + 4
        assert leftover + sock.unread() == b"".join(chunks)[head_end:]
    assert sock.delivered <= limit + 4  # never more than the head's bound plus its blank line


@settings(max_examples=200, deadline=None)
@given(method=st.sampled_from(["CONNECT", "GET", "HEAD"]), token=st.text(min_size=0, max_size=80),
       headers=st.dictionaries(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True),
                               st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
                               max_size=10))
def test_fuzz_well_formed_requests_parse_back(method, token, headers):
    from urllib.parse import quote
    lines = [f"{method} /console?token={quote(token, safe='')} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers.items()]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    try:
        request, leftover = read([raw])
    except Refused as error:
        assert error.status == 400 and len(raw) > http.MAX_HEAD
        return
    assert request.method == method and leftover == b""
    assert request.query.get("token", [""]) == [token] or (token == "" and request.query_value("token") == "")
