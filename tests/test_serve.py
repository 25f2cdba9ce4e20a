"""`mixnet serve`: answers equal mixnet.predict's, hostile input gets a 4xx JSON error and the service goes on,
concurrent requests all succeed, metrics, /info, the page, a clean stop and a taken port.

One server (a subprocess on a free loopback port) serves the module; the shutdown test starts its own.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mixnet
from conftest import HEAVY
from mixnet.serve import app
from serve_process import EXAMPLES, free_port, running_server

pytestmark = HEAVY

MAX_BODY_MB = 1  # small, so that the oversized upload is cheap to send


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("serve"), "--max-batch-size", "8", "--batch-timeout-ms", "50",
                        "--max-body-mb", str(MAX_BODY_MB)) as s:
        yield s


@pytest.fixture(scope="module")
def expected():
    """mixnet.predict's answers for the example photos, in process, with the same default model."""
    model = mixnet.load_model(mixnet.DEFAULT_TAG).eval()
    return {p.source: p for p in mixnet.predict(model, EXAMPLES, topk=5)}


def multipart(fields: dict, boundary: str = "mixnet-test-boundary") -> tuple:
    """``(body, content_type)``; ``fields`` maps a name to ``(filename or None, bytes)``."""
    parts = []
    for name, (filename, data) in fields.items():
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        parts.append(f"--{boundary}\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels but holds almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def metric_samples(server) -> dict:
    """``{(name, frozenset(labels)): value}`` from /metrics."""
    status, headers, body = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}


def assert_same_predictions(answer: dict, expected_prediction) -> None:
    assert answer["model"] == mixnet.DEFAULT_TAG
    got = answer["top"]
    assert [(p["name"], p["index"]) for p in got] == [(s.name, s.index) for s in expected_prediction.top]
    # a different batch size may change the last float bits of a convolution, nothing more
    assert [p["probability"] for p in got] == pytest.approx([s.probability for s in expected_prediction.top],
                                                             abs=1e-5)


def assert_served_normally(server, expected) -> None:
    assert server.health() == 200
    status, answer = server.post_image(EXAMPLES[0].read_bytes())
    assert status == 200
    assert_same_predictions(answer, expected[str(EXAMPLES[0])])


def test_health_answers_503_while_the_model_loads_and_200_once_it_is_warmed(server):
    assert 503 in server.health_codes
    assert server.health_codes[-1] == 200


@pytest.mark.parametrize("form", ["raw body", "multipart field file"])
def test_answers_for_the_example_photos_equal_mixnet_predict(server, expected, form):
    for path in EXAMPLES:
        data = path.read_bytes()
        if form == "raw body":
            status, answer = server.post_image(data, "image/jpeg")
        else:
            status, answer = server.post_image(*multipart({"file": (path.name, data)}))
        assert status == 200, answer
        assert_same_predictions(answer, expected[str(path)])


