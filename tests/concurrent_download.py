"""Two processes download one file into one cache at once; prints what happened as one JSON line.

Run as a script by test_weights.py. The server and both downloaders live in this process tree, not in
the test's xdist worker: run from inside a worker, the same scene took the worker down in the full suite.

The server sends the first half of the file and stalls until the second downloader has started, so the
second one asks while the first holds the file's lock halfway through the transfer.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

CHILD = """
import sys
from mixnet.pretrained.download import download
print("ready", flush=True)
print(download(sys.argv[1], sys.argv[2], sys.argv[3], progress=False), flush=True)
"""
TIMEOUT_S = 120


def main() -> None:
    data = os.urandom(3 << 20)
    requests, release = [], threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            requests.append(self.path)
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            release.wait(timeout=TIMEOUT_S)
            self.wfile.write(data[len(data) // 2:])

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "cache" / "weights.pth"
        args = [sys.executable, "-c", CHILD, f"http://127.0.0.1:{httpd.server_address[1]}/weights.pth", str(dest),
                hashlib.sha256(data).hexdigest()]

        def start():
            return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)

        children = [start()]
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while not requests and children[0].poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            children.append(start())
            second_ready = children[1].stdout.readline().strip() == "ready"
            time.sleep(1.0)  # the second is inside download() now, waiting for the first one's lock
            requests_while_stalled = len(requests)
            release.set()
            outputs = [child.communicate(timeout=TIMEOUT_S) for child in children]
        finally:
            release.set()
            for child in children:
                child.kill()
                child.wait()
        cache = sorted(p.name for p in dest.parent.iterdir() if not p.name.endswith(".lock"))
        print(json.dumps(dict(
            second_ready=second_ready, requests_while_stalled=requests_while_stalled, requests=len(requests),
            returncodes=[child.returncode for child in children],
            printed=[out.strip().splitlines()[-1:] for out, _ in outputs], errors=[err[-2000:] for _, err in outputs],
            dest=str(dest), intact=dest.is_file() and dest.read_bytes() == data, cache=cache)))
    httpd.shutdown()


if __name__ == "__main__":
    main()
