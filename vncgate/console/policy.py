"""Console policies: the client-to-server RFB stream read message by message, and the filters.

A token may carry a policy (view-only, single use, paste as keystrokes, an input idle
limit). All but single use need the gateway to read what the client sends after the
RFB handshake, so for those tokens the gateway does the security handshake itself
(rfb.authenticate_backend with type None when it holds no password) and the client's
bytes that follow start at ClientInit. From there every client-to-server message has a
fixed size, or a size its header states (SetEncodings, ClientCutText, and the few
extensions real clients send), so a small strict parser suffices: a message is
passed on, changed or dropped only when it is complete, and a message the parser does
not know, or one larger than any client needs, ends the session. The server-to-client
stream is never read.

A serial console's bytes are not RFB: there every byte a viewer sends is input, and view-only
drops them all (StreamFilter), so that each policy means the same on every console type.
Single use (the store's consume and the resume cookie) is in resume.py.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import struct
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Callable

from vncgate.store.common import SERIAL

if TYPE_CHECKING:
    from vncgate.config import Config
    from vncgate.console.streams import Chunk, Sink

log = logging.getLogger("vncgate.console.policy")

# Client-to-server message types (RFC 6143 section 7.5, and the extensions noVNC,
# TigerVNC and qemu's clients send: section 7.7 of the community RFB specification).
SET_PIXEL_FORMAT, SET_ENCODINGS, FRAMEBUFFER_UPDATE_REQUEST = 0, 2, 3
KEY_EVENT, POINTER_EVENT, CLIENT_CUT_TEXT = 4, 5, 6
ENABLE_CONTINUOUS_UPDATES, CLIENT_FENCE, XVP, SET_DESKTOP_SIZE, QEMU = 150, 248, 250, 251, 255
QEMU_EXTENDED_KEY_EVENT, QEMU_AUDIO = 0, 1
_FIXED = {SET_PIXEL_FORMAT: 20, FRAMEBUFFER_UPDATE_REQUEST: 10, KEY_EVENT: 8, POINTER_EVENT: 6,
          ENABLE_CONTINUOUS_UPDATES: 10, XVP: 4}
EXTENDED_CLIPBOARD = -1063131698  # the pseudo-encoding 0xC0A1E5CE, as SetEncodings' s32

MAX_ENCODINGS = 1024          # real clients ask for 20 to 40
MAX_CUT_TEXT = 1 << 20        # qemu's own limit: it drops a client that sends more
MAX_FENCE_PAYLOAD = 64        # the fence extension's own limit
MAX_SCREENS = 255             # SetDesktopSize's count is one byte

_U16, _S32, _U32 = struct.Struct("!H"), struct.Struct("!i"), struct.Struct("!I")
_KEY = struct.Struct("!BBxxI")

# X11 keysyms (keysymdef.h): Latin-1 characters are their own keysyms.
RETURN, TAB, SHIFT_L = 0xFF0D, 0xFF09, 0xFFE1
# What a US keyboard types with Shift held; with the Latin-1 capitals (not the times sign).
_SHIFTED = set('~!@#$%^&*()_+{}|:"<>?ABCDEFGHIJKLMNOPQRSTUVWXYZ') | {
    chr(code) for code in range(0xC0, 0xDF) if code != 0xD7}
PASTE_CHARS_PER_SECOND = 50  # BIOS screens and installers drop keys that come faster
MIN_INPUT_IDLE, MAX_SECONDS = 0.1, 10 * 365 * 86400


class Malformed(Exception):
    """The client sent what no RFB client sends; .reason is the session's audit word
    (client-bad-message, client-message-too-big), .detail says what."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Violation(ConnectionError):
    """Raised out of a Filter's write after it asked the session to stop: the direction ends."""