TENCH = EXAMPLES[-1].read_bytes()
NO_FILE_FIELD, NO_FILE_FIELD_TYPE = multipart({"photo": ("tench.jpg", TENCH)})
FILE_FIELD, FILE_FIELD_TYPE = multipart({"file": ("tench.jpg", TENCH)})
EPS = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\nnewpath 0 0 moveto 64 64 lineto stroke\nshowpage\n"
HOSTILE = {
    # name: (method, path, body, headers, status, words the error must contain)
    "not an image": ("POST", "/predict", b"hello, this is text", {"Content-Type": "image/png"}, 415, "not an image"),
    "empty body": ("POST", "/predict", b"", {"Content-Type": "image/jpeg"}, 400, "empty"),
    "truncated file": ("POST", "/predict", TENCH[: len(TENCH) // 2], {"Content-Type": "image/jpeg"}, 400, "truncated"),
    "decompression bomb": ("POST", "/predict", png_header(30000, 30000), {"Content-Type": "image/png"}, 413,
                           "pixels"),
    "body over the size limit": ("POST", "/predict", b"\xff" * (MAX_BODY_MB * 2**20 + 1),
                                 {"Content-Type": "image/jpeg"}, 413, "limit"),
    "body over the size limit, chunked": ("POST", "/predict", [b"\xff" * 2**16] * (MAX_BODY_MB * 16 + 1),
                                          {"Content-Type": "image/jpeg"}, 413, "limit"),
    "wrong method": ("GET", "/predict", None, {}, 405, "GET"),
    "wrong method, PUT": ("PUT", "/predict", TENCH, {"Content-Type": "image/jpeg"}, 405, "PUT"),
    "wrong content type": ("POST", "/predict", b'{"image": "tench.jpg"}', {"Content-Type": "application/json"},
                           415, "application/json"),
    "no content type": ("POST", "/predict", TENCH, {"Content-Type": ""}, 415, "content type"),
    "multipart without a file field": ("POST", "/predict", NO_FILE_FIELD, {"Content-Type": NO_FILE_FIELD_TYPE}, 400,
                                       "'file'"),
    "malformed multipart": ("POST", "/predict", b"--x\r\nnonsense", {"Content-Type": "multipart/form-data"}, 400,
                            "multipart"),
    "multipart cut off in its file field": ("POST", "/predict", FILE_FIELD[: len(FILE_FIELD) // 2],
                                            {"Content-Type": FILE_FIELD_TYPE}, 400, "ends before the closing boundary"),
    "PostScript, which Pillow decodes by running Ghostscript": ("POST", "/predict", EPS, {"Content-Type": "image/x-eps"},
                                                                415, "(EPS;"),
    "unknown endpoint": ("GET", "/admin", None, {}, 404, "/admin"),
    # no redirect to the path without the slash: its Location would echo the client's Host header
    "trailing slash": ("POST", "/predict/", TENCH, {"Content-Type": "image/jpeg"}, 404, "/predict/"),
    "trailing slash, forged Host": ("GET", "/info/", None, {"Host": "evil.example"}, 404, "/info/"),
}


@pytest.mark.parametrize("case", HOSTILE)
def test_each_hostile_input_gets_its_4xx_json_error_and_the_service_goes_on(server, expected, case):
    method, path, body, headers, expected_status, words = HOSTILE[case]
    status, response_headers, raw = server.request(method, path, body, headers)
    assert status == expected_status, raw
    assert response_headers["content-type"] == "application/json"
    answer = json.loads(raw)
    assert list(answer) == ["error"] and words in answer["error"]
    assert "Traceback" not in answer["error"]
    assert_served_normally(server, expected)


def test_a_malformed_http_request_is_refused_by_uvicorn_and_the_service_goes_on(server, expected):
    # uvicorn's HTTP parser answers these itself (plain text), before the application sees them
    status, _, raw = server.request("POST", "/predict", TENCH, {"Content-Type": "image/jpeg", "Content-Length": "-5"})
    assert status == 400 and b"Traceback" not in raw
    assert_served_normally(server, expected)


def test_a_client_that_disconnects_mid_upload_is_counted_and_the_service_goes_on(server, expected):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
        s.sendall(TENCH[:1000])
    key = ("mixnet_serve_errors_total", frozenset({("kind", "client_disconnected")}))
    deadline = time.monotonic() + 30
    while metric_samples(server).get(key, 0) < 1:
        assert time.monotonic() < deadline, "the disconnect was never counted"
        time.sleep(0.1)
    assert_served_normally(server, expected)


def test_an_upload_that_stalls_gets_408_and_its_connection_closed_and_the_service_goes_on(server, expected):
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\nContent-Type: image/jpeg\r\nContent-Length: 100000\r\n\r\n")
        s.sendall(TENCH[:3])
        s.settimeout(app.BODY_IDLE_TIMEOUT_S + 30)
        answer = b""
        while chunk := s.recv(65536):  # until the server closes the connection
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and b"timed out after 3 bytes" in body
    assert_served_normally(server, expected)


def test_a_body_that_trickles_in_gets_408_once_its_time_is_up(monkeypatch):
    """Each byte in time for the pause allowed, but the whole too slow: the total deadline ends it."""
    monkeypatch.setattr(app, "BODY_TIMEOUT_S", 0.5)

    async def trickle():
        await asyncio.sleep(0.05)
        return {"type": "http.request", "body": b"x", "more_body": True}

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-type", b"image/jpeg")]}

    async def read():
        return await asyncio.wait_for(app.read_body(app.Request(scope, trickle), 2**20), 5)

    with pytest.raises(app.RequestError) as refused:
        asyncio.run(read())
    assert refused.value.status_code == 408 and refused.value.headers == {"Connection": "close"}


def test_connections_over_the_limit_get_503_and_the_service_goes_on(server, expected):
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(app.MIN_CONNECTIONS)]
    try:
        assert server.health() == 503
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 30
    while server.health() != 200:  # the server notices the closed connections
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert_served_normally(server, expected)


@pytest.mark.parametrize("path", ["/", "/health", "/info", "/metrics"])
def test_head_is_answered_wherever_get_is(server, path):
    status, headers, body = server.request("HEAD", path)
    assert status == 200 and body == b""
    assert headers.get("content-type") == server.request("GET", path)[1].get("content-type")


def test_urls_sent_by_clients_are_never_fetched(server):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/photo.jpg".encode()
        attempts = [(url, "image/jpeg"), (url, "text/uri-list"), (b'{"url": "%s"}' % url, "application/json"),
                    multipart({"file": (None, url)}), multipart({"url": (None, url)})]
        for body, content_type in attempts:
            status, _ = server.post_image(body, content_type)
            assert 400 <= status < 500
        listener.settimeout(1.0)
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody came for the URL


def test_64_concurrent_requests_from_16_threads_all_succeed_and_are_batched(server, expected):
    before = metric_samples(server)
    photos = [EXAMPLES[i % len(EXAMPLES)] for i in range(64)]
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda p: server.post_image(p.read_bytes()), photos))
    for path, (status, answer) in zip(photos, results):
        assert status == 200, answer
        assert_same_predictions(answer, expected[str(path)])
    after = metric_samples(server)
    images = after[("mixnet_serve_batch_size_sum", frozenset())] - before[("mixnet_serve_batch_size_sum", frozenset())]
    batches = (after[("mixnet_serve_batch_size_count", frozenset())]
               - before[("mixnet_serve_batch_size_count", frozenset())])
    assert images == 64 and batches < 64  # some requests shared a batch


