"""Writing sessions to files and playing them back to a browser, through the same gateway.

Files in record_dir, named by the session id S:
  S.fbs        the server-to-client stream in the FBS 001.000 format of rfbproxy and vncrec
               (read by TightVNC's player and vncproxy): "FBS 001.000\\n", then blocks of
               u32 length, the bytes padded to 4, u32 milliseconds since the recording began
               (all big-endian). Like rfbproxy's files it holds a stream an RFB 3.3 viewer can
               read from the start: "RFB 003.003\\n" and security type None, then the session's
               ServerInit and everything the server sent after it. The security handshake the
               session really had (its challenge, its password response) is never written.
  S.input      the client's messages from ClientInit on, in the same blocks and on the same
               clock, under the header "VGI 001.000\\n" (vncgate input): FBS has no direction,
               so a separate file keeps S.fbs readable by existing players.
  S.json       what `vncgate-token recordings` lists: session, instance, start, duration, bytes,
               and why recording stopped early, if it did. Written at the start, again at the end.
Neither file ever holds a token or a password: tokens never enter the RFB stream, and the
RFB security handshake comes before what is recorded.

A recorder sees each chunk before it is relayed (relay.TappedSource), or, on a spliced
session, has the server's chunks tee'd into a pipe it splices into S.fbs (relay.TeeDirection)
so they never enter Python. A write the file refuses (a full disk) ends the recording, not
the session. When the gateway did not do the RFB security itself, the recorder follows the
handshake in both directions to find ServerInit and ClientInit; a security type it cannot
follow (anything but None and VNC Authentication) ends the recording, not the session.

This module keeps the Recorder (and the Handshake it follows); Recordings (the record_dir:
starting recorders, its budget and pruning, listing, purging) is in recordings.py, the block
format in fbs.py, playing back in replay.py.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from typing import Any, Callable

from vncgate.console import pipes, rfb
from vncgate.console.fbs import _U32, FBS_MAGIC, INPUT_MAGIC, PREFIX, BlockWriter
from vncgate.console.streams import Chunk

# The file format moved to fbs.py and playing back to replay.py; their names stay importable here.

log = logging.getLogger("vncgate.console.recording")

SESSION_ID = re.compile(r"[0-9a-f]{6,64}")
SPACE_CHECK = 8 << 20  # bytes a recorder writes between two looks at the free space


class Handshake:
    """Follows an RFB handshake from both sides' bytes; .done gives where ServerInit and
    ClientInit begin. Raises ValueError for a handshake it cannot follow or that failed."""

    def __init__(self) -> None:
        self.server = b""
        self.client = b""

    def offsets(self) -> tuple[int, int] | None:
        """(ServerInit's offset in the server bytes, ClientInit's in the client's), or None
        while more bytes are needed."""
        s, c = self.server, self.client
        if len(s) < 12 or len(c) < 12:
            return None
        minor = min(_minor(s[:12]), _minor(c[:12]))
        if minor == 3:
            if len(s) < 16:
                return None
            kind, at, client_at = _U32.unpack(s[12:16])[0], 16, 12
        else:
            if len(s) < 13:
                return None
            if s[12] == 0:
                raise ValueError("the server refused the connection")
            if len(s) < 13 + s[12] or len(c) < 13:
                return None
            kind, at, client_at = c[12], 13 + s[12], 13
        if kind == rfb.VNC_AUTH:
            at, client_at = at + 16, client_at + 16
        elif kind != rfb.NONE:
            raise ValueError(f"security type {kind} cannot be followed")
        if kind == rfb.VNC_AUTH or minor == 8:  # SecurityResult
            if len(s) < at + 4:
                return None
            if _U32.unpack(s[at:at + 4])[0] != 0:
                raise ValueError("the security handshake failed")
            at += 4
        if len(c) < client_at:
            return None
        return at, client_at


def _minor(line: bytes) -> int:
    match = re.fullmatch(rb"RFB (\d{3})\.(\d{3})\n", line)
    if not match:
        raise ValueError(f"not an RFB version line: {line!r}")
    major, minor = int(match.group(1)), int(match.group(2))
    return 8 if major > 3 or minor >= 8 else 7 if minor == 7 else 3


class Recorder:
    """Writes one session. server() and client() are called by the relay's two threads with
    each chunk before it is passed on; finish() once the session is over."""

    def __init__(self, folder: str, session_id: str, meta: dict[str, Any], max_bytes: int,
                 on_stop: Callable[[str, str], object], at_server_init: bool,
                 clock: Callable[[], float] = time.monotonic, space_left: Callable[[], bool] = lambda: True,
                 index: Callable[[dict[str, Any]], object] | None = None) -> None:
        """space_left(): False once the filesystem is below record_min_free (asked every SPACE_CHECK
        bytes); index: called with the metadata each time it is written (the store's recordings index)."""
        self.index = index
        self.folder = folder
        self.session_id = session_id
        self.meta = meta
        self.max_bytes = max_bytes
        self.on_stop = on_stop
        self.clock = clock
        self.started = clock()
        self.stopped: str | None = None  # why recording ended before the session, if it did
        self.space_left = space_left
        self._next_space_check = SPACE_CHECK
        self.handshake: Handshake | None = None if at_server_init else Handshake()
        self._lock = threading.Lock()
        writers = []
        try:
            for suffix, magic in ((".fbs", FBS_MAGIC), (".input", INPUT_MAGIC)):
                writers.append(BlockWriter(self.path(suffix), magic))
            self.output, self.input = writers
            self.output.write(PREFIX, 0)
            self._write_meta()
        except OSError:
            for writer in writers:
                writer.close()
            _remove(folder, session_id)
            raise

    def path(self, suffix: str) -> str:
        return os.path.join(self.folder, self.session_id + suffix)

    @property
    def size(self) -> int:
        return self.output.size + self.input.size

    @property
    def following(self) -> bool:
        """True while the RFB handshake is being followed: the server's bytes must be shown
        to server(), not to server_pipe()."""
        return self.handshake is not None

    def server(self, chunk: Chunk) -> None:
        self._take(chunk, True)

    def server_pipe(self, read_end: int, count: int) -> bool:
        """The server's next count bytes, waiting in a pipe: spliced into the file, never read
        here (called once following is over). Returns whether the pipe was drained (False only
        when the file refused them)."""
        with self._lock:
            if self.stopped or self._too_big(self.output, count) or self.stopped:
                chunk = pipes.read_pipe(read_end, count)  # the last chunk before the limit
                if not self.stopped:
                    self._take_locked(chunk, True)
                return True
            try:
                self.output.splice(read_end, count, self._ms())
            except OSError as error:
                self._failed(error)
                return False
            return True

    def client(self, chunk: Chunk) -> None:
        self._take(chunk, False)

    def _take(self, chunk: Chunk, from_server: bool) -> None:
        if self.stopped:
            return
        with self._lock:
            if not self.stopped:
                self._take_locked(chunk, from_server)

    def _take_locked(self, chunk: Chunk, from_server: bool) -> None:
        if self.handshake is not None:
            self._follow(self.handshake, bytes(chunk), from_server)
        else:
            self._write(chunk, from_server)

    def _follow(self, handshake: Handshake, chunk: bytes, from_server: bool) -> None:
        if from_server:
            handshake.server += chunk
        else:
            handshake.client += chunk
        try:
            found = handshake.offsets()
        except ValueError as error:
            self._stop("record-unsupported", str(error))
            return
        if found is not None:
            self.handshake = None
            server_rest, client_rest = handshake.server[found[0]:], handshake.client[found[1]:]
            for data, side in ((server_rest, True), (client_rest, False)):
                if data and not self.stopped:
                    self._write(data, side)
        elif len(handshake.server) + len(handshake.client) > 1 << 16:
            self._stop("record-unsupported", "no ServerInit in the first 64 KiB")

    def _too_big(self, writer: BlockWriter, length: int) -> bool:
        if self.size >= self._next_space_check:  # the free-space floor, looked at now and then
            self._next_space_check = self.size + SPACE_CHECK
            if not self.space_left():
                self._stop("record-min-free", "the filesystem is below record_min_free")
                return True
        return self.size + writer.block_size(length) > self.max_bytes

    def _ms(self) -> int:
        return int((self.clock() - self.started) * 1000)

    def _write(self, chunk: Chunk, from_server: bool) -> None:
        writer = self.output if from_server else self.input
        full = self._too_big(writer, len(chunk))
        if self.stopped:  # below the free-space floor: nothing more is written
            return
        if full:  # what fits is written: the replay plays up to the cut
            chunk = chunk[:max(0, self.max_bytes - self.size - 8) & ~3]
        try:
            if chunk:
                writer.write(chunk, self._ms())
        except OSError as error:
            self._failed(error)
            return
        if full:
            self._stop("record-max-bytes", f"record_max_bytes ({self.max_bytes}) reached")

    def _failed(self, error: OSError) -> None:
        """A write the file refused (a full disk, a file size limit): recording ends, the
        session goes on; the file ends at its last whole block."""
        self._stop("record-failed", f"cannot write the recording: {error.strerror or error}")

    def _stop(self, reason: str, detail: str) -> None:
        self.stopped = reason
        log.info("session %s: recording stopped: %s", self.session_id, detail)
        self.on_stop(reason, detail)

    def finish(self) -> dict[str, Any]:
        """Close the files; the fields the session's audit line adds (none when nothing of
        the session's screen was recorded, and then no files are left)."""
        with self._lock:
            self.stopped = self.stopped or "session-ended"
            for writer in (self.output, self.input):
                writer.close()
            if self.handshake is not None:  # no ServerInit was seen: nothing worth keeping
                _remove(self.folder, self.session_id)
                return {}
            self.meta["duration"] = round(self.clock() - self.started, 3)
            self.meta["bytes"] = self.size
            if self.stopped != "session-ended":
                self.meta["stopped"] = self.stopped
            try:
                self._write_meta()
            except OSError as error:  # the listing keeps the metadata written at the start
                log.error("session %s: cannot update the recording's metadata: %s", self.session_id, error)
        fields = {"recording": self.session_id, "recording_bytes": self.size}
        if self.stopped != "session-ended":
            fields["recording_stopped"] = self.stopped
        return fields

    def _write_meta(self) -> None:
        _write_json(self.path(".json"), self.meta)
        if self.index is not None:
            self.index(dict(self.meta))


def _remove(folder: str, session_id: str) -> None:
    """A recording's files, whichever of them exist."""
    for suffix in (".fbs", ".input", ".json"):
        try:
            os.unlink(os.path.join(folder, session_id + suffix))
        except FileNotFoundError:
            pass


def _write_json(path: str, value: object) -> None:
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8", opener=lambda name, flags: os.open(name, flags, 0o600)) as handle:
        json.dump(value, handle)
    os.replace(temporary, path)
