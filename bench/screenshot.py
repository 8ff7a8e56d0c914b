"""What one screenshot costs: a 1024x768 qemu console through the API, end to end.

Usage: python3 bench/screenshot.py [--count 200]

qemu boots a 34-byte boot sector that sets VBE mode 0x105 (1024x768, 8 bits per pixel)
and prints coloured text, so the console is 1024x768 (SeaBIOS's own text screen is
720x400). A gateway with the API on takes --count screenshots of it one after another
(GET /api/v1/consoles/{id}/screenshot, full size, then with ?max_width=320): the wall time
of each request as the client sees it (p50, p99) and the gateway's user+system CPU time
(from /proc) per screenshot.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from tests import harness  # noqa: E402

# mov ax,4F02h; mov bx,0105h; int 10h; then cx from 0: teletype (int 10h, ah=0Eh) of
# '!' + (cl & 3Fh) in colour cl, while cx < 6000; then hlt forever.
BOOT_CODE = bytes.fromhex("B8024FBB0501CD1031C988C8243F0421B40E88CB30FF51CD10594181F9701772E9F4EBFD")


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def measure(gateway, token_id, count, query=""):
    times, sizes = [], []
    cpu_before = gateway.cpu_seconds()
    for _ in range(count):
        started = time.perf_counter()
        status, _, body = gateway.api.screenshot(token_id, query)
        times.append(time.perf_counter() - started)
        assert status == 200, body
        sizes.append(len(body))
    cpu = gateway.cpu_seconds() - cpu_before
    return {"p50_ms": round(1000 * statistics.median(times), 1), "p99_ms": round(1000 * percentile(times, 0.99), 1),
            "gateway_cpu_ms_per_screenshot": round(1000 * cpu / count, 1), "png_bytes": statistics.median(sizes)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="vncgate-bench-screenshot-")
    disk = os.path.join(folder, "boot.img")
    with open(disk, "wb") as handle:
        handle.write(BOOT_CODE.ljust(510, b"\0") + b"\x55\xaa")
    machine = harness.Qemu(extra_args=("-drive", f"file={disk},format=raw,if=ide"))
    gateway = harness.start_api_gateway(folder, api_burst=100_000, api_rate=100_000)
    try:
        console = gateway.api.call("POST", "/consoles", {"host": "127.0.0.1", "port": machine.port})[2]
        harness.wait_for(lambda: gateway.api.screenshot(console["token_id"])[2][16:24] ==
                         (1024).to_bytes(4, "big") + (768).to_bytes(4, "big"), timeout=30, interval=0.5,
                         message="the 1024x768 mode")
        gateway.api.responses.clear()
        measure(gateway, console["token_id"], 5)  # warm-up
        results = {"full 1024x768": measure(gateway, console["token_id"], args.count),
                   "thumbnail max_width=320": measure(gateway, console["token_id"], args.count, "?max_width=320")}
    finally:
        gateway.stop()
        machine.stop()
    print(json.dumps({"count": args.count, **results}, indent=1))


if __name__ == "__main__":
    main()
