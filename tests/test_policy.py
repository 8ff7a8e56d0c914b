"""Console policies in the process: the client-to-server RFB parser, the filters, the idle watch."""

import socket
import struct
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import harness
from vncgate import refusals
from vncgate import store as store_module
from vncgate.console import policy, rfb
from vncgate.console.policy import Malformed, Parser, Policy

KEY = struct.Struct("!BBxxI")


def key(down, keysym):
    return KEY.pack(4, down, keysym)


def pointer(mask, x=10, y=20):
    return struct.pack("!BBHH", 5, mask, x, y)


def encodings(*values):
    return struct.pack(f"!BxH{len(values)}i", 2, len(values), *values)


def cut_text(text):
    return struct.pack("!BxxxI", 6, len(text)) + text


def extended_cut_text(payload):
    return struct.pack("!Bxxxi", 6, -len(payload)) + payload


# Every message type the parser knows, as real clients send them.
MESSAGES = [
    b"\x00" + bytes(19),                                 # SetPixelFormat
    encodings(7, 16, 0, -223, -258),                     # SetEncodings
    encodings(),                                         # ... with no encodings
    struct.pack("!BBHHHH", 3, 1, 0, 0, 640, 480),        # FramebufferUpdateRequest
    key(1, 0x61),                                        # KeyEvent
    pointer(1),                                          # PointerEvent
    cut_text(b"clipboard"),                              # ClientCutText
    cut_text(b""),
    struct.pack("!BBHHHH", 150, 1, 0, 0, 640, 480),      # EnableContinuousUpdates
    struct.pack("!BxxxIB", 248, 0x80000000, 3) + b"abc",  # ClientFence
    struct.pack("!BxBB", 250, 1, 2),                     # XVP (reboot)
    struct.pack("!BxHHBx", 251, 800, 600, 1) + bytes(16),  # SetDesktopSize
    struct.pack("!BBHII", 255, 0, 1, 0x61, 0x1e),        # QEMU extended key event
    struct.pack("!BBH", 255, 1, 0),                      # QEMU audio enable
    struct.pack("!BBHBBI", 255, 1, 2, 3, 2, 44100),      # QEMU audio set format
]


def parse_all(data, splits=()):
    parser = Parser()
    messages, start = [], 0
    for end in (*splits, len(data)):
        messages += list(parser.feed(data[start:end]))
        start = end
    return messages, parser


def test_every_known_message_is_split_where_it_ends():
    stream = b"\x01" + b"".join(MESSAGES)
    messages, parser = parse_all(stream)
    assert messages == [b"\x01", *MESSAGES] and not parser.buffer


def test_messages_arriving_a_byte_at_a_time_come_out_whole():
    stream = b"\x00" + b"".join(MESSAGES)
    messages, parser = parse_all(stream, splits=range(1, len(stream)))
    assert messages == [b"\x00", *MESSAGES] and not parser.buffer


def test_an_incomplete_message_is_held_back():
    messages, parser = parse_all(b"\x01" + key(1, 0x61)[:7])
    assert messages == [b"\x01"] and bytes(parser.buffer) == key(1, 0x61)[:7]


@pytest.mark.parametrize("data, reason", [
    (b"\x07" + bytes(20), "client-bad-message"),                                   # unknown type
    (b"\x01\x00\x00", "client-bad-message"),                                       # type 1 is server's
    (struct.pack("!BBH", 255, 9, 0), "client-bad-message"),                        # unknown qemu subtype
    (struct.pack("!BBH", 255, 1, 7), "client-bad-message"),                        # unknown audio operation
    (extended_cut_text(b"\x10\0\0\x01data"), "client-bad-message"),                # extended, not announced
    (struct.pack("!BxxxI", 6, policy.MAX_CUT_TEXT + 1), "client-message-too-big"),
    (struct.pack("!Bxxxi", 6, -(2 ** 31)), "client-bad-message"),
    (struct.pack("!BxH", 2, policy.MAX_ENCODINGS + 1), "client-message-too-big"),
    (struct.pack("!BxxxIB", 248, 0, 65), "client-message-too-big"),
])
def test_malformed_or_oversized_messages(data, reason):
    with pytest.raises(Malformed) as error:
        parse_all(b"\x01" + key(1, 0x61) + data)
    assert error.value.reason == reason