def test_metrics_count_requests_errors_by_kind_and_latency(server):
    before = metric_samples(server)
    server.post_image(TENCH)
    server.post_image(b"", "image/jpeg")
    after = metric_samples(server)

    def grew(name, **labels):
        key = (name, frozenset(labels.items()))
        return after.get(key, 0) - before.get(key, 0)

    assert grew("mixnet_serve_requests_total", endpoint="/predict", code="200") == 1
    assert grew("mixnet_serve_requests_total", endpoint="/predict", code="400") == 1
    assert grew("mixnet_serve_errors_total", kind="empty_body") == 1
    assert grew("mixnet_serve_predict_latency_seconds_count") == 2
    assert grew("mixnet_serve_predict_latency_seconds_sum") > 0


def test_info_gives_the_served_models_card_and_its_preprocessing(server):
    from mixnet.info import model_card

    status, _, body = server.request("GET", "/info")
    info = json.loads(body)
    assert status == 200 and info["model"] == mixnet.DEFAULT_TAG
    # what `mixnet info mixnet_s.imagenette --json` prints: the served model's size, not the 1,000-class one
    assert info["card"] == json.loads(json.dumps(model_card(mixnet.DEFAULT_TAG)))
    served = mixnet.load_model(mixnet.DEFAULT_TAG)
    assert info["card"]["params"] == sum(p.numel() for p in served.parameters()) < 3_000_000
    assert info["card"]["num_classes"] == 10 and info["card"]["input_size"] == [3, 176, 176]
    # the built-in model's weights are evaluated at 176 px: resize to floor(176 / 0.875) = 201, crop 176
    assert info["preprocessing"] == dict(input_size=[3, 176, 176], resize_size=201, crop_size=176, crop_pct=0.875,
                                         interpolation="bicubic", mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
    assert info["classes"][0] == "tench" and len(info["classes"]) == 10
    assert info["serving"]["max_batch_size"] == 8
    assert info["serving"]["precision"] == "fp32" and info["serving"]["backend"] == "torch"


def test_a_quantized_folder_is_served_as_int8_under_its_folder_name_never_its_path(weights_dir, tmp_path):
    from mixnet.cli import build_parser
    from mixnet.inference.predict import resolve_model

    folder = shutil.copytree(weights_dir, tmp_path / "home" / "alice" / "q1")
    (folder / "quantization.json").write_text(json.dumps({"backend": "onnxruntime", "graph": "model_int8.onnx"}))
    args = build_parser().parse_args(["serve", str(folder)])
    args.model, args.weights = args.source, None  # as cmd_serve hands them to serve()
    model = resolve_model(args.model)
    name = app.model_name_of(model, args.model)
    info = app.describe_service(model, name, args, threads=1)
    assert name == "q1" and info["model"] == "q1" and str(tmp_path) not in json.dumps(info)
    assert info["card"]["params"] == sum(p.numel() for p in model.parameters())
    assert info["card"]["num_classes"] == len(info["classes"]) == model.num_classes
    assert info["serving"]["precision"] == "int8" and info["serving"]["backend"] == "onnxruntime"


def test_the_page_is_served_at_the_root_and_loads_nothing_from_elsewhere(server):
    status, headers, body = server.request("GET", "/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert 'fetch("/predict"' in page and 'type="file"' in page
    assert "http://" not in page and "https://" not in page and "//cdn" not in page


def test_a_taken_port_is_a_one_line_error_with_exit_code_2(server):
    result = subprocess.run([sys.executable, "-m", "mixnet", "serve", "--port", str(server.port)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and f"127.0.0.1:{server.port}" in result.stderr
    assert "in use" in result.stderr


def test_a_model_option_that_cannot_work_is_a_one_line_error_before_the_server_starts(tmp_path):
    missing = tmp_path / "missing.onnx"
    result = subprocess.run([sys.executable, "-m", "mixnet", "serve", "--port", str(free_port()), "--backend",
                             "onnxruntime", "--onnx", str(missing)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and str(missing) in result.stderr
    assert "http://" not in result.stdout  # it never announced a server


@pytest.mark.parametrize("value", ["1e308", "1e7"])
def test_a_body_limit_too_large_to_mean_anything_is_a_usage_error_not_an_overflow_traceback(value, capsys):
    from mixnet.cli import build_parser

    with pytest.raises(SystemExit) as refused:
        build_parser().parse_args(["serve", "--max-body-mb", value])  # 1e308 MB in bytes overflowed int()
    assert refused.value.code == 2 and "--max-body-mb" in capsys.readouterr().err


def test_a_missing_serve_extra_is_a_one_line_error_naming_the_pip_command():
    code = ("import sys; sys.modules['litserve'] = None; from mixnet.cli import main; "
            "sys.exit(main(['serve']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and 'pip install "mixnet[serve]"' in result.stderr


@pytest.mark.parametrize("to", ["the main process", "the whole process group"])
def test_sigterm_finishes_the_requests_in_flight_then_stops_every_process(tmp_path, to):
    # a long batch timeout holds the requests inside the server when the signal arrives
    with running_server(tmp_path, "--max-batch-size", "64", "--batch-timeout-ms", "1500") as s:
        results = []
        threads = [threading.Thread(target=lambda: results.append(s.post_image(TENCH)[0])) for _ in range(6)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert s.stop(group=to == "the whole process group") == 0, s.log.read_text()[-3000:]
        assert "Traceback" not in s.log.read_text()
        for t in threads:
            t.join(60)
        assert results == [200] * 6
        # start_new_session made the server's pid its session id: nothing of that session may be left
        # (multiprocessing's resource tracker ends by itself a moment after the main process)
        deadline = time.monotonic() + 30
        while left := subprocess.run(["ps", "-o", "pid=,args=", "-s", str(s.proc.pid)], capture_output=True,
                                     text=True).stdout.strip():
            assert time.monotonic() < deadline, f"still running after the server stopped: {left}"
            time.sleep(0.2)


def test_an_idle_worker_waits_on_its_request_queue_instead_of_polling_it_every_millisecond():
    import queue
    import types

    class CountingQueue(queue.Queue):
        gets = 0

        def get(self, block=True, timeout=None):
            self.gets += 1
            return super().get(block, timeout)

    lit_api = types.SimpleNamespace(max_batch_size=4, batch_timeout=0.05, request_timeout=30, stream=False)
    loop, requests = app.WaitingBatchedLoop(), CountingQueue()
    loop._restart_workers = False  # as LitServe's worker sets it
    # LitServe's own batched loop asks an empty queue about once a millisecond for the batch timeout (50 here)
    assert loop.get_batch_requests(lit_api, requests, transport=None) == ([], [])
    assert requests.gets == 1
    for uid in "abcde":  # five waiting requests: a full batch of four in their order, then the fifth
        requests.put((0, uid, time.monotonic(), f"body {uid}"))
    batch, timed_out = loop.get_batch_requests(lit_api, requests, transport=None)
    assert [uid for _, uid, _ in batch] == list("abcd") and timed_out == []
    assert [uid for _, uid, _ in loop.get_batch_requests(lit_api, requests, transport=None)[0]] == ["e"]
