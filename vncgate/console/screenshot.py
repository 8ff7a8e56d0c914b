"""Screenshots of consoles: the gateway as a short RFB client of its own.

For one picture the gateway opens the console as it does for a session (backends.py:
TCP, a XenServer CONNECT), does the security handshake it does for a held password
(rfb.secure: None, VNC Authentication, VeNCrypt), then ClientInit with the shared flag
set (so nobody is disconnected: qemu drops the other clients of a non-shared one),
SetPixelFormat (32 bits per pixel, true colour, little-endian: the bytes of a pixel
are blue, green, red, unused), SetEncodings (Raw, CopyRect and the DesktopSize
pseudo-encoding), one non-incremental FramebufferUpdateRequest, and reads one full
FramebufferUpdate (another after a DesktopSize), which png.py encodes.

Bounded: a console announcing more than max_pixels is refused before any buffer is
made, every read and write ends by one deadline for the whole screenshot, and a
gateway-wide cap on screenshots in flight (Screenshots) keeps a page left open on
many consoles from loading them all at once.

Framebuffer is sans-IO: it is handed a BackendIO (read_exact, read_into) and never
touches a socket itself, so its tests feed it bytes.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from vncgate import store as store_module
from vncgate.console import backends, png, rfb
from vncgate.console.allow import BackendAllow
from vncgate.refusals import Refused
from vncgate.store import sealing
from vncgate.store.common import ConnectionDetails

if TYPE_CHECKING:
    from vncgate.audit import Audit

RAW, COPYRECT, DESKTOP_SIZE = 0, 1, -223
ENCODINGS = (RAW, COPYRECT, DESKTOP_SIZE)
# SetPixelFormat's body: 32 bpp, depth 24, little-endian, true colour, 8 bits each, red at 16.
PIXEL_FORMAT = struct.pack("!BBBBHHHBBB3x", 32, 24, 0, 1, 255, 255, 255, 16, 8, 0)
BYTES_PER_PIXEL = 4
MAX_NAME = 64 * 1024  # a desktop name longer than this is not a console's
MAX_CUT_TEXT = 1024 * 1024  # clipboard text a console sends meanwhile is skipped, up to this
MAX_UPDATES = 4  # FramebufferUpdates read for one picture (each DesktopSize asks for another)
_SERVER_INIT = struct.Struct("!HH16sI")
_RECT = struct.Struct("!HHHHi")


def client_messages(width: int, height: int) -> bytes:
    """SetPixelFormat, SetEncodings and a non-incremental FramebufferUpdateRequest of width x height."""
    return (b"\0\0\0\0" + PIXEL_FORMAT
            + struct.pack("!BBH", 2, 0, len(ENCODINGS)) + struct.pack(f"!{len(ENCODINGS)}i", *ENCODINGS)
            + update_request(width, height))


def update_request(width: int, height: int) -> bytes:
    return struct.pack("!BBHHHH", 3, 0, 0, 0, width, height)


class Framebuffer:
    """The console's screen as the gateway reads it, in the pixel format it asked for."""

    def __init__(self, max_pixels: int) -> None:
        self.max_pixels = max_pixels
        self.width = self.height = 0
        self.pixels = bytearray()
        self.name = b""

    def resize(self, width: int, height: int) -> None:
        """A new size (ServerInit, DesktopSize); refused before any buffer is made when too large."""
        if width * height > self.max_pixels:
            raise rfb.RfbError("screenshot-too-large", f"the console is {width}x{height}, over "
                                                       f"screenshot_max_pixels ({self.max_pixels})")
        if not width or not height:
            raise rfb.RfbError("backend-bad-update", f"the console announces an empty screen ({width}x{height})")
        self.width, self.height = width, height
        self.pixels = bytearray(width * height * BYTES_PER_PIXEL)

    def server_init(self, io: rfb.BackendIO) -> None:
        width, height, _format, name_length = _SERVER_INIT.unpack(io.read_exact(_SERVER_INIT.size))
        if name_length > MAX_NAME:
            raise rfb.RfbError("backend-bad-rfb", f"a desktop name of {name_length} bytes")
        self.resize(width, height)
        self.name = io.read_exact(name_length)

    def next_update(self, io: rfb.BackendIO) -> bool:
        """Read server messages up to and through one FramebufferUpdate, painting it; True when
        it changed the screen's size (the caller asks for the whole screen again)."""
        while True:
            kind = io.read_exact(1)[0]
            if kind == 0:
                return self._update(io)
            if kind == 1:  # SetColourMapEntries: not for true colour, but harmless to skip
                _pad, _first, count = struct.unpack("!BHH", io.read_exact(5))
                io.read_exact(6 * count)
            elif kind == 2:  # Bell
                continue
            elif kind == 3:  # ServerCutText
                length = struct.unpack("!3xI", io.read_exact(7))[0]
                if length > MAX_CUT_TEXT:
                    raise rfb.RfbError("backend-bad-update", f"{length} bytes of clipboard text")
                io.read_exact(length)
            else:
                raise rfb.RfbError("backend-bad-update", f"server message type {kind}, which RFB 3.8 has not")

    def _update(self, io: rfb.BackendIO) -> bool:
        count = struct.unpack("!xH", io.read_exact(3))[0]
        resized = False
        for _ in range(count):
            x, y, width, height, encoding = _RECT.unpack(io.read_exact(_RECT.size))
            if encoding == DESKTOP_SIZE:
                if (width, height) != (self.width, self.height):  # the same size again changes nothing
                    self.resize(width, height)
                    resized = True
                continue
            if x + width > self.width or y + height > self.height:
                raise rfb.RfbError("backend-bad-update", f"a {width}x{height} rectangle at {x},{y} outside "
                                                         f"the {self.width}x{self.height} screen")
            if encoding == RAW:
                self._raw(io, x, y, width, height)
            elif encoding == COPYRECT:
                source_x, source_y = struct.unpack("!HH", io.read_exact(4))
                self._copy(source_x, source_y, x, y, width, height)
            else:
                raise rfb.RfbError("backend-bad-update", f"encoding {encoding}, which the gateway did not ask for")
        return resized

    def _row(self, x: int, y: int, width: int) -> slice:
        start = (y * self.width + x) * BYTES_PER_PIXEL
        return slice(start, start + width * BYTES_PER_PIXEL)

    def _raw(self, io: rfb.BackendIO, x: int, y: int, width: int, height: int) -> None:
        view = memoryview(self.pixels)
        if x == 0 and width == self.width:  # whole rows: one read straight into the buffer
            io.read_into(view[self._row(0, y, width * height)])
            return
        for row in range(y, y + height):
            io.read_into(view[self._row(x, row, width)])

    def _copy(self, source_x: int, source_y: int, x: int, y: int, width: int, height: int) -> None:
        if source_x + width > self.width or source_y + height > self.height:
            raise rfb.RfbError("backend-bad-update", f"a CopyRect from {source_x},{source_y} outside the screen")
        rows = [bytes(self.pixels[self._row(source_x, source_y + row, width)]) for row in range(height)]
        for row, data in enumerate(rows):  # copied out first: source and destination may overlap
            self.pixels[self._row(x, y + row, width)] = data

    def rgb(self) -> bytearray:
        """The screen as 8-bit RGB triples, row by row (the pixels are let go: one copy at a time)."""
        out = bytearray(self.width * self.height * 3)
        for channel, source in enumerate((2, 1, 0)):
            out[channel::3] = self.pixels[source::4]
        self.pixels = bytearray()
        return out