def test_the_extended_clipboard_needs_its_announcement_and_its_flags():
    parser = Parser()
    parser.extended_clipboard = True
    list(parser.feed(b"\x01"))
    flags = b"\x10\0\0\x01"
    assert list(parser.feed(extended_cut_text(flags + b"zz"))) == [extended_cut_text(flags + b"zz")]
    with pytest.raises(Malformed):
        list(parser.feed(extended_cut_text(b"\x10\0")))  # shorter than its flags


# -- the filter ----------------------------------------------------------------------------

class Recorder:
    def __init__(self):
        self.writes = []
        self.closed = False

    def write(self, data):
        self.writes.append(bytes(data))

    def close_write(self):
        self.closed = True

    @property
    def data(self):
        return b"".join(self.writes)


def make_filter(**fields):
    sink, inputs, stops = Recorder(), [], []
    paste_max = fields.pop("paste_max_chars", 4096)
    flt = policy.Filter(sink, Policy(**fields), paste_max, on_input=lambda: inputs.append(1),
                        on_violation=lambda reason, detail: stops.append(reason), pause=lambda seconds: None)
    return flt, sink, inputs, stops


def test_without_rules_the_filter_passes_everything_and_counts_input():
    flt, sink, inputs, _ = make_filter(input_idle=5)
    stream = b"\x00" + b"".join(MESSAGES)
    for at in range(0, len(stream), 7):
        flt.write(stream[at:at + 7])
    assert sink.data == stream
    assert len(inputs) == 3  # KeyEvent, PointerEvent, QEMU extended key event
    flt.close_write()
    assert sink.closed


def test_view_only_drops_input_and_asks_for_a_shared_session():
    flt, sink, inputs, _ = make_filter(view_only=True)
    update = struct.pack("!BBHHHH", 3, 0, 0, 0, 640, 480)
    flt.write(b"\x00" + update + key(1, 0x61) + key(0, 0x61) + pointer(1, 5, 6) + pointer(0, 7, 8)
              + cut_text(b"secret") + struct.pack("!BBHII", 255, 0, 1, 0x61, 0x1e)
              + struct.pack("!BxBB", 250, 1, 2) + struct.pack("!BxHHBx", 251, 800, 600, 1) + bytes(16)
              + update)
    assert sink.data == b"\x01" + update + pointer(0, 5, 6) + pointer(0, 7, 8) + update
    assert len(inputs) == 5  # the user is there, though nothing of it reaches the console


@pytest.mark.parametrize("fields", [{"view_only": True}, {"paste_as_keys": True}])
def test_the_extended_clipboard_is_hidden_where_the_clipboard_is_dropped_or_typed(fields):
    flt, sink, _, stops = make_filter(**fields)
    flt.write(b"\x01" + encodings(7, policy.EXTENDED_CLIPBOARD, -223))
    assert sink.data == b"\x01" + encodings(7, -223)
    with pytest.raises(policy.Violation):  # so an extended ClientCutText is a violation
        flt.write(extended_cut_text(b"\x10\0\0\x01data"))
    assert stops == ["client-bad-message"] and sink.data == b"\x01" + encodings(7, -223)


def test_the_extended_clipboard_passes_where_it_was_announced():
    flt, sink, _, _ = make_filter(input_idle=5)
    message = extended_cut_text(b"\x10\0\0\x01data")
    flt.write(b"\x01" + encodings(7, policy.EXTENDED_CLIPBOARD) + message)
    assert sink.data == b"\x01" + encodings(7, policy.EXTENDED_CLIPBOARD) + message


def test_a_violation_passes_the_whole_messages_before_it_and_nothing_of_itself():
    flt, sink, _, stops = make_filter(input_idle=5)
    with pytest.raises(policy.Violation):
        flt.write(b"\x01" + key(1, 0x61) + struct.pack("!BxxxI", 6, 1 << 30) + b"partial")
    assert sink.data == b"\x01" + key(1, 0x61) and stops == ["client-message-too-big"]


def expected_keys(*steps):
    """("x",) a plain key; ("X", shift) inside Shift."""
    out = b""
    for keysym, shifted in steps:
        pair = key(1, keysym) + key(0, keysym)
        out += key(1, 0xFFE1) + pair + key(0, 0xFFE1) if shifted else pair
    return out