# -- the policy a token carries ------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Policy:
    view_only: bool = False
    single_use: bool = False
    paste_as_keys: bool = False
    input_idle: float = 0.0  # seconds; 0: the gateway's input_idle_timeout

    def to_json(self) -> str:
        """The store's text: only what differs from no policy ("" for none at all)."""
        fields = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                  if getattr(self, field.name) != field.default}
        return json.dumps(fields, sort_keys=True) if fields else ""

    @classmethod
    def from_json(cls, text: str) -> Policy:
        if not text:
            return cls()
        fields = json.loads(text)
        known = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: value for name, value in fields.items() if name in known})

    def problem(self, console_type: str) -> str:
        """Why this policy cannot go with a console of console_type, or "" when it can: the one
        rule the CLI and the API share. Every policy holds for every type, but paste-as-keys,
        which types RFB key events (a serial console takes pasted text as it is)."""
        if self.paste_as_keys and console_type == SERIAL:
            return "paste-as-keys types RFB key events: a serial console takes pasted text as it is"
        if self.input_idle and not MIN_INPUT_IDLE <= self.input_idle <= MAX_SECONDS:
            return f"input idle must be from {MIN_INPUT_IDLE:g} to {MAX_SECONDS} seconds"
        return ""

    def input_idle_limit(self, settings: Config) -> float:
        """Seconds without input that end a session: the token's own, else the gateway's; 0: none."""
        return self.input_idle or settings.input_idle_timeout

    def reads_stream(self, settings: Config) -> bool:
        """Whether the gateway must read the client's stream: single use alone does not."""
        return self.view_only or self.paste_as_keys or self.input_idle_limit(settings) > 0

    def describe(self) -> str:
        """The audit line's words for the policy, e.g. "view-only,input-idle=60"."""
        words = [name for name, on in (("view-only", self.view_only), ("single-use", self.single_use),
                                       ("paste-as-keys", self.paste_as_keys)) if on]
        if self.input_idle:
            words.append(f"input-idle={self.input_idle:g}")
        return ",".join(words)


# -- the parser ----------------------------------------------------------------------------

class Parser:
    """Splits the client's bytes, from ClientInit on, into whole messages; sans-IO.

    feed(data) yields each complete message as bytes (the first is the one-byte
    ClientInit) and keeps an incomplete tail for the next call. It raises Malformed as
    soon as a header shows a message is unknown or too large, so it never holds more
    than one largest message and one read. extended_clipboard says whether the client
    announced the extended clipboard (set by the caller, who may hide the announcement):
    only then may a ClientCutText have a negative length."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.initialised = False
        self.extended_clipboard = False

    def feed(self, data: Chunk) -> Iterator[bytes]:
        self.buffer += data
        start = 0
        try:
            while True:
                size = self._size(start)
                if size is None:
                    return
                message = bytes(self.buffer[start:start + size])
                start += size
                self.initialised = True
                yield message
        finally:
            del self.buffer[:start]

    def _size(self, start: int) -> int | None:
        """The size of the message at start, or None until enough of its header is here."""
        have = len(self.buffer) - start
        if not have:
            return None
        if not self.initialised:
            return 1  # ClientInit: the shared flag
        kind = self.buffer[start]
        if kind in _FIXED:
            size: int | None = _FIXED[kind]
        elif kind == SET_ENCODINGS:
            size = self._counted(start, have, 4, 2, _U16, 4, MAX_ENCODINGS, "SetEncodings")
        elif kind == CLIENT_CUT_TEXT:
            size = self._cut_text(start, have)
        elif kind == CLIENT_FENCE:
            size = self._counted(start, have, 9, 8, None, 1, MAX_FENCE_PAYLOAD, "ClientFence")
        elif kind == SET_DESKTOP_SIZE:
            size = self._counted(start, have, 8, 6, None, 16, MAX_SCREENS, "SetDesktopSize")
        elif kind == QEMU:
            size = self._qemu(start, have)
        else:
            raise Malformed("client-bad-message", f"unknown client message type {kind}")
        return size if size is not None and have >= size else None

    def _counted(self, start: int, have: int, header: int, at: int, field: struct.Struct | None, each: int,
                 limit: int, name: str) -> int | None:
        """header bytes, then a count (a u16 via field, else a byte) at offset at of items of each bytes."""
        if have < header:
            return None
        count = field.unpack_from(self.buffer, start + at)[0] if field else self.buffer[start + at]
        if count > limit:
            raise Malformed("client-message-too-big", f"{name} with {count} items (at most {limit})")
        return header + each * count

    def _cut_text(self, start: int, have: int) -> int | None:
        if have < 8:
            return None
        length = _S32.unpack_from(self.buffer, start + 4)[0]
        if length < 0:  # the extended clipboard: flags and data, abs(length) bytes
            if not self.extended_clipboard:
                raise Malformed("client-bad-message", "extended ClientCutText, but the extended clipboard "
                                                      "was not announced")
            length = -length
            if length < 4:
                raise Malformed("client-bad-message", f"extended ClientCutText of {length} bytes, "
                                                      "shorter than its flags")
        if length > MAX_CUT_TEXT:
            raise Malformed("client-message-too-big", f"ClientCutText of {length} bytes (at most {MAX_CUT_TEXT})")
        return 8 + length

    def _qemu(self, start: int, have: int) -> int | None:
        if have < 2:
            return None
        subtype = self.buffer[start + 1]
        if subtype == QEMU_EXTENDED_KEY_EVENT:
            return 12
        if subtype == QEMU_AUDIO:
            if have < 4:
                return None
            operation = _U16.unpack_from(self.buffer, start + 2)[0]
            if operation in (0, 1):  # enable, disable
                return 4
            if operation == 2:  # set format: sample format, channels, frequency
                return 10
            raise Malformed("client-bad-message", f"unknown qemu audio operation {operation}")
        raise Malformed("client-bad-message", f"unknown qemu client message subtype {subtype}")


# -- the filter ----------------------------------------------------------------------------

def keystrokes(text: str) -> Iterator[bytes]:
    """The KeyEvent messages that type text (Latin-1): a press and a release per character,
    inside Shift where a US keyboard needs it; a newline (\\n, \\r\\n or \\r) is Return, a tab
    Tab. Other control characters are skipped. Yields one bytes per character."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    for char in text:
        if char == "\n":
            keysym = RETURN
        elif char == "\t":
            keysym = TAB
        elif " " <= char <= "~" or "\xa0" <= char <= "\xff":
            keysym = ord(char)
        else:
            continue
        events = [_KEY.pack(KEY_EVENT, 1, keysym), _KEY.pack(KEY_EVENT, 0, keysym)]
        if char in _SHIFTED:
            events = [_KEY.pack(KEY_EVENT, 1, SHIFT_L), *events, _KEY.pack(KEY_EVENT, 0, SHIFT_L)]
        yield b"".join(events)


