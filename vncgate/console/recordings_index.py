"""The recordings of every gateway on a store: each recording's metadata (session, token id,
instance, gateway, bytes, start, duration) is kept in the store's index as well as in its
S.json, so any gateway or CLI lists them all, a replay token can be minted anywhere, and a
purge reaches every gateway. Without a store (the CLI's and tests' bare Recordings) the
folder is all there is."""

import logging
from typing import Any, Optional

from vncgate import store as store_module

log = logging.getLogger("vncgate.console.recording")


class Index:
    def __init__(self, store: Any, folder: str) -> None:
        self.store = store
        self.folder = folder
        self._failing = False

    def _guarded(self, call: Any, *args: Any, default: Any = None) -> Any:
        """A store outage must not stop a recording or a listing: the files still say it."""
        if self.store is None:
            return default
        try:
            result = call(*args)
        except store_module.StoreError as error:
            if not self._failing:
                log.warning("recordings index unavailable: %s", error)
                self._failing = True
            return default
        self._failing = False
        return result

    def add(self, meta: dict) -> None:
        self._guarded(lambda: self.store.index_recording(meta))

    def merged(self, files: list, instance_id: Optional[str] = None, store: Any = None) -> list:
        """The index's recordings and the folder's files it does not know, oldest first.
        store: the one to ask instead of self.store (the same store, seen through a deadline)."""
        source = self.store if store is None else store
        indexed = self._guarded(lambda: source.list_recordings(instance_id), default=[])
        known = {meta["session_id"] for meta in indexed}
        rows = indexed + [meta for meta in files if meta["session_id"] not in known]
        return sorted(rows, key=lambda meta: (meta["started_at"], meta["session_id"]))

    def find(self, session_id: str) -> Optional[dict]:
        rows = self._guarded(lambda: self.store.list_recordings(), default=[])
        return next((meta for meta in rows if meta["session_id"] == session_id), None)

    def remove(self, session_ids: list) -> None:
        if session_ids:
            self._guarded(lambda: self.store.remove_recordings(session_ids))
