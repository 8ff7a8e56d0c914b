"""vncdotool, the real VNC client, taught the XVP preamble the Java console clients speak."""

from vncdotool import api
from vncdotool.client import VNCDoToolClient, VNCDoToolFactory


class XvpVNCDoToolClient(VNCDoToolClient):
    """Sends CONNECT /console?token=T first; on 200 becomes a plain RFB client."""

    def connectionMade(self):
        super().connectionMade()
        self._xvp_head = b""
        self.transport.write(f"CONNECT {self.factory.xvp_target} HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())

    def dataReceived(self, data):
        if self._xvp_head is None:
            return super().dataReceived(data)
        self._xvp_head += data
        head, separator, rest = self._xvp_head.partition(b"\r\n\r\n")
        if not separator:
            return None
        if not head.startswith(b"HTTP/1.1 200 "):
            self.transport.loseConnection()
            return None
        self._xvp_head = None
        return super().dataReceived(rest) if rest else None


def xvp_client(port, token, timeout=30):
    """A vncdotool client connected through the gateway's XVP path (disconnect() it)."""
    factory = type("XvpFactory", (VNCDoToolFactory,), {"protocol": XvpVNCDoToolClient,
                                                       "xvp_target": f"/console?token={token}"})
    return api.connect(f"127.0.0.1::{port}", factory_class=factory, timeout=timeout)


def xvp_screenshot(port, token, path, timeout=30):
    """Connect through the gateway's XVP path and save a screenshot of the console."""
    client = xvp_client(port, token, timeout)
    try:
        client.captureScreen(path)
    finally:
        client.disconnect()


def shutdown():
    api.shutdown()
