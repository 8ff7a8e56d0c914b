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

This module keeps the Recorder (and the Handshake it follows) and Recordings (the record_dir:
starting recorders, listing, purging); the block format is in fbs.py, playing back in replay.py.
"""

import json
import logging
import os
import re
import threading
import time

from vncgate.console import recordings_index, rfb
from vncgate.console import relay as relay_module
from vncgate.console.fbs import _U32, FBS_MAGIC, INPUT_MAGIC, PREFIX, BlockWriter, ReplayError, read_blocks
from vncgate.console.replay import Player

# The file format moved to fbs.py and playing back to replay.py; their names stay importable here.
__all__ = ["FBS_MAGIC", "INPUT_MAGIC", "PREFIX", "SESSION_ID", "BlockWriter", "Handshake", "Player", "Recorder",
           "Recordings", "ReplayError", "read_blocks"]

log = logging.getLogger("vncgate.console.recording")

SESSION_ID = re.compile(r"[0-9a-f]{6,64}")
SPACE_CHECK = 8 << 20  # bytes a recorder writes between two looks at the free space


class Handshake:
    """Follows an RFB handshake from both sides' bytes; .done gives where ServerInit and
    ClientInit begin. Raises ValueError for a handshake it cannot follow or that failed."""

    def __init__(self):
        self.server = b""
        self.client = b""

    def offsets(self):
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


def _minor(line):
    match = re.fullmatch(rb"RFB (\d{3})\.(\d{3})\n", line)
    if not match:
        raise ValueError(f"not an RFB version line: {line!r}")
    major, minor = int(match.group(1)), int(match.group(2))
    return 8 if major > 3 or minor >= 8 else 7 if minor == 7 else 3


class Recorder:
    """Writes one session. server() and client() are called by the relay's two threads with
    each chunk before it is passed on; finish() once the session is over."""

    def __init__(self, folder, session_id, meta, max_bytes, on_stop, at_server_init, clock=time.monotonic,
                 space_left=lambda: True, index=None):
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
        self.stopped = None  # why recording ended before the session, if it did
        self.space_left = space_left
        self._next_space_check = SPACE_CHECK
        self.handshake = None if at_server_init else Handshake()
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

    def path(self, suffix):
        return os.path.join(self.folder, self.session_id + suffix)

    @property
    def size(self):
        return self.output.size + self.input.size

    @property
    def following(self):
        """True while the RFB handshake is being followed: the server's bytes must be shown
        to server(), not to server_pipe()."""
        return self.handshake is not None

    def server(self, chunk):
        self._take(chunk, True)

    def server_pipe(self, read_end, count):
        """The server's next count bytes, waiting in a pipe: spliced into the file, never read
        here (called once following is over). Returns whether the pipe was drained (False only
        when the file refused them)."""
        with self._lock:
            if self.stopped or self._too_big(self.output, count) or self.stopped:
                chunk = relay_module.read_pipe(read_end, count)  # the last chunk before the limit
                if not self.stopped:
                    self._take_locked(chunk, True)
                return True
            try:
                self.output.splice(read_end, count, self._ms())
            except OSError as error:
                self._failed(error)
                return False
            return True

    def client(self, chunk):
        self._take(chunk, False)

    def _take(self, chunk, from_server):
        if self.stopped:
            return
        with self._lock:
            if not self.stopped:
                self._take_locked(chunk, from_server)

    def _take_locked(self, chunk, from_server):
        if self.handshake is not None:
            self._follow(bytes(chunk), from_server)
        else:
            self._write(chunk, from_server)

    def _follow(self, chunk, from_server):
        handshake = self.handshake
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

    def _too_big(self, writer, length):
        if self.size >= self._next_space_check:  # the free-space floor, looked at now and then
            self._next_space_check = self.size + SPACE_CHECK
            if not self.space_left():
                self._stop("record-min-free", "the filesystem is below record_min_free")
                return True
        return self.size + writer.block_size(length) > self.max_bytes

    def _ms(self):
        return int((self.clock() - self.started) * 1000)

    def _write(self, chunk, from_server):
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

    def _failed(self, error):
        """A write the file refused (a full disk, a file size limit): recording ends, the
        session goes on; the file ends at its last whole block."""
        self._stop("record-failed", f"cannot write the recording: {error.strerror or error}")

    def _stop(self, reason, detail):
        self.stopped = reason
        log.info("session %s: recording stopped: %s", self.session_id, detail)
        self.on_stop(reason, detail)

    def finish(self):
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

    def _write_meta(self):
        _write_json(self.path(".json"), self.meta)
        if self.index is not None:
            self.index(dict(self.meta))


def _remove(folder, session_id):
    """A recording's files, whichever of them exist."""
    for suffix in (".fbs", ".input", ".json"):
        try:
            os.unlink(os.path.join(folder, session_id + suffix))
        except FileNotFoundError:
            pass