def test_paste_becomes_keystrokes():
    flt, sink, inputs, _ = make_filter(paste_as_keys=True)
    flt.write(b"\x01" + key(1, 0x7A) + cut_text(b"aB1 !\r\n\t\x01\xe9\xc9") + key(0, 0x7A))
    assert sink.data == (b"\x01" + key(1, 0x7A) + expected_keys(
        (0x61, False), (0x42, True), (0x31, False), (0x20, False), (0x21, True), (0xFF0D, False),
        (0xFF09, False), (0xE9, False), (0xC9, True)) + key(0, 0x7A))
    assert len(inputs) == 2 + 9


def test_a_paste_over_the_limit_is_not_typed_at_all():
    flt, sink, _, stops = make_filter(paste_as_keys=True, paste_max_chars=5)
    flt.write(b"\x01" + cut_text(b"rm -rf /tmp/x\n") + cut_text(b"ok"))
    assert sink.data == b"\x01" + expected_keys((0x6F, False), (0x6B, False)) and not stops


def test_paste_is_paced():
    sink, pauses = Recorder(), []
    flt = policy.Filter(sink, Policy(paste_as_keys=True), 4096, lambda: None, lambda reason, detail: None,
                        pause=pauses.append)
    flt.write(b"\x01" + cut_text(b"abc"))
    assert pauses == [1 / policy.PASTE_CHARS_PER_SECOND] * 3


# -- fuzz: no input crashes the parser or the filter, or makes them hold more than they should --

@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=20),
       st.sampled_from([{"view_only": True}, {"paste_as_keys": True}, {"input_idle": 1.0}]))
def test_fuzz_the_filter(chunks, fields):
    flt, sink, _, stops = make_filter(**fields)
    try:
        for chunk in chunks:
            flt.write(chunk)
    except policy.Violation:
        assert len(stops) == 1 and stops[0] in ("client-bad-message", "client-message-too-big")
    assert len(flt.parser.buffer) <= sum(map(len, chunks))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.sampled_from(MESSAGES), max_size=12), st.data())
def test_fuzz_valid_streams_split_anywhere_come_out_whole(messages, data):
    stream = b"\x01" + b"".join(messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    parsed, parser = parse_all(stream, splits=cuts)
    assert parsed == [b"\x01", *messages] and not parser.buffer


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_the_parser_returns_messages_or_malformed(data):
    parser = Parser()
    out = []
    try:
        out = list(parser.feed(data))
    except Malformed:
        return
    assert b"".join(out) + bytes(parser.buffer) == data


# -- the policy's text, the idle watch ----------------------------------------------------------

def test_policy_json_round_trip():
    assert Policy().to_json() == "" and Policy.from_json("") == Policy()
    chosen = Policy(view_only=True, single_use=True, paste_as_keys=True, input_idle=90)
    assert Policy.from_json(chosen.to_json()) == chosen
    assert chosen.describe() == "view-only,single-use,paste-as-keys,input-idle=90"


class Settings:
    resume_grace, paste_max_chars, input_idle_timeout = 30.0, 4096, 0.0


def test_only_single_use_does_not_read_the_stream():
    assert not Policy(single_use=True).reads_stream(Settings)
    assert Policy(view_only=True).reads_stream(Settings) and Policy(input_idle=3).reads_stream(Settings)
    gateway_wide = Settings()
    gateway_wide.input_idle_timeout = 60.0
    assert Policy().reads_stream(gateway_wide) and Policy(input_idle=5).input_idle_limit(gateway_wide) == 5


def test_input_idle_watch_stops_once_after_the_limit_and_touch_postpones_it():
    stopped = []
    watch = policy.InputIdleWatch(0.3, stopped.append)
    watch.start()
    begun = time.monotonic()
    time.sleep(0.2)
    watch.touch()
    touched = time.monotonic()
    deadline = time.monotonic() + 5
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.01)
    ended = time.monotonic()
    assert stopped == ["input-idle"] and ended - touched >= 0.29 and ended - begun < 2
    watch.cancel()


def test_a_cancelled_watch_never_stops_its_session():
    stopped = []
    watch = policy.InputIdleWatch(0.2, stopped.append)
    watch.start()
    watch.cancel()
    assert not watch._thread.is_alive() and threading.active_count() >= 1 and stopped == []


# -- the store: single use --------------------------------------------------------------------

def mint(store, **fields):
    token = store.add_connection_details("vm", store_module.WEBSOCKET, "127.0.0.1", 5900,
                                         policy=Policy(single_use=True).to_json(), **fields)
    return store_module.hash_token(token)