def read_screen(io: rfb.BackendIO, max_pixels: int) -> Framebuffer:
    """After the security handshake: ClientInit (shared) to one full FramebufferUpdate."""
    io.write(b"\x01")
    screen = Framebuffer(max_pixels)
    screen.server_init(io)
    io.write(client_messages(screen.width, screen.height))
    for _ in range(MAX_UPDATES):
        if not screen.next_update(io):
            return screen
        io.write(update_request(screen.width, screen.height))
    raise rfb.RfbError("backend-bad-update", f"the screen's size changed {MAX_UPDATES} times in one screenshot")


Shot = collections.namedtuple("Shot", "png width height console_width console_height")


def capture(details: ConnectionDetails, timeout: float, max_pixels: int, allow: BackendAllow,
            context: ssl.SSLContext | None = None, max_width: int | None = None) -> Shot:
    """One screenshot of the console of details (a token's ConnectionDetails, with its
    backend_password when the gateway holds it open), all of it by timeout seconds. allow:
    where the gateway may connect (backend_allow), as for sessions; context: the ssl context
    for a backend_tls console. Raises Refused with a backend-… or screenshot-… reason."""
    deadline = time.monotonic() + timeout
    sock, leftover = backends.open_backend(details, timeout, allow=allow)
    try:
        try:
            _version, sock = rfb.secure(sock, details.backend_password, deadline, leftover,
                                        context if details.backend_tls else None, details.host)
            screen = read_screen(rfb.BackendIO(sock, deadline, stage="screenshot"), max_pixels)
        except OSError as error:
            raise rfb.RfbError("backend-closed", f"the VNC server's connection failed: {error}") from None
    except rfb.RfbError as error:
        raise Refused(error.reason, error.detail) from None
    finally:
        sock.close()
    width, height, rgb = png.shrink(screen.width, screen.height, screen.rgb(), max_width)  # the pixels let go
    return Shot(png.encode(width, height, rgb), width, height, screen.width, screen.height)