class Filter:
    """A relay Sink for the client's bytes that enforces a policy, in front of the backend's Sink.

    Only whole messages reach the backend. View-only drops key events, button presses
    (motion passes, with no buttons), clipboard text, desktop resizes and XVP power
    operations, and makes ClientInit ask for a shared session. Paste-as-keys types a
    clipboard text as key events instead of passing it. on_input() is called for every
    key event and pointer change the client sends (dropped or not: the user is there) and for
    every character typed. A malformed message calls on_violation(reason, detail) and ends
    the direction (Violation); the messages before it were passed on. A PointerEvent that
    repeats the last one (same buttons, same place) is no input: it changes nothing, so a client
    cannot keep an idle session open by sending it again and again.
    """

    def __init__(self, sink: Sink, policy: Policy, paste_max_chars: int, on_input: Callable[[], None],
                 on_violation: Callable[[str, str], None], pause: Callable[[float], None] = time.sleep) -> None:
        self.sink = sink
        self.close_write = sink.close_write
        self.policy = policy
        self.paste_max_chars = paste_max_chars
        self.on_input = on_input
        self.on_violation = on_violation
        self.pause = pause
        self.parser = Parser()
        self.greeted = False
        self.pointer: bytes | None = None  # the last PointerEvent's buttons and position: a repeat is no input

    def write(self, chunk: Chunk) -> None:
        out = bytearray()
        try:
            for message in self.parser.feed(chunk):
                out += self._judge(message, out)
        except Malformed as error:
            if out:
                self.sink.write(out)
            self.on_violation(error.reason, error.detail)
            raise Violation(error.reason) from None
        if out:
            self.sink.write(out)

    def _judge(self, message: bytes, pending: bytearray) -> bytes:
        """The bytes that go on for message (itself, changed, or nothing)."""
        if not self.greeted:  # ClientInit
            self.greeted = True
            return b"\x01" if self.policy.view_only else message
        kind = message[0]
        if kind in (KEY_EVENT, POINTER_EVENT) or (kind == QEMU and message[1] == QEMU_EXTENDED_KEY_EVENT):
            if kind != POINTER_EVENT or message[1:] != self.pointer:
                self.on_input()
            if kind == POINTER_EVENT:
                self.pointer = message[1:]
            if not self.policy.view_only:
                return message
            return message[:1] + b"\0" + message[2:] if kind == POINTER_EVENT else b""
        if kind == SET_ENCODINGS:
            return self._encodings(message)
        if kind == CLIENT_CUT_TEXT:
            if self.policy.view_only:
                return b""
            if self.policy.paste_as_keys:
                self._type(message[8:].decode("latin-1"), pending)
                return b""
            return message
        if kind in (SET_DESKTOP_SIZE, XVP) and self.policy.view_only:
            return b""
        return message

    def _encodings(self, message: bytes) -> bytes:
        """Hide the extended clipboard from the server where the client's clipboard is dropped
        or typed, so that the client keeps to plain ClientCutText; note it where it passes."""
        count = _U16.unpack_from(message, 2)[0]
        encodings = struct.unpack_from(f"!{count}i", message, 4)
        if self.policy.view_only or self.policy.paste_as_keys:
            kept = [encoding for encoding in encodings if encoding != EXTENDED_CLIPBOARD]
            if len(kept) != count:
                return struct.pack(f"!BxH{len(kept)}i", SET_ENCODINGS, len(kept), *kept)
        else:
            self.parser.extended_clipboard = EXTENDED_CLIPBOARD in encodings
        return message

    def _type(self, text: str, pending: bytearray) -> None:
        """Type text now, after the messages that came before it, at a pace consoles keep up with."""
        if len(text) > self.paste_max_chars:
            # Typing part of it could run part of a command: nothing is typed.
            log.info("paste of %d characters not typed (paste_max_chars %d)", len(text), self.paste_max_chars)
            return
        if pending:
            self.sink.write(bytes(pending))
            pending.clear()
        for strokes in keystrokes(text):
            self.sink.write(strokes)
            self.on_input()
            self.pause(1 / PASTE_CHARS_PER_SECOND)


