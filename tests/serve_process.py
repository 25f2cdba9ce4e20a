"""``mixnet serve`` in a subprocess on a free loopback port, for test_serve.py and test_serve_page.py."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.jpg"))
START_TIMEOUT_S = 300  # a cold start on 2 busy cores: interpreters, torch, the model, the warm-up


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A running ``mixnet serve``: its process, URL and log, and small HTTP helpers."""

    def __init__(self, proc: subprocess.Popen, port: int, log: Path):
        self.proc, self.port, self.log = proc, port, log
        self.url = f"http://127.0.0.1:{port}"
        self.health_codes: List[Optional[int]] = []  # what /health answered while starting

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 60) -> Tuple[int, dict, bytes]:
        """``(status, headers, body)``; a body that is an iterable of bytes goes out chunked."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {},
                         encode_chunked=body is not None and not isinstance(body, (bytes, str)))
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            conn.close()

    def post_image(self, data: bytes, content_type: str = "image/jpeg") -> Tuple[int, dict]:
        status, _, body = self.request("POST", "/predict", data, {"Content-Type": content_type})
        return status, json.loads(body)

    def health(self) -> Optional[int]:
        try:
            return self.request("GET", "/health", timeout=5)[0]
        except OSError:
            return None  # not listening yet

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mixnet serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            code = self.health()
            self.health_codes.append(code)
            if code == 200:
                return
            time.sleep(0.05)
        raise RuntimeError(f"mixnet serve not ready after {START_TIMEOUT_S} s:\n{self.log.read_text()}")

    def stop(self, timeout: float = 120, group: bool = False) -> int:
        """SIGTERM to the main process, or with ``group`` to its whole process group (as systemd and
        `timeout` send it), and the exit code."""
        if self.proc.poll() is None:
            if group:
                os.killpg(self.proc.pid, signal.SIGTERM)  # start_new_session: its pid is its group's id
            else:
                self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own group: the workers go too
            self.proc.wait()
            raise


@contextlib.contextmanager
def running_server(log_dir: Path, *args: str) -> Iterator[Server]:
    """``mixnet serve ARGS`` on a free port, ready (``/health`` 200); stopped with SIGTERM afterwards."""
    port = free_port()
    log = log_dir / f"serve-{port}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mixnet", "serve", "--port", str(port), *args],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(proc, port, log)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
