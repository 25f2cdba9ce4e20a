"""Load test of `mixnet serve` on loopback, side by side with in-process `mixnet.predict`.

For each server setting (dynamic batching on: --max-batch-size 16 --batch-timeout-ms 10; off:
--max-batch-size 1) it starts `mixnet serve` on a free 127.0.0.1 port, warms it up, then alternates
rounds of (a) in-process `mixnet.predict` on the example photos (files, decode included, predict's
default batch of 32, the same backend) and (b) CLIENTS concurrent HTTP clients posting the same photos
(raw JPEG bodies) until REQUESTS answers have come back, so both see the same machine load. It reports
errors (any answer that is not 200 with the in-process top-1 label), dropped requests, throughput of
each side and their ratio, p50/p95 latency, the resident memory of all the server's processes
after warm-up and after the run, and the CPU they use while idle (before the first request).
Bounded: REQUESTS per setting and --max-seconds per setting.

    pip install -e ".[serve]" aiohttp
    python benchmarks/serve_load.py [--requests 2000] [--clients 32] [--fast | --backend onnxruntime]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import torch

try:
    import aiohttp
except ImportError:
    sys.exit("serve_load.py needs an asyncio HTTP client: pip install aiohttp")

import mixnet
from mixnet.cli import inference_model

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.jpg"))
SETTINGS = {"batching on": ["--max-batch-size", "16", "--batch-timeout-ms", "10"],
            "batching off": ["--max-batch-size", "1"]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def session_processes(sid: int) -> list:
    """The server's processes: start_new_session made its pid the session id of all of them."""
    return subprocess.run(["ps", "-o", "pid=", "-s", str(sid)], capture_output=True, text=True).stdout.split()


def session_rss_mib(sid: int) -> float:
    """Resident memory of all the server's processes (HTTP, inference, multiprocessing's helpers), summed."""
    total = 0
    for pid in session_processes(sid):
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(status.split("VmRSS:")[1].split()[0]) if "VmRSS:" in status else 0
    return total / 1024


def session_cpu_s(sid: int) -> float:
    """CPU seconds used so far by all the server's processes."""
    total = 0.0
    for pid in session_processes(sid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
    return total


async def load(url: str, photos: list, expected: list, n: int, clients: int, deadline: float) -> dict:
    """``n`` POSTs from ``clients`` concurrent clients (photos in turn): latencies, errors, unsent."""
    latencies, errors, next_index = [], [], 0

    async def client(session):
        nonlocal next_index
        while next_index < n and time.monotonic() < deadline:
            i, next_index = next_index, next_index + 1
            k = i % len(photos)
            start = time.perf_counter()
            try:
                async with session.post(url, data=photos[k], headers={"Content-Type": "image/jpeg"}) as r:
                    answer = await r.json()
                    if r.status != 200 or answer["top"][0]["name"] != expected[k]:
                        errors.append(f"{r.status}: {answer}")
            except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                errors.append(repr(e))
            latencies.append(time.perf_counter() - start)

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients), timeout=timeout) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return dict(latencies=latencies, errors=errors, unsent=n - len(latencies))