class StreamFilter:
    """The policy of a console whose bytes are not RFB (serial): every byte the viewer sends is
    input, and a view-only viewer's bytes are dropped, all of them."""

    def __init__(self, sink: Sink, policy: Policy, on_input: Callable[[], None]) -> None:
        self.sink = sink
        self.close_write = sink.close_write
        self.view_only = policy.view_only
        self.on_input = on_input

    def write(self, chunk: Chunk) -> None:
        if chunk:
            self.on_input()
            if not self.view_only:
                self.sink.write(chunk)


class InputIdleWatch:
    """Ends a session (stop("input-idle")) once no input came for limit seconds. touch() on input.

    One thread per watched session, waiting on an Event until the earliest moment the
    limit can be reached, so the session ends within moments of it; cancel() stops it."""

    def __init__(self, limit: float, stop: Callable[[str], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.stop = stop
        self.clock = clock
        self.last_input = clock()
        self._cancelled = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="input-idle", daemon=True)

    def touch(self) -> None:
        self.last_input = self.clock()

    def start(self) -> None:
        self.last_input = self.clock()
        self._thread.start()

    def _watch(self) -> None:
        while not self._cancelled.wait(max(0.0, self.last_input + self.limit - self.clock())):
            if self.clock() - self.last_input >= self.limit:
                self.stop("input-idle")
                return

    def cancel(self) -> None:
        self._cancelled.set()
        if self._thread.is_alive():
            self._thread.join()


class Enforcement:
    """A session's policy at work: the Filter (StreamFilter) for its client's bytes and its input
    idle watch."""

    def __init__(self, policy: Policy, settings: Config, stop: Callable[[str], None], stream: bool = False) -> None:
        """stream: the console's bytes are not RFB (serial): a StreamFilter enforces the policy."""
        self.policy = policy
        self.stream = stream
        self.paste_max_chars = settings.paste_max_chars
        self.stop = stop
        self.violation: str | None = None  # what the parser refused, for the session's audit line
        limit = policy.input_idle_limit(settings)
        self.watch = InputIdleWatch(limit, stop) if limit else None

    def filter(self, sink: Sink) -> Sink:
        on_input = self.watch.touch if self.watch else _nothing
        if self.stream:
            return StreamFilter(sink, self.policy, on_input)
        return Filter(sink, self.policy, self.paste_max_chars, on_input, self._violated)

    def _violated(self, reason: str, detail: str) -> None:
        self.violation = detail
        self.stop(reason)

    def start(self) -> None:
        if self.watch:
            self.watch.start()

    def cancel(self) -> None:
        if self.watch:
            self.watch.cancel()


def _nothing() -> None:
    pass
