"""The relay's building blocks, over socket pairs."""

import os
import socket
import threading
import time
import types

import pytest

from vncgate.console import fbs, pipes, relay, streams
from vncgate.console.recordings import Recordings


def tcp_pair():
    """Two connected loopback TCP sockets (the relay tunes TCP options, so no AF_UNIX pairs)."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


def test_chunk_reader_reads_exactly_and_keeps_the_surplus():
    left, right = socket.socketpair()
    right.sendall(b"FB 003.008\n\x01extra")
    reader = streams.ChunkReader(streams.SocketSource(left, initial=b"R"))
    assert reader.read_exact(1) == b"R"
    assert reader.read_exact(12) == b"FB 003.008\n\x01"
    assert reader.surplus == b"extra"
    right.close()
    with pytest.raises(ConnectionError):
        reader.read_exact(10)
    left.close()


def test_chunk_reader_goes_on_as_the_source_of_the_rest():
    left, right = socket.socketpair()
    right.sendall(b"greeting-rest")
    right.close()
    reader = streams.ChunkReader(streams.SocketSource(left))
    assert reader.read_exact(9) == b"greeting-"
    assert b"".join(bytes(chunk) for chunk in reader.chunks()) == b"rest"
    left.close()


def test_deadline_socket_ends_a_dripping_peer_at_its_deadline():
    left, right = socket.socketpair()
    timed = streams.DeadlineSocket(left, 0.5)
    started = time.monotonic()
    with pytest.raises(socket.timeout):
        while True:  # one byte every 0.1 s: each read is quick, the whole is not
            right.sendall(b"x")
            timed.recv(1)
            time.sleep(0.1)
    assert 0.4 < time.monotonic() - started < 1.5
    timed.lift()
    assert left.gettimeout() is None
    left.close()
    right.close()


@pytest.mark.parametrize("kind", ["splice", "copy"])
def test_half_close_and_counts(kind):
    client_app, client_side = tcp_pair()
    backend_side, backend_app = tcp_pair()
    if kind == "splice":
        relayed = relay.Relay.raw(client_side, backend_side, backend_leftover=b"B", client_leftover=b"C")
    else:
        relayed = relay.Relay(client_side, backend_side,
                              (streams.SocketSource(client_side, b"C"), streams.SocketSink(backend_side)),
                              (streams.SocketSource(backend_side, b"B"), streams.SocketSink(client_side)))
    runner = threading.Thread(target=relayed.run)
    runner.start()
    client_app.sendall(b"x" * 100_000)
    client_app.shutdown(socket.SHUT_WR)  # the client is done sending, but still reads
    received = b""
    while len(received) < 100_001:
        received += backend_app.recv(65536)
    assert received == b"C" + b"x" * 100_000
    assert backend_app.recv(1) == b""  # the half-close reached the backend
    backend_app.sendall(b"late reply")
    backend_app.close()
    replies = b""
    while chunk := client_app.recv(65536):
        replies += chunk
    assert replies == b"Blate reply"
    runner.join(5)
    assert not runner.is_alive()
    assert (relayed.bytes_up, relayed.bytes_down) == (100_001, 11)
    assert relayed.end_reason == "client-closed"


def test_stop_ends_both_directions_at_once():
    client_app, client_side = tcp_pair()
    backend_side, backend_app = tcp_pair()
    relayed = relay.Relay.raw(client_side, backend_side)
    runner = threading.Thread(target=relayed.run)
    runner.start()
    relayed.stop("revoked")
    runner.join(5)
    assert not runner.is_alive() and relayed.end_reason == "revoked"
    assert client_app.recv(1) == b"" and backend_app.recv(1) == b""


def test_tee_duplicates_a_pipe_without_consuming_it():
    first, second = os.pipe(), os.pipe()
    os.write(first[1], b"frame update")
    assert pipes.tee(first[0], second[1], 5) == 5  # the adapter around libc's tee
    assert os.read(second[0], 100) == b"frame"
    assert pipes.read_pipe(first[0], 12) == b"frame update"  # the first pipe still holds it all
    with pytest.raises(OSError):
        pipes.tee(first[1], second[1], 5)  # a write end cannot be tee'd from: errno, not -1
    for fd in (*first, *second):
        os.close(fd)


class UnevenPipes(pipes.PipePool):
    """Makes a one-page pipe after each full one: tee(2) then duplicates only part of a chunk."""

    def __init__(self):
        super().__init__(keep=0, size=4096)

    def take(self):
        self.size = 4096 if self.size == pipes.PIPE_SIZE else pipes.PIPE_SIZE
        return super().take()


@pytest.mark.parametrize("pipes", [pipes.PipePool, lambda: pipes.PipePool(limit=1), UnevenPipes],
                         ids=["tee", "no-free-pipe", "small-copy-pipe"])
def test_a_recorded_relay_writes_what_the_client_got(tmp_path, pipes):
    """The server side of a recorded session reaches the client and the recording whole and
    in order: tee'd when pipes are free, copied when not, partly each when the copy is small."""
    client_app, client_side = tcp_pair()
    backend_side, backend_app = tcp_pair()
    session = types.SimpleNamespace(id="0a1b2c3d4e5f", started=1.0, security=object(),
                                    details=types.SimpleNamespace(instance_id="vm", console_type="xvp-vnc",
                                                                    token_id="0123abcd"))
    recorder = Recordings(str(tmp_path)).recorder(session, lambda *why: None)
    relayed = relay.Relay(client_side, backend_side,
                          (streams.SocketSource(client_side), streams.SocketSink(backend_side)),
                          relay.TeeDirection("backend", backend_side, streams.SocketSink(client_side), recorder, b"S",
                                             pipes=pipes()))
    runner = threading.Thread(target=relayed.run)
    runner.start()
    sent = bytes(range(256)) * 12_288  # 3 MiB
    sender = threading.Thread(target=backend_app.sendall, args=(sent,))
    sender.start()
    received = bytearray()
    while len(received) < len(sent) + 1:
        received += client_app.recv(1 << 20)
    sender.join()
    client_app.close()
    backend_app.close()
    runner.join(5)
    assert bytes(received) == b"S" + sent
    assert recorder.finish()["recording_bytes"] > len(sent)
    path = str(tmp_path / "0a1b2c3d4e5f.fbs")
    with open(path, "rb") as handle:
        data = handle.read()
    stream = b"".join(data[offset:offset + length] for offset, length, _ms in fbs.read_blocks(path))
    assert stream == fbs.PREFIX + b"S" + sent


def test_the_backend_side_is_spliced_tee_d_or_copied_as_it_may_be(tmp_path):
    client_side, backend_side = tcp_pair()
    sink = streams.SocketSink(client_side)
    recorder = types.SimpleNamespace(server=lambda chunk: None)
    chosen = [type(relay.from_backend(backend_side, sink, recorder=with_recorder, splice=splice))
              for splice, with_recorder in ((True, None), (True, recorder), (False, None), (False, recorder))]
    tee = relay.TeeDirection if pipes.CAN_TEE else relay.CopyDirection
    assert chosen == [relay.SpliceDirection, tee, relay.CopyDirection, relay.CopyDirection]
    assert relay.splices(client_side, backend_side) == pipes.CAN_SPLICE
    assert not relay.splices(client_side, relay.tls.TlsStream(backend_side))  # TLS: OpenSSL has the bytes
    client_side.close()
    backend_side.close()