def run_setting(name: str, server_args: list, args, model, forward, photos, expected) -> dict:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = (["--fast"] if args.fast else []) + ["--backend", args.backend,
                                                 "--threads", str(args.server_threads or args.threads)]
    proc = subprocess.Popen([sys.executable, "-m", "mixnet", "serve", "--port", str(port), *server_args, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        start_deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                sys.exit(f"mixnet serve exited with {proc.returncode}: {proc.stderr.read().decode()}")
            try:
                if urllib.request.urlopen(base + "/health", timeout=5).status == 200:
                    break
            except OSError:  # not listening yet, or 503 while the model warms up
                pass
            if time.monotonic() > start_deadline:
                sys.exit("mixnet serve did not become ready in 600 s")
            time.sleep(0.2)
        # idle, before any request: what a server waiting for work costs (its workers' queue polling)
        idle_cpu = session_cpu_s(proc.pid)
        time.sleep(args.idle_seconds)
        idle_cpu = session_cpu_s(proc.pid) - idle_cpu
        deadline = time.monotonic() + args.max_seconds
        warm = asyncio.run(load(base + "/predict", photos, expected, 8 * args.clients, args.clients, deadline))
        rss_warm = session_rss_mib(proc.pid)
        per_round = -(-args.requests // args.rounds)
        files = [EXAMPLES[i % len(EXAMPLES)] for i in range(args.baseline_images)]
        base_time = load_time = base_cpu = load_cpu = 0.0
        latencies, errors, unsent, sent = [], list(warm["errors"]), 0, 0
        for _ in range(args.rounds):
            t, c = time.perf_counter(), time.process_time()
            mixnet.predict(model, files, forward=forward)
            base_time += time.perf_counter() - t
            base_cpu += time.process_time() - c
            n = min(per_round, args.requests - sent)
            t, c = time.perf_counter(), session_cpu_s(proc.pid)
            result = asyncio.run(load(base + "/predict", photos, expected, n, args.clients, deadline))
            load_time += time.perf_counter() - t
            load_cpu += session_cpu_s(proc.pid) - c
            latencies += result["latencies"]
            errors += result["errors"]
            unsent += result["unsent"]
            sent += n
        rss_after = session_rss_mib(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
    served = len(latencies)
    in_process = args.rounds * args.baseline_images / base_time
    over_http = served / load_time
    return dict(setting=name, requests=served, errors=len(errors), first_errors=errors[:3], unsent=unsent,
                exit_code=code, in_process_img_s=round(in_process, 1), served_req_s=round(over_http, 1),
                ratio=round(over_http / in_process, 3),
                in_process_cpu_ms=round(1000 * base_cpu / (args.rounds * args.baseline_images), 1),
                served_cpu_ms=round(1000 * load_cpu / served, 1),
                p50_ms=round(1000 * float(np.percentile(latencies, 50)), 1),
                p95_ms=round(1000 * float(np.percentile(latencies, 95)), 1),
                rss_warm_mib=round(rss_warm), rss_after_mib=round(rss_after),
                rss_growth=round(rss_after / rss_warm - 1, 4), idle_cpu_s=round(idle_cpu, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000, help="timed requests per setting (default: 2000)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default: 32)")
    parser.add_argument("--rounds", type=int, default=4, help="alternations of in-process and HTTP (default: 4)")
    parser.add_argument("--baseline-images", type=int, default=192, help="in-process images per round")
    parser.add_argument("--max-seconds", type=float, default=900, help="per setting, after warm-up (default: 900)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads, in process and in the server's worker (default: 1; on a shared 2-core "
                             "machine two threads spin against the other load and both sides slow down erratically)")
    parser.add_argument("--server-threads", type=int, help="threads of the server's worker (default: --threads)")
    parser.add_argument("--idle-seconds", type=float, default=10,
                        help="CPU of the idle server is measured over this long before the load (default: 10)")
    parser.add_argument("--fast", action="store_true")
    parser.add_argument("--backend", choices=["torch", "onnxruntime"], default="torch")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--json", metavar="FILE", help="also write the results here")
    args = parser.parse_args()
    # a timeout's SIGTERM still stops the server (run_setting's finally), which lives in its own session
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"serve_load.py: stopped by signal {signum}"))

    torch.set_num_threads(args.threads)
    model, forward = inference_model(argparse.Namespace(model=None, weights=None, fast=args.fast,
                                                        backend=args.backend, onnx=None))
    photos = [p.read_bytes() for p in EXAMPLES]
    expected = [p.top[0].name for p in mixnet.predict(model, EXAMPLES, topk=1, forward=forward)]
    mixnet.predict(model, EXAMPLES * 6, forward=forward)  # warm the in-process side too
    backend = args.backend + (" --fast" if args.fast else "")
    threads = f"{args.threads} thread(s)" + (f", server {args.server_threads}" if args.server_threads else "")
    print(f"| setting ({backend}, {threads}, {args.clients} clients) | requests | errors | unsent | "
          f"in-process img/s | served req/s | ratio | CPU ms/img in-process / served | p50 ms | p95 ms | "
          f"RSS warm / after MiB | idle CPU s in {args.idle_seconds:g} s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|", flush=True)
    results = []
    for name in args.settings:  # each row as soon as it is measured
        r = run_setting(name, SETTINGS[name], args, model, forward, photos, expected)
        results.append(r)
        print(f"| {r['setting']} | {r['requests']} | {r['errors']} | {r['unsent']} | {r['in_process_img_s']} | "
              f"{r['served_req_s']} | {r['ratio']:.2f} | {r['in_process_cpu_ms']} / {r['served_cpu_ms']} | "
              f"{r['p50_ms']} | {r['p95_ms']} | "
              f"{r['rss_warm_mib']} / {r['rss_after_mib']} ({100 * r['rss_growth']:+.1f}%) | {r['idle_cpu_s']} |",
              flush=True)
    for r in results:
        if r["first_errors"]:
            print(f"{r['setting']}: first errors: {r['first_errors']}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(backend=backend, threads=args.threads, clients=args.clients,
                                                   results=results), indent=2))


if __name__ == "__main__":
    main()