def _names(folder):
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _write_json(path, value):
    temporary = path + ".tmp"
    with open(temporary, "w", encoding="utf-8", opener=lambda name, flags: os.open(name, flags, 0o600)) as handle:
        json.dump(value, handle)
    os.replace(temporary, path)


class Recordings:
    """The record_dir: starting recorders, listing, purging, and playing recordings back.
    With a store, every recording is also in its index (recordings_index.Index), so any
    gateway or CLI on the store lists, finds and purges every gateway's."""

    def __init__(self, folder, record_all=False, max_bytes=1 << 30, keep_days=30.0, clock=time.time,
                 dir_max_bytes=0, min_free=0.0, store=None, gateway_id="", gateway=""):
        """dir_max_bytes: the whole folder's bound (0: none), the oldest finished recordings pruned
        past it; min_free: percent of the filesystem below which no recording starts or goes on;
        store: the token store, whose recordings index this gateway (gateway_id, at the base
        URL gateway) writes and every listing reads."""
        self.folder = folder
        self.record_all = record_all
        self.max_bytes = max_bytes
        self.keep_days = keep_days
        self.clock = clock
        self.dir_max_bytes = dir_max_bytes
        self.min_free = min_free
        self._pruning = threading.Lock()
        self.index = recordings_index.Index(store, folder)
        self.gateway_id, self.gateway = gateway_id, gateway

    @classmethod
    def from_config(cls, config, store=None, gateway_id=""):
        return cls(config.record_dir, config.record_all, config.record_max_bytes, config.record_keep_days,
                   dir_max_bytes=config.record_dir_max_bytes, min_free=config.record_min_free,
                   store=store, gateway_id=gateway_id, gateway=config.base_url)

    def wanted(self, details):
        return not details.replay and (details.record or self.record_all)

    def space_left(self):
        """Whether the folder's filesystem has more than min_free percent free."""
        if not self.min_free:
            return True
        try:
            found = os.statvfs(self.folder)
        except OSError:
            return True  # no folder yet: makedirs will say what is wrong
        return found.f_bavail * 100 > self.min_free * found.f_blocks

    def prune(self):
        """Delete the oldest finished recordings until the folder is within dir_max_bytes (live
        ones, whose metadata has no duration yet, are never deleted); returns how many went."""
        if not self.dir_max_bytes or not self._pruning.acquire(blocking=False):
            return 0
        try:
            sizes = {}
            for name in _names(self.folder):
                try:
                    sizes[name] = os.stat(os.path.join(self.folder, name)).st_size
                except OSError:
                    pass
            total, gone = sum(sizes.values()), []
            for meta in self.files():  # this folder's, oldest first
                if total <= self.dir_max_bytes:
                    break
                session_id = meta["session_id"]
                if meta.get("duration") is None:
                    continue  # live, or its gateway died mid-session: kept for the purge by age
                total -= sum(sizes.get(session_id + suffix, 0) for suffix in (".fbs", ".input", ".json"))
                _remove(self.folder, session_id)
                gone.append(session_id)
            if gone:
                self.index.remove(gone)
                log.info("record_dir over record_dir_max_bytes: deleted the %d oldest recordings", len(gone))
            return len(gone)
        finally:
            self._pruning.release()

    def recorder(self, session, on_stop):
        """A Recorder for session; None (logged, and on_stop told) when record_dir cannot be
        written or its filesystem is below record_min_free."""
        meta = {"format": "vncgate-recording 1", "session_id": session.id,
                "instance_id": session.details.instance_id, "console_type": session.details.console_type,
                "started_at": round(session.started, 3), "duration": None, "bytes": 0,
                "token_id": session.details.token_id, "gateway_id": self.gateway_id, "gateway": self.gateway}
        if not self.space_left():
            log.warning("session %s: not recorded: %s is below record_min_free", session.id, self.folder)
            on_stop("record-min-free", f"{self.folder} is below record_min_free ({self.min_free}%)")
            return None
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            self.prune()
            return Recorder(self.folder, session.id, meta, self.max_bytes, on_stop,
                            at_server_init=session.security is not None, space_left=self.space_left,
                            index=self.index.add)
        except OSError as error:
            log.error("session %s: cannot record in %s: %s", session.id, self.folder, error)
            on_stop("record-failed", f"cannot write in {self.folder}: {error.strerror}")
            return None

    def list(self, instance_id=None):
        """The recordings' metadata, oldest first: every gateway's (the store's index) and the
        files of record_dir the index does not know (made before it, or during an outage)."""
        return self.index.merged(self.files(instance_id), instance_id)

    def files(self, instance_id=None):
        """The metadata of the recordings in record_dir, oldest first."""
        found = []
        try:
            names = os.listdir(self.folder)
        except FileNotFoundError:
            return []
        for name in names:
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(self.folder, name), encoding="utf-8") as handle:
                    meta = json.load(handle)
                if name != f"{meta['session_id']}.json" or not isinstance(meta["started_at"], (int, float)):
                    raise ValueError("not a recording's metadata")  # purge deletes by session_id
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("skipping unreadable recording metadata %s", name)
                continue
            if instance_id is None or meta.get("instance_id") == instance_id:
                found.append(meta)
        return sorted(found, key=lambda meta: (meta["started_at"], meta["session_id"]))

    def find(self, session_id):
        """The metadata of one recording, or None."""
        return next((meta for meta in self.list() if meta["session_id"] == session_id), None)

    def purge(self):
        """Delete the recordings older than keep_days, on every gateway (the index tells the
        others to delete their files); returns how many."""
        cutoff = self.clock() - self.keep_days * 86400
        gone = [meta["session_id"] for meta in self.list() if meta["started_at"] < cutoff]
        self.remove(gone)
        self.index.remove(gone)
        return len(gone)

    def remove(self, session_ids):
        """Delete these recordings' files from record_dir (a purge on any gateway)."""
        for session_id in session_ids:
            if SESSION_ID.fullmatch(session_id):
                _remove(self.folder, session_id)

    def elsewhere(self, session_id):
        """None when record_dir has the recording (or nobody does); else the sentence naming
        the gateway whose record_dir holds it."""
        if not SESSION_ID.fullmatch(session_id) or os.path.exists(os.path.join(self.folder, session_id + ".fbs")):
            return None
        meta = self.index.find(session_id)
        if meta is None or not meta.get("gateway"):
            return None
        return (f"recording {session_id} is in the record_dir of the gateway at {meta['gateway']} "
                f"({meta.get('gateway_id')}), which is not shared with this one")

    def player(self, session_id, speed):
        """A Player for a replay token: its .socket is the session's backend; its .error the
        ReplayError the viewer is told instead (then nothing plays)."""
        where = self.elsewhere(session_id)
        if where is not None:
            error = ReplayError("recording-elsewhere", where)
            error.told = where[0].upper() + where[1:] + "."
            return Player(None, speed, error)
        return Player(os.path.join(self.folder, session_id + ".fbs") if SESSION_ID.fullmatch(session_id)
                      else None, speed)