def use(store, token_hash, session_id, address, cookie_hash=None, grace=30, issued_hash=None):
    """What the gateway does for a session of a single-use token: take its share, then consume."""
    assert store.take_share(token_hash, session_id, 10, 60) == (True, store.token_usage(token_hash)[0] - 1)
    try:
        return store.consume(token_hash, address, cookie_hash, grace, issued_hash, session_id)
    except store_module.TokenRejected:
        store.release_shares({session_id: token_hash}, ended=False)
        raise


def test_single_use_consumed_resumed_within_grace_refused_after(store, clock):
    token_hash = mint(store)
    assert use(store, token_hash, "s1", "10.0.0.1") == "consumed"
    with pytest.raises(store_module.TokenRejected) as refused:
        use(store, token_hash, "s2", "10.0.0.2")
    assert refused.value.reason == "refused-consumed"
    assert use(store, token_hash, "s3", "10.0.0.1") == "resumed"  # a session still live
    store.release_shares({"s1": token_hash, "s3": token_hash})
    clock.advance(30)
    assert use(store, token_hash, "s4", "10.0.0.1") == "resumed"
    store.release_shares({"s4": token_hash})
    clock.advance(30.5)
    with pytest.raises(store_module.TokenRejected):
        use(store, token_hash, "s5", "10.0.0.1")
    assert store.token_usage(token_hash) == (0, 0)


def test_single_use_grace_starts_when_the_last_live_session_ends(store, clock):
    """Issue 24 item 7(b): two live sessions of the consumer, one ends: the grace has not
    started, so a reconnect long after resume_grace is admitted while the other is live."""
    token_hash = mint(store)
    assert use(store, token_hash, "s1", "10.0.0.1") == "consumed"
    assert use(store, token_hash, "s2", "10.0.0.1") == "resumed"
    store.release_shares({"s1": token_hash})
    clock.advance(45)
    store.renew_shares({"s2": token_hash}, 60)
    assert use(store, token_hash, "s3", "10.0.0.1") == "resumed"
    store.release_shares({"s2": token_hash, "s3": token_hash})
    clock.advance(31)
    with pytest.raises(store_module.TokenRejected):
        use(store, token_hash, "s4", "10.0.0.1")


def test_a_refused_stranger_does_not_restart_the_grace(store, clock):
    token_hash = mint(store)
    assert use(store, token_hash, "s1", "10.0.0.1") == "consumed"
    store.release_shares({"s1": token_hash})
    for _ in range(4):
        clock.advance(10)
        with pytest.raises(store_module.TokenRejected):
            use(store, token_hash, "x", "10.6.6.6")
    with pytest.raises(store_module.TokenRejected):
        use(store, token_hash, "s2", "10.0.0.1")  # 40 s after the end: past the 30 s grace


def test_the_grace_of_sessions_whose_gateway_died_starts_when_their_shares_lapse(store, clock):
    token_hash = mint(store)
    assert use(store, token_hash, "s1", "10.0.0.1") == "consumed"  # its share lapses at 60 s
    clock.advance(80)  # never released nor renewed: the gateway was killed
    assert use(store, token_hash, "s2", "10.0.0.1") == "resumed"  # 20 s after the lapse
    store.release_shares({"s2": token_hash})
    clock.advance(31)
    with pytest.raises(store_module.TokenRejected):
        use(store, token_hash, "s3", "10.0.0.1")


def test_single_use_resumes_by_cookie_from_another_address(store, clock):
    token_hash = mint(store)
    assert use(store, token_hash, "s1", "10.0.0.1", "planted", issued_hash="cookie-hash") == "consumed"
    store.release_shares({"s1": token_hash})
    clock.advance(5)
    # A cookie the consumer presented (planted in its browser, say) is never recorded: only the
    # one the gateway issued lets another address in.
    with pytest.raises(store_module.TokenRejected):
        use(store, token_hash, "s2", "10.9.9.7", "planted")
    assert use(store, token_hash, "s3", "10.9.9.9", "cookie-hash", issued_hash="next") == "resumed"
    with pytest.raises(store_module.TokenRejected):
        use(store, token_hash, "s4", "10.9.9.8", "another")
    # Every use issues a new cookie: the one before it no longer opens anything.
    with pytest.raises(store_module.TokenRejected):
        use(store, token_hash, "s5", "10.9.9.8", "cookie-hash")
    assert use(store, token_hash, "s6", "10.9.9.8", "next") == "resumed"