def openable(row: ConnectionDetails, live: list, store: Any = None, held_key: bytes | None = None) -> ConnectionDetails:
    """The details a screenshot of row's console is taken with: row itself, or, when the token
    holds a password, row with the password opened: by the gateways' own key (held_key, from
    screenshot_key_file) when it was sealed under it too, else from a live session of the
    token here (the password is sealed under the token, which the gateway holds only while a
    client of it is connected). Refused with screenshot-not-vnc (a serial console, a replay)
    or screenshot-needs-session."""
    if row.console_type == store_module.SERIAL or row.replay:
        raise Refused("screenshot-not-vnc", f"a {'replay' if row.replay else row.console_type} token")
    if not row.has_password:
        return row
    why = "the token holds a sealed password and no session of it is live here"
    if held_key is not None:
        try:
            return dataclasses.replace(row, backend_password=sealing.unseal_held(held_key, store.sealed_secret(
                row.token_hash) or b""))
        except sealing.SealError as error:
            why = f"{error}, and no session of the token is live here"
    for session in live:
        if session.details.token_hash == row.token_hash and session.details.backend_password is not None:
            return session.details
    raise Refused("screenshot-needs-session", why)


class Screenshots:
    """The gateway's screenshots: at most limit in flight (one more is refused with
    screenshot-busy, never queued), one audit line each (event "screenshot"), and counts by
    result for /metrics."""

    def __init__(self, audit: Audit, limit: int, timeout: float, max_pixels: int, allow: BackendAllow,
                 context: ssl.SSLContext | None = None, held_key: bytes | None = None) -> None:
        """allow: backend_allow (the sessions'); held_key: the gateways' own sealing key
        (screenshot_key_file), None when not set."""
        self.audit = audit
        self.held_key = held_key
        self.limit = limit
        self.timeout = timeout
        self.max_pixels = max_pixels
        self.context = context
        self.allow = allow
        self.results: collections.Counter = collections.Counter()  # result word -> screenshots
        self.in_flight = 0
        self._lock = threading.Lock()

    def take(self, details: ConnectionDetails, max_width: int | None = None, **fields: Any) -> Shot:
        """A screenshot of details' console, or Refused; audited with fields (client, key) and counted."""
        fields.update(instance_id=details.instance_id, token_id=details.token_id, console_type=details.console_type)
        started = time.monotonic()
        try:
            with self._slot():
                shot = capture(details, self.timeout, self.max_pixels, self.allow, self.context, max_width)
        except Refused as refusal:
            self._count(refusal.reason)
            self.audit.record("screenshot", **fields, result="rejected", **refusal.audit_fields(),
                              duration=round(time.monotonic() - started, 3))
            raise
        self._count("ok")
        self.audit.record("screenshot", **fields, result="ok", status=200, width=shot.console_width,
                          height=shot.console_height, bytes=len(shot.png), duration=round(time.monotonic() - started, 3))
        return shot

    @contextlib.contextmanager
    def _slot(self) -> Iterator[None]:
        with self._lock:
            if self.in_flight >= self.limit:
                raise Refused("screenshot-busy", f"{self.in_flight} screenshots in flight (screenshot_max_concurrent)")
            self.in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self.in_flight -= 1

    def _count(self, result: str) -> None:
        with self._lock:
            self.results[result] += 1

    def families(self) -> list:
        """The /metrics families of screenshots (web.py's shape)."""
        with self._lock:
            results, in_flight = dict(self.results), self.in_flight
        return [("vncgate_screenshots_total", "counter", "Console screenshots by result (ok or the refusal's reason).",
                 [({"result": result}, count) for result, count in sorted(results.items())]),
                ("vncgate_screenshots_in_flight", "gauge", "Console screenshots being taken now.",
                 [({}, in_flight)])]
