"""The record_dir: where recordings are started, kept within their budget, listed and purged.

Recordings decides whether a session is recorded (the token's record flag, record_all),
starts its Recorder (recording.py) unless the folder cannot be written or its filesystem is
below record_min_free, and prunes: recordings older than record_keep_days, and the oldest
finished ones past record_dir_max_bytes. It lists, finds and purges recordings through the
store's recordings index (recordings_index.py) merged with the folder's own files, and opens
a recording's Player (replay.py) for a replay token. The files' format is in recording.py
and fbs.py.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Callable

from vncgate.console import recordings_index
from vncgate.console.fbs import ReplayError
from vncgate.console.recording import SESSION_ID, Recorder, _remove
from vncgate.console.replay import Player

if TYPE_CHECKING:
    from vncgate.config import Config
    from vncgate.console.sessions import Session
    from vncgate.store.common import ConnectionDetails

log = logging.getLogger("vncgate.console.recording")

Metas = list[dict[str, Any]]  # recordings' metadata (a name apart: Recordings.list hides the builtin)


def _names(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


class Recordings:
    """The record_dir: starting recorders, listing, purging, and playing recordings back.
    With a store, every recording is also in its index (recordings_index.Index), so any
    gateway or CLI on the store lists, finds and purges every gateway's."""

    def __init__(self, folder: str, record_all: bool = False, max_bytes: int = 1 << 30, keep_days: float = 30.0,
                 clock: Callable[[], float] = time.time, dir_max_bytes: int = 0, min_free: float = 0.0,
                 store: Any = None, gateway_id: str = "", gateway: str = "") -> None:
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
    def from_config(cls, config: Config, store: Any = None, gateway_id: str = "") -> Recordings:
        return cls(config.record_dir, config.record_all, config.record_max_bytes, config.record_keep_days,
                   dir_max_bytes=config.record_dir_max_bytes, min_free=config.record_min_free,
                   store=store, gateway_id=gateway_id, gateway=config.base_url)

    def wanted(self, details: ConnectionDetails) -> bool:
        return not details.replay and (details.record or self.record_all)

    def space_left(self) -> bool:
        """Whether the folder's filesystem has more than min_free percent free."""
        if not self.min_free:
            return True
        try:
            found = os.statvfs(self.folder)
        except OSError:
            return True  # no folder yet: makedirs will say what is wrong
        return found.f_bavail * 100 > self.min_free * found.f_blocks

    def prune(self) -> int:
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

    def recorder(self, session: Session, on_stop: Callable[[str, str], object]) -> Recorder | None:
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

    def list(self, instance_id: str | None = None, store: Any = None) -> Metas:
        """The recordings' metadata, oldest first: every gateway's (the store's index) and the
        files of record_dir the index does not know (made before it, or during an outage).
        store: the one to ask instead of the index's own (the API's, bounded by its request's deadline)."""
        return self.index.merged(self.files(instance_id), instance_id, store)

    def files(self, instance_id: str | None = None) -> Metas:
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

    def find(self, session_id: str) -> dict[str, Any] | None:
        """The metadata of one recording, or None."""
        return next((meta for meta in self.list() if meta["session_id"] == session_id), None)

    def purge(self) -> int:
        """Delete the recordings older than keep_days, on every gateway (the index tells the
        others to delete their files); returns how many."""
        cutoff = self.clock() - self.keep_days * 86400
        gone = [meta["session_id"] for meta in self.list() if meta["started_at"] < cutoff]
        self.remove(gone)
        self.index.remove(gone)
        return len(gone)

    def remove(self, session_ids: Iterable[str]) -> None:
        """Delete these recordings' files from record_dir (a purge on any gateway)."""
        for session_id in session_ids:
            if SESSION_ID.fullmatch(session_id):
                _remove(self.folder, session_id)

    def elsewhere(self, session_id: str) -> str | None:
        """None when record_dir has the recording (or nobody does); else the sentence naming
        the gateway whose record_dir holds it."""
        if not SESSION_ID.fullmatch(session_id) or os.path.exists(os.path.join(self.folder, session_id + ".fbs")):
            return None
        meta = self.index.find(session_id)
        if meta is None or not meta.get("gateway"):
            return None
        return (f"recording {session_id} is in the record_dir of the gateway at {meta['gateway']} "
                f"({meta.get('gateway_id')}), which is not shared with this one")

    def player(self, session_id: str, speed: float) -> Player:
        """A Player for a replay token: its .socket is the session's backend; its .error the
        ReplayError the viewer is told instead (then nothing plays)."""
        where = self.elsewhere(session_id)
        if where is not None:
            error = ReplayError("recording-elsewhere", where)
            error.told = where[0].upper() + where[1:] + "."
            return Player(None, speed, error)
        return Player(os.path.join(self.folder, session_id + ".fbs") if SESSION_ID.fullmatch(session_id)
                      else None, speed)
