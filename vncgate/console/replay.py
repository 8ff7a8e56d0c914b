"""Playing a recording back: a Player is an RFB server on one end of a socket pair, whose
other end a replay token's session relays as its backend. It answers the viewer's handshake
(security None, the recorded ServerInit), sends the recorded blocks on their clock times the
speed, and reads and drops the viewer's input.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from typing import IO

from vncgate.console import rfb, streams
from vncgate.console.fbs import PREFIX, ReplayError, read_blocks

log = logging.getLogger("vncgate.console.recording")

MAX_NAME = 4096


# -- playing back ------------------------------------------------------------------------------

class Player:
    """Plays one recording as an RFB server on one end of a socket pair; the session relays
    the other end (.socket) as its backend. The viewer's handshake is answered here (security
    None, the recorded ServerInit); its input is read and dropped."""

    def __init__(self, path: str | None, speed: float, error: ReplayError | None = None) -> None:
        """error: the ReplayError to tell instead of reading path."""
        self.path = path
        self.speed = speed
        self.socket, self._far = socket.socketpair()
        try:
            if error is not None:
                raise error
            self.blocks = read_blocks(path)
            self.server_init, self.first = self._server_init()
            self.error = None
        except ReplayError as error:
            self.error = error
            self._far.close()
            return
        threading.Thread(target=self._run, name="replay", daemon=True).start()

    def _read(self, handle: IO[bytes], block: tuple[int, int, int]) -> bytes:
        offset, length, _ms = block
        handle.seek(offset)
        return handle.read(length)

    def _server_init(self):
        """ServerInit's bytes, and (index of the next block, bytes of it already used)."""
        with open(self.path, "rb") as handle:
            data, index = b"", 0
            while index < len(self.blocks) and len(data) < len(PREFIX) + 24:
                data += self._read(handle, self.blocks[index])
                index += 1
            if not data.startswith(PREFIX) or len(data) < len(PREFIX) + 24:
                raise ReplayError("recording-corrupt", "no RFB stream with a ServerInit at its start")
            init = data[len(PREFIX):]
            width, height, bpp, name_length = struct.unpack("!HHB15xI", init[:24])
            if not width or not height or bpp not in (8, 16, 32) or name_length > MAX_NAME:
                raise ReplayError("recording-corrupt", "the recorded ServerInit is not one")
            while index < len(self.blocks) and len(init) < 24 + name_length:
                init += self._read(handle, self.blocks[index])
                index += 1
            if len(init) < 24 + name_length:
                raise ReplayError("recording-truncated", "the recording ends inside its ServerInit")
        used = len(init) - 24 - name_length  # bytes of the last block read that follow ServerInit
        return init[:24 + name_length], (index, self.blocks[index - 1][1] - used if used else None)

    def _run(self):
        sock = self._far
        try:
            with sock, open(self.path, "rb") as handle:
                reader = streams.ChunkReader(streams.SocketSource(sock))
                rfb.offer_no_auth(reader.read_exact, sock.sendall, rfb.RFB_3_8)
                reader.read_exact(1)  # ClientInit: shared or not, there is one screen
                self._play(sock, handle)
                while self._drop_input(sock, None):
                    pass  # the last picture stays until the viewer leaves
        except (OSError, rfb.RfbError, ConnectionError) as error:
            log.debug("replay of %s ended: %s", os.path.basename(self.path), error)

    def _play(self, sock: socket.socket, handle: IO[bytes]) -> None:
        sock.sendall(self.server_init)
        index, skip = self.first
        origin_ms = self.blocks[index - 1][2] if index else 0
        started = time.monotonic()
        if skip is not None:  # the rest of the block that held ServerInit's end
            offset, length, _ms = self.blocks[index - 1]
            sock.sendall(self._read(handle, (offset + skip, length - skip, 0)))
        for block in self.blocks[index:]:
            due = started + (block[2] - origin_ms) / 1000 / self.speed
            while (wait := due - time.monotonic()) > 0:
                if not self._drop_input(sock, wait):
                    return
            sock.sendall(self._read(handle, block))

    @staticmethod
    def _drop_input(sock: socket.socket, timeout: float | None) -> bool:
        """Wait up to timeout (None: for ever) for viewer input and drop it; False at its end."""
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        if poller.poll(None if timeout is None else timeout * 1000):
            return bool(sock.recv(65536))
        return True