def test_the_store_keeps_one_shared_secret_per_name(store):
    secret = store.shared_secret("resume-cookie")
    assert len(secret) == 64 and store.shared_secret("resume-cookie") == secret
    assert store.shared_secret("another") != secret


def test_the_policy_is_kept_with_the_token(store):
    token = store.add_connection_details("vm", store_module.XVP, "h", 1, policy=Policy(view_only=True).to_json())
    assert Policy.from_json(store.validate(token, store_module.XVP).policy) == Policy(view_only=True)
    plain = store.add_connection_details("vm", store_module.XVP, "h", 1)
    assert store.get_connection_details(plain).policy == ""


# -- the gateway's handshake with a console for a policy token: security type None ---------------

def none_server(banner, types):
    """An RFB server offering types; records what the client chose and its ClientInit."""
    def behaviour(backend, sock):
        sock.sendall(banner)
        minor = int(harness.recv_exactly(sock, 12)[8:11])
        sock.sendall(struct.pack("!I", types[0]) if minor == 3 else bytes((len(types), *types)))
        if minor != 3:
            backend.received.append(harness.recv_exactly(sock, 1))
        if minor == 8:
            sock.sendall(bytes(4))  # SecurityResult: 3.8 only, for type None
        backend.received.append(harness.recv_exactly(sock, 1))  # ClientInit
    return behaviour


@pytest.mark.parametrize("banner, types, choice", [
    (rfb.RFB_3_8, (2, 1), [b"\x01"]), (rfb.RFB_3_7, (1,), [b"\x01"]), (rfb.RFB_3_3, (1,), [])])
def test_without_a_password_the_gateway_chooses_security_none(banner, types, choice):
    backend = harness.FakeBackend(none_server(banner, types))
    try:
        with socket.create_connection(("127.0.0.1", backend.port)) as sock:
            assert rfb.authenticate_backend(sock, None, time.monotonic() + 5) == banner
            sock.sendall(b"\x01")  # the stream continues at ClientInit, nothing was held back
            harness.wait_for(lambda: backend.received == [*choice, b"\x01"], message="ClientInit")
    finally:
        backend.stop()


@pytest.mark.parametrize("banner", [rfb.RFB_3_8, rfb.RFB_3_3])
def test_a_console_that_wants_a_password_the_gateway_lacks(banner):
    backend = harness.FakeBackend(none_server(banner, (2,)))
    try:
        with socket.create_connection(("127.0.0.1", backend.port)) as sock:
            with pytest.raises(rfb.RfbError) as error:
                rfb.authenticate_backend(sock, None, time.monotonic() + 5)
        assert error.value.reason == "backend-needs-password" and "backend-needs-password" in refusals.REASONS
    finally:
        backend.stop()


# -- fuzz through a real relay: whatever the client sends, the session ends or relays, never hangs ---

def tcp_pair():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


@settings(max_examples=40, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=200), max_size=6), st.booleans())
def test_fuzz_a_policy_relay_ends_cleanly(chunks, view_only):
    from vncgate.console import relay
    client_app, client_side = tcp_pair()
    backend_side, backend_app = tcp_pair()
    holder = {}

    def stop(reason, detail):
        holder["relay"].stop(reason)
    def with_filter(sink):
        return policy.Filter(sink, Policy(view_only=view_only, input_idle=60), 4096, lambda: None, stop)
    holder["relay"] = relayed = relay.Relay.raw(client_side, backend_side, upstream_sink=with_filter)
    runner = threading.Thread(target=relayed.run)
    runner.start()
    try:
        for chunk in chunks:
            client_app.sendall(chunk)
        client_app.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the gateway ended the session already
    backend_app.settimeout(10)
    got = b""
    while True:
        data = backend_app.recv(65536)
        if not data:
            break
        got += data
    backend_app.close()
    runner.join(10)
    assert not runner.is_alive(), "the relay hung"
    assert relayed.end_reason in ("client-closed", "backend-closed", "client-bad-message", "client-message-too-big")
    # What reached the console is whole messages of what was sent, as the parser splits them.
    expected = []
    try:
        for message in Parser().feed(b"".join(chunks)):
            expected.append(message)
    except Malformed:
        pass
    if view_only:
        assert got[:1] in (b"", b"\x01") and len(got) <= len(b"".join(expected))
    else:
        assert b"".join(expected).startswith(got)
        assert relayed.end_reason != "client-closed" or got == b"".join(expected)
    client_app.close()
