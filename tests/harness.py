"""Real parts for the end-to-end tests: qemu, gateway processes, fake backends, XVP clients."""

import hashlib
import json
import os
import re
import select
import shutil
import signal
import socket
import sqlite3
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

from PIL import Image
from playwright.sync_api import sync_playwright
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from vncgate.console import vncauth

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ARTIFACTS = os.path.join(REPO, "artifacts")


def artifact(name):
    """Where a test keeps a file for people to look at (screenshots)."""
    os.makedirs(ARTIFACTS, exist_ok=True)
    return os.path.join(ARTIFACTS, name)


def make_certificate(folder, name):
    """A self-signed certificate for 127.0.0.1 and localhost: (cert path, key path)."""
    cert, key = os.path.join(folder, f"{name}.pem"), os.path.join(folder, f"{name}-key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "2", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, capture_output=True, timeout=60)
    return cert, key


class FakeClock:
    """The store's injectable clock: time moves only when a test says so."""

    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def console_script(name):
    """Path of an installed console script; the suite tests the installed commands."""
    path = shutil.which(name, path=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    assert path, f"{name} is not installed: run scripts/test (pip install -e .)"
    return path


def wait_for(condition, timeout=10.0, interval=0.02, message="condition"):
    """Poll condition() until it returns something truthy; that value is returned."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def free_port(host="127.0.0.1"):
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def established_to(port, host="127.0.0.1"):
    """How many TCP connections to a server on host:port are established (from /proc/net/tcp:
    accepted or still waiting in its backlog), whoever holds their other end. (Other tests'
    clients may have the same port number as their own end on another loopback address.)"""
    local = f"{socket.htonl(int.from_bytes(socket.inet_aton(host), 'big')):08X}:{port:04X}"
    with open("/proc/net/tcp") as table:
        return sum(1 for line in list(table)[1:] if line.split()[1] == local and line.split()[3] == "01")


def port_open(port, host="127.0.0.1"):
    try:
        socket.create_connection((host, port), timeout=0.5).close()
        return True
    except OSError:
        return False


class Qemu:
    """qemu-system-x86_64 with no disk: SeaBIOS shows its text and stays there."""

    def __init__(self, extra_vnc="", monitor=False, trace_keys=None, tls_dir=None, extra_args=()):
        """trace_keys: a file where qemu logs every key event its VNC server takes (see key_events).
        tls_dir: a folder of x509 credentials (CertificateAuthority.qemu_dir): the console
        speaks VeNCrypt and asks its clients for a certificate from the same authority."""
        self.port = free_port()
        self.display = self.port - 5900
        self.trace_keys = trace_keys
        argv = ["qemu-system-x86_64", "-display", "none", "-nodefaults", "-vga", "std", "-m", "32"]
        if tls_dir:
            argv += ["-object", f"tls-creds-x509,id=tls0,dir={tls_dir},endpoint=server,verify-peer=on"]
            extra_vnc += ",tls-creds=tls0"
        argv += ["-vnc", f"127.0.0.1:{self.display}{extra_vnc}", *extra_args]
        if monitor:
            argv += ["-monitor", "stdio"]
        if trace_keys:
            argv += ["-D", trace_keys, "-trace", "vnc_key_event_*"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE if monitor else subprocess.DEVNULL,
                                     stdout=subprocess.PIPE if monitor else subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, 20, message="qemu's VNC port")
        assert self.proc.poll() is None, f"qemu exited: {self.proc.stderr.read()}"

    def stop(self):
        self.proc.kill()
        self.proc.wait(10)

    def key_events(self):
        """The key events qemu's VNC server took so far, as its trace lines (Qemu(trace_keys=...))."""
        try:
            with open(self.trace_keys) as handle:
                return [line.strip() for line in handle if "vnc_key_event" in line]
        except FileNotFoundError:
            return []

    def monitor(self, command, answers=(), timeout=10.0):
        """Run one HMP command on qemu's monitor (Qemu(monitor=True)); returns what it printed
        before the next "(qemu) " prompt. answers are typed, in order, at its "Password: "
        prompts. Waits on the pipe, so a command has taken effect when this returns."""
        if not getattr(self, "_monitor_started", False):
            self._monitor_read((b"(qemu) ",), timeout)  # the banner and the first prompt
            self._monitor_started = True
        answers = list(answers)
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        output = b""
        while True:
            output += self._monitor_read((b"(qemu) ", b"Password: "), timeout)
            if output.endswith(b"(qemu) "):
                break
            assert answers, f"qemu's monitor asks for more than was given to {command!r}: {output!r}"
            self.proc.stdin.write(answers.pop(0) + "\n")
            self.proc.stdin.flush()
        # The monitor redraws the line as it is typed (terminal escapes); the reply follows it.
        text = re.sub(rb"\x1b\[[0-9;]*[A-Za-z]", b"", output).decode("utf-8", "replace")
        return text.partition("\r\n")[2][:-len("(qemu) ")].replace("\r\n", "\n").strip()

    def _monitor_read(self, prompts, timeout):
        """Monitor output up to and including the first of prompts that ends it."""
        deadline = time.monotonic() + timeout
        poller = select.poll()
        poller.register(self.proc.stdout.fileno(), select.POLLIN)
        data = b""
        while not data.endswith(prompts):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"qemu's monitor printed no prompt in {timeout}s: {data!r}"
            if poller.poll(remaining * 1000):
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                assert chunk, f"qemu's monitor closed: {data!r}"
                data += chunk
        return data

    def set_vnc_password(self, password):
        """The VNC password of a `-vnc ...,password=on` console. `set_password vnc P` is one line
        (qemu 0.14 on); a qemu without it gets `change vnc password`, which prompts "Password: "."""
        reply = self.monitor(f"set_password vnc {password}")
        if "unknown command" in reply:
            reply = self.monitor("change vnc password", answers=[password])
        refused = "error" in reply.lower() or "unknown command" in reply
        assert not refused, f"qemu refused the VNC password: {reply}"


class CertificateAuthority:
    """A certificate authority made with openssl in folder, issuing certificates for 127.0.0.1."""

    def __init__(self, folder, name="ca"):
        self.folder = folder
        self.name = name
        self.cert, self.key = self._path(f"{name}-cert.pem"), self._path(f"{name}-key.pem")
        self._openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key, "-out", self.cert,
                      "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def _path(self, name):
        return os.path.join(self.folder, name)

    @staticmethod
    def _openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    def issue(self, name, usage="serverAuth", host="127.0.0.1"):
        """A certificate for host signed by this authority, and its key: (cert path, key path)."""
        cert, key, request, extensions = (self._path(f"{self.name}-{name}{suffix}")
                                          for suffix in ("-cert.pem", "-key.pem", ".csr", ".ext"))
        with open(extensions, "w") as handle:
            handle.write(f"basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
                         f"extendedKeyUsage={usage}\nsubjectAltName=IP:{host}\n")
        self._openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", request, "-subj", f"/CN={name}")
        self._openssl("x509", "-req", "-in", request, "-CA", self.cert, "-CAkey", self.key, "-days", "2",
                      "-set_serial", str(int.from_bytes(os.urandom(8), "big")), "-extfile", extensions, "-out", cert)
        return cert, key

    def qemu_dir(self):
        """The folder qemu's tls-creds-x509 reads: ca-cert.pem, server-cert.pem, server-key.pem."""
        folder = self._path(f"{self.name}-qemu")
        os.makedirs(folder, exist_ok=True)
        cert, key = self.issue("server")
        for source, name in ((self.cert, "ca-cert.pem"), (cert, "server-cert.pem"), (key, "server-key.pem")):
            shutil.copy(source, os.path.join(folder, name))
        return folder


class Xvfb:
    """A virtual X display for real X clients (TigerVNC's vncviewer), captured with ImageMagick."""

    def __init__(self, size="1024x768"):
        if not os.path.isdir("/tmp/.X11-unix"):  # a fresh container; only root's Xvfb makes it itself
            os.makedirs("/tmp/.X11-unix", exist_ok=True)
            os.chmod("/tmp/.X11-unix", 0o1777)
        # -displayfd: Xvfb picks a free display itself and writes its number once it is ready.
        self.proc = subprocess.Popen(["Xvfb", "-displayfd", "1", "-screen", "0", f"{size}x24", "-nolisten", "tcp"],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        poller = select.poll()
        poller.register(self.proc.stdout.fileno(), select.POLLIN)
        number = poller.poll(20_000) and os.read(self.proc.stdout.fileno(), 64).strip()
        assert number, f"Xvfb did not start: {self.proc.stderr.read1() if self.proc.poll() is not None else 'silent'}"
        self.display = f":{number.decode()}"
        self.env = {**os.environ, "DISPLAY": self.display}

    def capture(self, path):
        """The whole screen as a PNG at path."""
        subprocess.run(["import", "-display", self.display, "-window", "root", path], check=True,
                       capture_output=True, timeout=60)
        return path

    def stop(self):
        self.proc.kill()
        self.proc.wait(10)


# A token as minted (43 URL-safe characters) or guessed alike, standing alone: hashes (64 hex
# digits), token_ids (8) and session ids (12) never match.
TOKEN_SHAPED = re.compile(r"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{43}(?![A-Za-z0-9_-])")


class GatewayProcess:
    """`vncgate` in a subprocess on a free port (or bind_port), with its own ini, audit log and stderr file."""

    def __init__(self, folder, name="gw", database="tokens.db", bind_port=0, wrapper=(), **settings):
        """wrapper: a command that execs the gateway (e.g. prlimit), so that its pid is the gateway's."""
        self.folder = folder
        self.ini = os.path.join(folder, f"{name}.ini")
        self.audit_path = os.path.join(folder, f"{name}-audit.jsonl")
        self.stderr_path = os.path.join(folder, f"{name}-stderr.log")
        values = {"database": database, "audit_log": self.audit_path, "port": 6080, **settings}
        with open(self.ini, "w") as ini:
            ini.write("[gateway]\n" + "".join(f"{key} = {value}\n" for key, value in values.items()))
        self.stderr = open(self.stderr_path, "w")
        # DEBUG, so that every gateway of the suite proves no log level ever shows a token (stop()).
        self.proc = subprocess.Popen([*wrapper, console_script("vncgate"), "-c", self.ini, "--port", str(bind_port),
                                      "--log-level", "DEBUG"],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr, cwd=folder)
        line = wait_for(self._listening_line, 15, message="the 'vncgate listening on' line")
        self.port = int(line.rsplit(":", 1)[1])
        self.host = values.get("listen", "127.0.0.1")

    def _listening_line(self):
        assert self.proc.poll() is None, f"vncgate exited: {self.read_stderr()}"
        return next((line for line in self.read_stderr().splitlines()
                     if line.startswith("vncgate listening on ")), None)

    def read_stderr(self):
        with open(self.stderr_path) as handle:
            return handle.read()

    def audit(self):
        if not os.path.exists(self.audit_path):
            return []
        with open(self.audit_path) as handle:
            return [json.loads(line) for line in handle]

    def mint(self, host, port, console_type="xvp-vnc", *extra):
        out = subprocess.run([console_script("vncgate-token"), "-c", self.ini, "add", "--host", host,
                              "--port", str(port), "--type", console_type, "--json", *extra],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return json.loads(out)["token"]

    def token_cli(self, *args, input=None):
        return subprocess.run([console_script("vncgate-token"), "-c", self.ini, *args],
                              capture_output=True, text=True, timeout=30, input=input)

    def reload_keys(self, count):
        """SIGHUP, then wait for the gateway's line saying it now holds count API keys."""
        before = self.read_stderr().count(" API keys from ")
        self.proc.send_signal(signal.SIGHUP)
        line = wait_for(lambda: self.read_stderr().count(" API keys from ") > before and
                        self.read_stderr().rsplit("reloaded ", 1)[1], message="the API keys reloaded")
        assert line.startswith(f"{count} API keys"), line

    def cpu_seconds(self):
        """User and system CPU time the gateway has used so far."""
        with open(f"/proc/{self.proc.pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def threads(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/task"))

    def rss_kib(self):
        """The gateway's resident memory now, in KiB."""
        with open(f"/proc/{self.proc.pid}/status") as status:
            return int(next(line for line in status if line.startswith("VmRSS:")).split()[1])

    def fds(self):
        """The gateway's open file descriptors, by what they point at."""
        folder = f"/proc/{self.proc.pid}/fd"
        targets = []
        for name in os.listdir(folder):
            try:
                targets.append(os.readlink(os.path.join(folder, name)))
            except FileNotFoundError:
                pass  # closed while we looked
        return sorted(targets)

    def session_fds(self):
        """The fds that sessions hold (sockets): database files and splice pipes belong to bounded pools."""
        return [fd for fd in self.fds() if "tokens.db" not in fd and not fd.startswith("pipe:")]

    def stop(self, sig=signal.SIGTERM, timeout=10):
        """Stop the gateway; its exit code. Fails if its log or audit lines ever showed a token."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.stderr.close()
            for path in (self.stderr_path, self.audit_path):
                if os.path.exists(path):
                    with open(path, encoding="utf-8", errors="replace") as handle:
                        leaked = TOKEN_SHAPED.findall(handle.read())
                    assert not leaked, f"{path} shows token-shaped words: {leaked[:3]}"


def start_api_gateway(folder, **settings):
    """A GatewayProcess with the control-plane API on, a key named "ops" (.key), and an
    ApiClient holding it (.api); settings as GatewayProcess's."""
    port = free_port()
    keys = os.path.join(folder, "api-keys")
    with open(keys, "w") as handle:
        handle.write("# vncgate API keys\n")
    settings = {"public_url": f"http://127.0.0.1:{port}", "web_root": NOVNC, "failed_token_burst": 1000, **settings}
    gateway = GatewayProcess(folder, bind_port=port, api_keys_file=keys, **settings)
    added = gateway.token_cli("api-key", "add", "ops")
    assert added.returncode == 0, added.stderr
    gateway.key = added.stdout.strip()
    gateway.reload_keys(1)
    gateway.api = ApiClient(gateway.port, gateway.key)
    return gateway


def xvp_connect(port, token, timeout=10.0, host="127.0.0.1", source=None):
    """Open an XVP session (from the source address, if given); returns (socket, status line,
    bytes after the head)."""
    sock = socket.create_connection((host, port), timeout=timeout,
                                    source_address=(source, 0) if source else None)
    target = f"/console?token={token}" if token is not None else "/console"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
    status, rest = read_head(sock)
    return sock, status, rest


def read_head(sock):
    """The status line of an HTTP head, and the bytes that came after the head."""
    head, rest = read_until_blank_line(sock)
    return head.split(b"\r\n")[0].decode("latin-1"), rest


def read_until_blank_line(sock):
    """(head, rest): everything up to the blank line, and what came with it; short if closed first."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    return head, rest


def recv_exactly(sock, count):
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            break
        data += chunk
    return data


def closed_by_peer(sock, timeout):
    """True when the peer closes sock within timeout (reading and dropping any data)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            if not sock.recv(65536):
                return True
        except socket.timeout:
            return False
        except ConnectionResetError:
            return True
    return False


class FakeBackend:
    """A loopback TCP server whose per-connection behaviour is a function(sock)."""

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connections = 0
        self.received = []
        self._stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self._stopping:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._handle, args=(sock,), daemon=True).start()

    def _handle(self, sock):
        with sock:
            try:
                self.behaviour(self, sock)
            except OSError:
                pass

    def stop(self):
        self._stopping = True
        self.listener.close()


def rfb_banner_then_echo(backend, sock):
    """A minimal VNC-like server: banner first, then echo until the client closes."""
    sock.sendall(b"RFB 003.008\n")
    echo(sock)


def silent(backend, sock):
    sock.recv(1)  # returns when the gateway gives up and closes


def xenserver(path):
    """A XenServer console that accepts only CONNECT <path>, then sends 200 and the banner in one write."""
    def behaviour(backend, sock):
        head, _ = read_until_blank_line(sock)
        backend.received.append(head)
        if head.split(b"\r\n")[0] != f"CONNECT {path} HTTP/1.1".encode():
            sock.sendall(b"HTTP/1.1 404 Not Found\r\n\r\n")
            return
        sock.sendall(b"HTTP/1.1 200 OK\r\nServer: xapi\r\nContent-Type: text/plain\r\n\r\nRFB 003.008\n")
        echo(sock)
    return behaviour


def fake_rfb_server(password, banner=b"RFB 003.008\n", types=(2,), fail_reason=b"wrong password"):
    """An RFB server announcing banner that follows the version the client answers, checks the
    DES response to its challenge, and after a ClientInit answers b"ServerInit"."""
    def behaviour(backend, sock):
        sock.sendall(banner)
        answered = recv_exactly(sock, 12)
        backend.received.append(answered)
        minor = int(answered[8:11])
        sock.sendall(struct.pack("!I", types[0]) if minor == 3 else bytes((len(types), *types)))
        if types in ((), (0,)):  # a refusal: the reason, then the server hangs up
            sock.sendall(struct.pack("!I", 7) + b"go away")
            return
        if 2 not in types:
            sock.recv(1)
            return
        if minor != 3:
            backend.received.append(recv_exactly(sock, 1))
        challenge = os.urandom(16)
        sock.sendall(challenge)
        passed = recv_exactly(sock, 16) == vncauth.vnc_auth_response(password, challenge)
        sock.sendall(struct.pack("!I", 0 if passed else 1))
        if not passed:
            if minor == 8 and fail_reason is not None:
                sock.sendall(struct.pack("!I", len(fail_reason)) + fail_reason)
            return
        backend.received.append(recv_exactly(sock, 1))  # ClientInit
        sock.sendall(b"ServerInit")
        sock.recv(1)
    return behaviour


SERVER_INIT = struct.pack("!HHBBBBHHHBBB3xI", 640, 480, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0, 4) + b"test"


def rfb_server_streaming(chunks, minor=8, answer=b"", server_init=SERVER_INIT):
    """An RFB server without security (type None) that, after ClientInit, sends SERVER_INIT and
    then each of chunks, and then waits for the client to leave; the client's bytes after the
    handshake go to backend.received, each read of them answered with `answer`."""
    def behaviour(backend, sock):
        sock.sendall(b"RFB 003.%03d\n" % minor)
        recv_exactly(sock, 12)
        if minor == 3:
            sock.sendall(struct.pack("!I", 1))
        else:
            sock.sendall(b"\x01\x01")
            recv_exactly(sock, 1)
            if minor == 8:
                sock.sendall(struct.pack("!I", 0))
        recv_exactly(sock, 1)  # ClientInit
        sock.sendall(server_init)
        for chunk in chunks:
            sock.sendall(chunk)
        while data := sock.recv(65536):
            backend.received.append(data)
            if answer:
                sock.sendall(answer)
    return behaviour


def echo(sock):
    while True:
        data = sock.recv(65536)
        if not data:
            return
        sock.sendall(data)


def token_id(token):
    """The 8 hex digits of a token's hash that logs and listings show."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


# -- TLS clients ----------------------------------------------------------------------------

def client_context(cert):
    context = ssl.create_default_context(cafile=cert)
    context.check_hostname = False  # the certificate names 127.0.0.1; the fingerprint is what we compare
    return context


# -- raw websocket requests, with frames that the websockets library builds and parses ---------

def raw_upgrade(port, token, version="13", extra=b"", source="127.0.0.1", cookie=None, path="/websockify",
                headers="", context=None, host="127.0.0.1"):
    """A websocket upgrade from source (any 127.0.0.0/8 address) to host, with a Cookie header when
    given; returns (socket, status line, bytes after the head)."""
    sock, status, _, rest = raw_upgrade_head(port, token, version, extra, source, cookie, path, headers, context,
                                             host)
    return sock, status, rest


def raw_upgrade_head(port, token, version="13", extra=b"", source="127.0.0.1", cookie=None, path="/websockify",
                     headers="", context=None, host="127.0.0.1"):
    """raw_upgrade's, returning (socket, status line, {lower-case header: value}, rest).
    headers: more header lines ("Name: value\r\n" each); token None: none in the query;
    context: an ssl.SSLContext to speak TLS with; host: the gateway's address."""
    sock = socket.create_connection((host, port), timeout=10, source_address=(source, 0))
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    cookie_line = f"Cookie: {cookie}\r\n" if cookie else ""
    query = f"?token={token}" if token is not None else ""
    sock.sendall(f"GET {path}{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                 f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 f"Sec-WebSocket-Version: {version}\r\n{cookie_line}{headers}\r\n".encode() + extra)
    head, rest = read_until_blank_line(sock)
    lines = head.decode("latin-1").split("\r\n")
    return sock, lines[0], response_headers(lines[1:]), rest


def raw_exchange(port, request, source="127.0.0.1", context=None):
    """Send request (bytes) as it is; returns (status line, {lower-case header: value}, rest)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    if context is not None:
        sock = context.wrap_socket(sock, server_hostname="127.0.0.1")
    with sock:
        sock.sendall(request)
        head, rest = read_until_blank_line(sock)
        lines = head.decode("latin-1").split("\r\n")
        headers = response_headers(lines[1:])
        length = headers.get("content-length", "")
        if length.isdigit() and not request.startswith(b"HEAD ") and len(rest) < int(length):
            rest += recv_exactly(sock, int(length) - len(rest))  # the body may come in later segments
    return lines[0], headers, rest


def response_headers(lines):
    """{lower-case name: value} of header lines; repeated names joined by ", "."""
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        headers[name] = f"{headers[name]}, {value.strip()}" if name in headers else value.strip()
    return headers


def frames_until(sock, rest, done):
    """Parse the gateway's frames with a websockets client protocol until done(frames) holds."""
    client = ClientProtocol(parse_uri("ws://127.0.0.1/"), state=State.OPEN, max_size=None)
    client.receive_data(rest)
    frames = client.events_received()
    while not done(frames):
        data = sock.recv(65536)
        assert data, "the gateway closed the connection early"
        client.receive_data(data)
        frames += client.events_received()
    return frames


def masked(opcode, payload, fin=True, rsv=0, length=None):
    """A client frame built by hand (mask key zero: the payload travels as it is)."""
    length = len(payload) if length is None else length
    first = (0x80 if fin else 0) | rsv | opcode
    if length < 126:
        head = bytes((first, 0x80 | length))
    elif length < 65536:
        head = struct.pack("!BBH", first, 0x80 | 126, length)
    else:
        head = struct.pack("!BBQ", first, 0x80 | 127, length)
    return head + b"\0\0\0\0" + payload


def payload_of(frames):
    return b"".join(frame.data for frame in frames if frame.opcode == Opcode.BINARY)


def banner_then_record(backend, sock):
    sock.sendall(b"RFB 003.008\n")
    while data := sock.recv(65536):
        backend.received.append(data)


# -- pictures and a real browser -------------------------------------------------------------

NOVNC = "/usr/share/novnc"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def bright_pixels(path):
    image = Image.open(path).convert("L")
    return sum(image.histogram()[129:]), image.size


def launch_chromium(playwright, extra_args=()):
    return playwright.chromium.launch(executable_path="/usr/bin/chromium", args=[*CHROMIUM_ARGS, *extra_args])


def wait_for_console_text(page, shot):
    """Wait until noVNC on page shows qemu's text (bright pixels on its canvas)."""
    canvas = page.locator("#noVNC_container canvas")

    def text_on_the_canvas():
        canvas.screenshot(path=shot, timeout=10_000)
        return bright_pixels(shot)[0] > 200
    wait_for(text_on_the_canvas, timeout=60, interval=0.5, message="SeaBIOS text in noVNC")
    assert page.evaluate("document.documentElement.classList.contains('noVNC_connected')")


def open_console_in_chromium(url, shot, extra_args=(), while_open=None):
    """Open an access URL as a user would, and wait for noVNC to show qemu's text. Then
    while_open(take), if given, where take() screenshots the canvas to shot again and returns it."""
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright, extra_args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda error: errors.append(error))
            page.goto(url)
            wait_for_console_text(page, shot)
            if while_open is not None:
                canvas = page.locator("#noVNC_container canvas")
                while_open(lambda: canvas.screenshot(path=shot, timeout=10_000) and shot)
            assert errors == []
            # Leave as a user does: the page closes its websocket (1001) with a close handshake,
            # where closing the browser at once may reset the connection instead.
            page.goto("about:blank")
        finally:
            browser.close()

# -- serial consoles ---------------------------------------------------------------------------

class SerialQemu:
    """Disk-less qemu without graphics whose serial port (and, with monitor=True, its HMP
    monitor) is a TCP server on 127.0.0.1. wait=True: qemu waits, before it boots, for the
    serial port's first client. serial_port= reuses a port (a restart of the same VM)."""

    def __init__(self, wait=True, monitor=False, serial_port=None):
        self.serial_port = serial_port or free_port()
        self.monitor_port = free_port() if monitor else None
        argv = ["qemu-system-x86_64", "-machine", "graphics=off", "-display", "none", "-nodefaults", "-m", "32",
                "-serial", f"tcp:127.0.0.1:{self.serial_port},server=on,wait={'on' if wait else 'off'}"]
        if monitor:
            argv += ["-monitor", f"tcp:127.0.0.1:{self.monitor_port},server=on,wait=off"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        wait_for(lambda: self._waiting() or self.proc.poll() is not None, 20, message="qemu's serial port")
        assert self.proc.poll() is None, f"qemu exited: {self.proc.stderr.read()}"

    def _waiting(self):
        with socket.socket() as probe:  # listening, without connecting (that would be its one client)
            try:
                probe.bind(("127.0.0.1", self.monitor_port or self.serial_port))
                return False
            except OSError:
                return True

    def stop(self):
        self.proc.kill()
        self.proc.wait(10)


def terminal_text(page):
    """Every line of the xterm.js terminal's buffer on the serial page, read through its API."""
    return page.evaluate("""() => {
        const buffer = window.vncgateTerminal.buffer.active, lines = [];
        for (let i = 0; i < buffer.length; i++) lines.push(buffer.getLine(i).translateToString(true));
        return lines.join("\\n");
    }""")


class SerialPages:
    """Chromium with `count` tabs on a serial console's access URL."""

    def __init__(self, url, count=1):
        self._playwright = sync_playwright().start()
        self.browser = self._playwright.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        self.errors = []
        self.pages = []
        self.websocket_urls = []  # what each tab's WebSocket asked for: its request line's target
        for _ in range(count):
            page = self.browser.new_page(viewport={"width": 1000, "height": 600})
            page.on("pageerror", lambda error: self.errors.append(error))
            page.on("websocket", lambda ws: self.websocket_urls.append(ws.url))
            page.goto(url)
            self.pages.append(page)

    def close(self):
        self.browser.close()
        self._playwright.stop()


class RedisServer:
    """A real redis-server on a loopback port, no persistence unless settings ask for it;
    kill() then start() is a restart on the same port and folder. sentinel=True runs it as
    redis-sentinel with a config file of those settings (Sentinel rewrites its file)."""

    def __init__(self, folder, port=None, sentinel=False, tls=None, password=None, **settings):
        """password: its requirepass (a Sentinel's own password, with sentinel=True)."""
        self.folder = str(folder)
        self.password = password
        self.port = port or free_port()
        self.sentinel = sentinel
        self.settings = settings if sentinel else {"save": "", "appendonly": "no", **settings}
        self.ca = tls[0] if tls else None  # tls: (cert, key) of a self-signed certificate
        if tls:
            self.settings.update({"port": "0", "tls_port": str(self.port), "tls_cert_file": tls[0],
                                  "tls_key_file": tls[1], "tls_ca_cert_file": tls[0], "tls_auth_clients": "no"})
        if password:
            self.settings["requirepass"] = password
        self.log_path = os.path.join(self.folder, f"redis-{self.port}.log")
        self.proc = None
        self.start()

    def start(self):
        config = os.path.join(self.folder, f"redis-{self.port}.conf")
        with open(config, "w") as handle:
            handle.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.folder}\nlogfile {self.log_path}\n")
            for key, value in self.settings.items():
                handle.write(f"{key.replace('_', '-')} {value or chr(34) * 2}\n")
        argv = ["redis-sentinel", config] if self.sentinel else ["redis-server", config]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.proc.poll() is not None or self.answers(), 10, message="redis to answer")
        assert self.proc.poll() is None, f"{argv[0]} exited: {self.log()}"

    def answers(self):
        import redis  # here, not at the top: the SQLite suite runs without redis (test_install)

        try:
            return self.client().ping()
        except redis.exceptions.RedisError:
            return False

    @property
    def url(self):
        if self.ca:
            return f"rediss://127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self):
        import redis

        tls = {"ssl": True, "ssl_ca_certs": self.ca} if self.ca else {}
        return redis.Redis(port=self.port, socket_timeout=5, socket_connect_timeout=1, password=self.password, **tls)

    def log(self):
        with open(self.log_path) as handle:
            return handle.read()

    def kill(self):
        self.proc.kill()
        self.proc.wait(10)

    def stop(self):
        if self.proc.poll() is None:
            self.kill()


class SentinelGroup:
    """A primary, one replica and one sentinel watching them as SERVICE (down after 500 ms)."""

    SERVICE = "vncgate"

    def __init__(self, folder, tls=None, sentinel_password=None):
        """tls: (cert, key) every server and the sentinel speak TLS with; sentinel_password: the
        sentinel's own requirepass."""
        self.tls, self.sentinel_password = tls, sentinel_password
        over_tls = {"tls_replication": "yes"} if tls else {}
        self.primary = RedisServer(folder, tls=tls)
        self.replica = RedisServer(folder, tls=tls, replicaof=f"127.0.0.1 {self.primary.port}", **over_tls)
        wait_for(lambda: self.replica.client().info("replication").get("master_link_status") == "up", 20,
                 message="the replica to sync")
        self.sentinel = RedisServer(folder, sentinel=True, tls=tls, password=sentinel_password, **over_tls, **{
            "sentinel monitor": f"{self.SERVICE} 127.0.0.1 {self.primary.port} 1",
            "sentinel down-after-milliseconds": f"{self.SERVICE} 500",
            "sentinel failover-timeout": f"{self.SERVICE} 5000",
            "sentinel parallel-syncs": f"{self.SERVICE} 1"})
        wait_for(lambda: self.sentinel.client().execute_command("SENTINEL", "REPLICAS", self.SERVICE), 20,
                 message="the sentinel to find the replica")

    @property
    def url(self):
        options = [f"ssl_ca_certs={self.tls[0]}"] if self.tls else []
        options += [f"sentinel_password={self.sentinel_password}"] if self.sentinel_password else []
        return (f"{'rediss' if self.tls else 'redis'}+sentinel://127.0.0.1:{self.sentinel.port}/{self.SERVICE}/0"
                + ("?" + "&".join(options) if options else ""))

    def primary_port(self):
        host, port = self.sentinel.client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
        return int(port)

    def stop(self):
        for server in (self.sentinel, self.replica, self.primary):
            server.stop()


def stored_bytes(database):
    """Every byte a store holds: its SQLite files, or every key, field and value in Redis."""
    if "://" not in database:
        folder, name = os.path.split(database)
        return b"".join(open(os.path.join(folder, item), "rb").read() for item in sorted(os.listdir(folder))
                        if item.startswith(name))
    import redis

    client = redis.Redis.from_url(database)
    readers = {b"hash": lambda key: b"".join(a + b for a, b in client.hgetall(key).items()),
               b"set": lambda key: b"".join(client.smembers(key)),
               b"zset": lambda key: b"".join(member for member in client.zrange(key, 0, -1)),
               b"string": client.get}
    return b"".join(key + readers[client.type(key)](key) for key in client.keys("*"))


def session_rows(database):
    """How many live-session records a store holds, stale ones included."""
    if "://" in database:
        import redis

        client = redis.Redis.from_url(database)
        return client.zcard("vncgate:sessions") + len(client.keys("vncgate:session:*"))
    with sqlite3.connect(database) as db:
        return db.execute("SELECT COUNT(*) FROM live_sessions").fetchone()[0]
# -- RFB as a client and as a recording server, for the console policies' tests ---------------------

RFB_U32 = struct.Struct("!I")


def rfb_client_handshake(sock, rest=b"", shared=1):
    """The client's side after an XVP 200, security type None (the gateway offers it): returns
    (width, height, bytes per pixel) from ServerInit."""
    banner = rest + recv_exactly(sock, 12 - len(rest))
    assert banner == b"RFB 003.008\n", banner
    sock.sendall(b"RFB 003.008\n")
    assert recv_exactly(sock, 2) == b"\x01\x01"  # one type: None
    sock.sendall(b"\x01")
    assert recv_exactly(sock, 4) == b"\0\0\0\0"
    sock.sendall(bytes((shared,)))
    width, height, bits = struct.unpack("!HHB", recv_exactly(sock, 5))
    recv_exactly(sock, 15)
    recv_exactly(sock, RFB_U32.unpack(recv_exactly(sock, 4))[0])  # the name
    return width, height, bits // 8


def framebuffer_update_request(incremental=False, width=640, height=480):
    return struct.pack("!BBHHHH", 3, int(incremental), 0, 0, width, height)


def read_framebuffer_update(sock, bytes_per_pixel):
    """One FramebufferUpdate of raw rectangles (what a server sends a client that asked for no
    encodings); returns the pixel bytes read."""
    header = recv_exactly(sock, 4)
    assert len(header) == 4 and header[0] == 0, header
    total = 0
    for _ in range(struct.unpack("!H", header[2:])[0]):
        _x, _y, width, height, encoding = struct.unpack("!HHHHi", recv_exactly(sock, 12))
        assert encoding == 0, encoding
        size = width * height * bytes_per_pixel
        while size:
            chunk = sock.recv(min(size, 1 << 20))
            assert chunk, "the server closed in the middle of an update"
            size -= len(chunk)
            total += len(chunk)
    return total


def recording_rfb_server(backend, sock):
    """An RFB 3.8 server with security None that records its client's ClientInit and every byte
    after it in backend.received (one bytes object, growing), until the client closes."""
    sock.sendall(b"RFB 003.008\n")
    recv_exactly(sock, 12)
    sock.sendall(b"\x01\x01")
    recv_exactly(sock, 1)
    sock.sendall(b"\0\0\0\0")
    backend.received.append(b"")
    index = len(backend.received) - 1
    first = True
    while True:
        data = sock.recv(65536)
        if not data:
            return
        backend.received[index] += data
        if first:  # ServerInit: 640x480, 32 bits per pixel, true colour, named "fake"
            sock.sendall(struct.pack("!HHBBBBHHHBBB3xI", 640, 480, 32, 24, 0, 1, 255, 255, 255, 16, 8, 0, 4)
                         + b"fake")
            first = False


class CuttableProxy:
    """A TCP forwarder on loopback to target_port whose live connections cut() ends at once,
    as a network blip would."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pairs = []
        self.request_lines = []  # each client connection's first line: what a front proxy logs
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                client, _ = self.listener.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            with self._lock:
                self.pairs.append((client, upstream))
            for source, sink, lines in ((client, upstream, self.request_lines), (upstream, client, None)):
                threading.Thread(target=self._pump, args=(source, sink, lines), daemon=True).start()

    @staticmethod
    def _pump(source, sink, lines=None):
        first = b""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if lines is not None and b"\n" not in first:
                    first += data
                    if b"\n" in first:
                        lines.append(first.split(b"\r\n")[0].decode("latin-1"))
                sink.sendall(data)
            sink.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def cut(self):
        with self._lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for sock in pair:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()

    def stop(self):
        self.listener.close()
        self.cut()




class ApiClient:
    """A control-plane API client with urllib only. Every response is kept, so that a test's
    teardown can check them all against the OpenAPI document (check_openapi)."""

    def __init__(self, port, key=None, host="127.0.0.1"):
        self.base = f"http://{host}:{port}"
        self.key = key
        self.responses = []  # (method, path, status, parsed body)

    def call(self, method, path, body=None, key="default", headers=None, data=None):
        """(status, headers, parsed JSON body) of one call; path is under /api/v1."""
        key = self.key if key == "default" else key
        request_headers = {**({"Authorization": f"Bearer {key}"} if key is not None else {}), **(headers or {})}
        if body is not None:
            data = json.dumps(body).encode()
            request_headers.setdefault("Content-Type", "application/json")
        request = urllib.request.Request(self.base + "/api/v1" + path, data=data, method=method,
                                         headers=request_headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, reply_headers, raw = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            status, reply_headers, raw = error.code, error.headers, error.read()
        assert reply_headers["Content-Type"] == "application/json", (status, raw)
        parsed = json.loads(raw)
        self.responses.append((method, path.partition("?")[0], status, parsed))
        return status, reply_headers, parsed


    def screenshot(self, token_id, query=""):
        """(status, headers, PNG bytes or the parsed JSON error) of GET /consoles/{token_id}/screenshot."""
        path = f"/consoles/{token_id}/screenshot{query}"
        request = urllib.request.Request(self.base + "/api/v1" + path, headers={"Authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                status, reply_headers, raw = response.status, response.headers, response.read()
        except urllib.error.HTTPError as error:
            status, reply_headers, raw = error.code, error.headers, error.read()
        body = raw if status == 200 else json.loads(raw)
        assert reply_headers["Content-Type"] == ("image/png" if status == 200 else "application/json"), status
        self.responses.append(("GET", path.partition("?")[0], status, body))
        return status, reply_headers, body


def check_openapi(responses):
    """Every (method, path, status, body) must be a response the OpenAPI document describes."""
    from openapi_schema_validator import OAS31Validator
    with open(os.path.join(REPO, "vncgate", "control", "openapi.json")) as handle:
        document = json.load(handle)
    templates = [(re.compile(re.sub(r"\\{[a-z_]+\\}", "[^/]+", re.escape(template)) + "$"), operations)
                 for template, operations in document["paths"].items()]
    for method, path, status, body in responses:
        operations = next((operations for pattern, operations in templates if pattern.match(path)), None)
        if operations is None or method.lower() not in operations:
            assert status in (404, 405), f"{method} {path} answered {status}, but the document has no such call"
            schema = document["components"]["schemas"]["Error"]
        else:
            described = operations[method.lower()]["responses"].get(str(status))
            assert described, f"{method} {path}: status {status} is not in the OpenAPI document"
            if "$ref" in described:
                described = document["components"]["responses"][described["$ref"].rsplit("/", 1)[1]]
            if "image/png" in described["content"]:
                assert isinstance(body, bytes) and body.startswith(b"\x89PNG\r\n\x1a\n"), (method, path)
                continue
            schema = described["content"]["application/json"]["schema"]
        OAS31Validator({**schema, "components": document["components"]}).validate(body)


def random_vnc_password():
    """8 characters (VNC Authentication's limit), letters and digits."""
    import secrets
    import string
    return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(8))


class LibvirtDomain:
    """A transient (or only defined) libvirt domain: type qemu, 32 MiB, no disk, VNC on 127.0.0.1."""

    def __init__(self, uri, folder, password=None, vnc=True):
        self.uri = uri
        self.name = f"vncgate-test-{os.getpid()}-{hashlib.sha256(os.urandom(8)).hexdigest()[:6]}"
        self.password = password
        graphics = (f"<graphics type='vnc' autoport='yes' listen='127.0.0.1'"
                    f"{f' passwd={chr(39)}{password}{chr(39)}' if password else ''}/>" if vnc else "")
        self.xml = os.path.join(str(folder), f"{self.name}.xml")
        with open(self.xml, "w") as handle:
            handle.write(f"""<domain type='qemu'>
  <name>{self.name}</name>
  <memory unit='MiB'>32</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    {graphics}
    <video><model type='vga'/></video>
  </devices>
</domain>
""")

    def virsh(self, *args):
        done = subprocess.run(["virsh", "--connect", self.uri, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def create(self):
        self.virsh("create", self.xml)

    def define(self):
        self.virsh("define", self.xml)

    def destroy(self):
        state = subprocess.run(["virsh", "--connect", self.uri, "domstate", self.name], capture_output=True,
                               text=True, timeout=60)
        if state.returncode == 0 and state.stdout.strip() == "running":
            self.virsh("destroy", self.name)
        if subprocess.run(["virsh", "--connect", self.uri, "dominfo", self.name], capture_output=True,
                          timeout=60).returncode == 0:
            self.virsh("undefine", self.name)


def http_get(port, path, source=None, timeout=10.0, headers=""):
    """(status line, body) of one GET (from the source address, if given); ("", b"") when the
    gateway closed without an answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                  source_address=(source, 0) if source else None) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: gateway\r\n{headers}\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode("latin-1"), body


def xvp_session(port, token):
    """An XVP session's socket, or None (closed) when the gateway did not answer 200."""
    sock, status, _ = xvp_connect(port, token)
    if status != "HTTP/1.1 200 OK":
        sock.close()
        return None
    return sock


# -- load balancers in front of gateways: real nginx and HAProxy, as the deployment docs configure them

def sbin(name):
    """A daemon's path: Debian installs nginx and haproxy in /usr/sbin, off a user's PATH."""
    return shutil.which(name) or os.path.join("/usr/sbin", name)


NGINX_SITE = """
map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
server {{
    listen {listen} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location / {{
        proxy_pass http://{upstream};
        proxy_http_version 1.1;
        proxy_set_header Upgrade $http_upgrade;
        proxy_set_header Connection $connection_upgrade;
        proxy_set_header Host $host;
        proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        proxy_set_header X-Forwarded-Proto $scheme;
        proxy_read_timeout 1h;
        proxy_buffering off;
    }}
}}
"""


class Nginx:
    """nginx (nginx-light) terminating TLS on a free port in front of one gateway, in its own prefix folder."""

    def __init__(self, folder, upstream_port, cert, key):
        self.folder = str(folder)
        self.port = free_port()
        self.error_log = os.path.join(self.folder, "nginx-error.log")
        temp = "".join(f"    {kind}_temp_path {self.folder}/{kind};\n"
                       for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        site = NGINX_SITE.format(listen=f"127.0.0.1:{self.port}", cert=cert, key=key,
                                 upstream=f"127.0.0.1:{upstream_port}")
        self.conf = os.path.join(self.folder, "nginx.conf")
        with open(self.conf, "w") as handle:
            handle.write(f"daemon off;\nworker_processes 1;\npid {self.folder}/nginx.pid;\n"
                         f"error_log {self.error_log} info;\nevents {{ worker_connections 256; }}\n"
                         f"http {{\n    access_log off;\n{temp}{site}}}\n")
        self.proc = subprocess.Popen([sbin("nginx"), "-p", self.folder, "-e", self.error_log, "-c", self.conf],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.proc.poll() is not None or port_open(self.port), 15, message="nginx to listen")
        assert self.proc.poll() is None, f"nginx exited: {open(self.error_log).read()}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)


HAPROXY_CONFIG = """
global
    stats socket {folder}/haproxy.sock mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout check 2s
    retries 3
    option redispatch
frontend consoles
    bind {listen}
    default_backend gateways
backend gateways
    balance roundrobin
    option httpchk GET /healthz
    http-check expect status 200
    default-server {proxy} check inter {interval} fall 1 rise 1 source {source}
{servers}
"""


class Haproxy:
    """HAProxy in TCP mode with send-proxy-v2 (or proxy="send-proxy": v1) in front of gateways (their
    ports), health-checking /healthz; its connections to them come from `source`."""

    def __init__(self, folder, gateway_ports, source="127.0.0.9", interval="300ms", proxy="send-proxy-v2"):
        self.folder = str(folder)
        self.port = free_port()
        self.socket_path = os.path.join(self.folder, "haproxy.sock")
        servers = "".join(f"    server gw{index} 127.0.0.1:{port}\n" for index, port in enumerate(gateway_ports))
        self.conf = os.path.join(self.folder, "haproxy.cfg")
        with open(self.conf, "w") as handle:
            handle.write(HAPROXY_CONFIG.format(folder=self.folder, listen=f"127.0.0.1:{self.port}",
                                               source=source, interval=interval, servers=servers,
                                               proxy=proxy))
        self.log = open(os.path.join(self.folder, "haproxy.log"), "w")
        self.proc = subprocess.Popen([sbin("haproxy"), "-db", "-f", self.conf], stdout=self.log, stderr=self.log)
        wait_for(lambda: self.proc.poll() is not None or port_open(self.port), 15, message="haproxy to listen")
        assert self.proc.poll() is None, "haproxy exited: see haproxy.log"

    def states(self):
        """{server name: its status ("UP", "DOWN", ...)} from the stats socket."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(self.socket_path)
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
        return {row[1]: row[17] for row in rows if row[0] == "gateways" and row[1] not in ("BACKEND",)}

    def wait_states(self, expected, timeout=15):
        wait_for(lambda: all(self.states().get(name, "").startswith(state) for name, state in expected.items()),
                 timeout, interval=0.05, message=f"haproxy to see {expected}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.log.close()
