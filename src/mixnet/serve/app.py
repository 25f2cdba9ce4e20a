"""Predictions over HTTP on LitServe (FastAPI + uvicorn), with dynamic batching: ``mixnet serve``.

Processes: the main process loads the model once (a bad model is a one-line error before anything
starts; the model card for ``/info`` comes from it), binds the port and supervises. One HTTP process
(uvicorn) reads and checks request bodies and answers every endpoint; ``--workers`` inference
processes each load the model, warm it up, and classify batches of up to ``--max-batch-size``
requests gathered for at most ``--batch-timeout-ms``. Metrics are all counted in the HTTP process.

Hostile input is refused where it is cheapest: method, content type, size and emptiness in the HTTP
process, before anything reaches a worker; the image itself, once its header names a format of photos
(``UPLOAD_FORMATS``), is decoded in the worker by the code ``mixnet.predict`` uses (``load_image``: the
pixel limit is checked from the header before any decoding), and a bad image comes back as an error
*value* for its own request, because an exception inside a LitServe batch would fail every request of
that batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import socket
import tempfile
import threading
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from ..errors import MixNetError

try:
    import litserve as ls
    import python_multipart  # noqa: F401  (starlette parses multipart bodies with it)
    from fastapi import HTTPException, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from litserve.loops.simple_loops import BatchedLoop
    from litserve.server import RegularRequestHandler
    from litserve.utils import WorkerSetupStatus
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, ProcessCollector
    from prometheus_client import generate_latest
    from python_multipart.multipart import parse_options_header
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.requests import ClientDisconnect
except ImportError as e:
    raise MixNetError(f'mixnet serve needs the serving extra ({e.name} is not installed): '
                      f'pip install "mixnet[serve]"') from None

PREDICT_PATH = "/predict"
ENDPOINTS = ("/", "/health", "/info", "/metrics", PREDICT_PATH)
# LitServe binds only these (all IPv4 interfaces, this machine only, all IPv6 interfaces).
HOSTS = ("127.0.0.1", "0.0.0.0", "::")
MULTIPART_FIELD = "file"
# An upload must keep coming and end in time: a client that stalls mid-body would otherwise hold its
# connection, and the part of the body it sent, for as long as it likes, and hold up a graceful stop.
# A pause of 10 s is far beyond any live connection's; 60 s is 20 MB (--max-body-mb) at 2.7 Mbit/s.
BODY_IDLE_TIMEOUT_S = 10.0
BODY_TIMEOUT_S = 60.0
# The fewest connections uvicorn serves at once (serve() allows two full batches per worker, one running
# and one gathering, where that is more); it answers 503 to more, so that the bodies held in memory stay
# under that many times --max-body-mb.
MIN_CONNECTIONS = 64
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


class RequestError(HTTPException):
    """A request refused with a 4xx status: ``kind`` labels it in /metrics, the detail names the problem;
    ``close`` ends the connection after the answer (the rest of the body is never read)."""

    def __init__(self, status: int, kind: str, message: str, close: bool = False):
        super().__init__(status_code=status, detail=message, headers={"Connection": "close"} if close else None)
        self.kind = kind


# ------------------------------------------------------------------------------------------ request bodies


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole request body, refused as soon as it is known to be over ``max_bytes`` (from
    Content-Length, or while streaming a chunked upload), when the client goes away mid-upload, and when
    it pauses for over ``BODY_IDLE_TIMEOUT_S`` or is not done in ``BODY_TIMEOUT_S`` (408)."""
    declared = request.headers.get("content-length")  # uvicorn has refused any that is not a number
    if declared is not None:
        if int(declared) > max_bytes:
            raise RequestError(413, "body_too_large", f"the body of {int(declared):,} bytes is over the limit of "
                                                      f"{max_bytes:,} bytes (--max-body-mb)")
    parts, size = [], 0
    stream = request.stream()
    deadline = time.monotonic() + BODY_TIMEOUT_S
    try:
        while True:
            try:
                chunk = await asyncio.wait_for(anext(stream), min(BODY_IDLE_TIMEOUT_S, deadline - time.monotonic()))
            except StopAsyncIteration:
                break
            size += len(chunk)
            if size > max_bytes:
                raise RequestError(413, "body_too_large", f"the body is over the limit of {max_bytes:,} bytes "
                                                          f"(--max-body-mb)")
            parts.append(chunk)
    except ClientDisconnect:
        raise RequestError(400, "client_disconnected", f"the client disconnected after {size:,} bytes, before "
                                                       f"the upload finished") from None
    except asyncio.TimeoutError:
        raise RequestError(408, "body_timeout", f"the upload timed out after {size:,} bytes: the body must keep "
                                                f"coming (pauses under {BODY_IDLE_TIMEOUT_S:g} s) and end within "
                                                f"{BODY_TIMEOUT_S:g} s", close=True) from None
    return b"".join(parts)


async def multipart_file(request: Request, body: bytes) -> bytes:
    """The bytes of the multipart field ``file``."""
    async def chunks():
        yield body

    try:
        form = await MultiPartParser(request.headers, chunks(), max_files=1, max_fields=16).parse()
    except MultiPartException as e:
        raise RequestError(400, "bad_multipart", f"malformed multipart/form-data body: {e.message}") from None
    # The parser stops quietly where the body does and drops a part cut off before its boundary: a body
    # without its closing boundary was cut short, and is refused as that, not as one without the field.
    closing = b"--" + parse_options_header(request.headers["content-type"])[1][b"boundary"] + b"--"
    try:
        if closing not in body:
            raise RequestError(400, "bad_multipart", f"malformed multipart/form-data body: it ends before the "
                                                     f"closing boundary {closing.decode('latin-1')}")
        upload = form.get(MULTIPART_FIELD)
        if upload is None or isinstance(upload, str):
            raise RequestError(400, "missing_file_field", f"multipart/form-data without a file field named "
                                                          f"{MULTIPART_FIELD!r} (curl -F {MULTIPART_FIELD}=@photo.jpg)")
        return await upload.read()
    finally:
        await form.close()


async def read_image_upload(request: Request, max_bytes: int) -> bytes:
    """The image bytes of a /predict request: the raw body (``image/*`` or
    ``application/octet-stream``) or the multipart field ``file``. The bytes are never interpreted as
    anything but an image: a URL sent by a client is never fetched."""
    kind = media_type(request)
    if not (kind == "multipart/form-data" or kind.startswith("image/") or kind == "application/octet-stream"):
        raise RequestError(415, "unsupported_content_type",
                           f"content type {kind or '(none)'!r} is not accepted: send the image as the body "
                           f"(image/* or application/octet-stream) or as the multipart/form-data field "
                           f"{MULTIPART_FIELD!r}")
    data = await read_body(request, max_bytes)
    if kind == "multipart/form-data":
        data = await multipart_file(request, data)
    if not data:
        raise RequestError(400, "empty_body", "empty image: the upload has no bytes")
    return data


# ------------------------------------------------------------------------------------------ inference worker


def image_error(problem: str) -> Dict[str, Any]:
    """The error answer for an upload ``load_image`` refused; ``problem`` is its message (its wording
    tells the cases apart: tests/test_serve.py checks each one)."""
    if problem.startswith("refused"):
        status, kind = 413, "too_many_pixels"
    elif problem.startswith("not an image"):
        status, kind = 415, "not_an_image"
    else:
        status, kind = 400, "corrupt_image"
    return dict(error=f"the uploaded image: {problem}", kind=kind, status=status)


# The formats an upload may be in, as Pillow names them: those of photos (the suffixes mixnet.data reads).
# Any other is refused from its header, before decoding: Pillow decodes EPS by running Ghostscript on the
# bytes, and its rarer decoders are no place for a stranger's.
UPLOAD_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF")


def refused_format(path: str) -> Optional[str]:
    """Why the upload at ``path`` is refused for its format (``image_error`` wording), or None: accepted,
    or not an image at all or a broken header, which ``load_image`` then reports as it does for predict."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image refuses those
            with Image.open(path) as img:  # the header only, read as load_image will read it
                kind = img.format
    except Exception:  # noqa: BLE001 - any failure here is load_image's to report
        return None
    if kind in UPLOAD_FORMATS:
        return None
    return f"not an image format accepted here ({kind}; send JPEG, PNG, WebP, GIF, BMP or TIFF)"


def process_running(pid: int) -> bool:
    """Whether a process ``pid`` exists (0: none yet)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class _FirstThen:
    """A request queue whose next item is ``first`` (already taken), then the queue's own."""

    def __init__(self, first: Any, queue: Any):
        self.first, self.queue = [first], queue

    def get(self, block: bool = True, timeout: Optional[float] = None) -> Any:
        return self.first.pop() if self.first else self.queue.get(block, timeout)

    def get_nowait(self) -> Any:
        return self.get(block=False)


class WaitingBatchedLoop(BatchedLoop):
    """LitServe's batched loop, less its idle polling: LitServe asks its request queue (a manager process's)
    for the next request every millisecond while idle, which kept an idle service at 20% of a core here, and
    at a whole core with ``--batch-timeout-ms 0``. This loop blocks until a first request comes (a second at
    a time, so a stop is still seen), then lets LitServe gather the batch as before: for at most the batch
    timeout, counted from that first request."""

    def get_batch_requests(self, lit_api, request_queue, transport):
        import queue

        try:
            first = request_queue.get(timeout=1.0)
        except queue.Empty:
            return [], []
        return super().get_batch_requests(lit_api, _FirstThen(first, request_queue), transport)


class ClassifierAPI(ls.LitAPI):
    """One inference worker: the model and forward pass of ``mixnet predict`` (same options), run on
    batches of uploads through ``mixnet.inference.predict.predict``, so preprocessing, class names and
    probabilities are exactly that function's."""

    def __init__(self, build_model: Callable, model_args: argparse.Namespace, model_name: str, topk: int,
                 threads: int, max_batch_size: int, batch_timeout_s: float):
        super().__init__(max_batch_size=max_batch_size, batch_timeout=batch_timeout_s,
                         loop=WaitingBatchedLoop() if max_batch_size > 1 else "auto")
        self.build_model = build_model  # pickled by reference into each worker process
        self.model_args = model_args
        self.model_name = model_name
        self.topk = topk
        self.threads = threads
        # the HTTP process's pid once it runs (MixNetServer._start_server), shared with the workers
        self.http_pid = multiprocessing.get_context("spawn").Value("i", 0, lock=False)

    def setup(self, device) -> None:
        import torch
        from PIL import Image

        # Ctrl-C, systemd's stop and `timeout` signal the whole process group, this worker too, but the
        # requests in flight still need it: the main process stops it with a SIGTERM of its own once the
        # HTTP process has answered them and ended. Ctrl-C is ignored; a SIGTERM is until then.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, self.stop_once_the_http_process_ended)
        torch.set_num_threads(self.threads)
        self.model, self.forward = self.build_model(self.model_args)
        # /health turns 200 only after this: the first batches of each size are the slow ones.
        side = self.model.pretrained_cfg["input_size"][-1]
        blank = Image.new("RGB", (side, side), (128, 128, 128))
        for n in sorted({1, self.max_batch_size}):
            self.classify([blank] * n)

    def stop_once_the_http_process_ended(self, signum, frame):
        if not process_running(self.http_pid.value):
            # exit through Python so that its clean-up runs (multiprocessing semaphores, such as tqdm's
            # lock, are unlinked instead of reported as leaked)
            raise SystemExit(0)

    def classify(self, images: list) -> list:
        from ..inference.predict import predict

        return predict(self.model, images, topk=self.topk, batch_size=len(images), forward=self.forward)

    def decode_request(self, request: bytes) -> str:  # LitServe requires the name "request"
        # mixnet.predict reads image files; the upload waits in one until its batch has run.
        fd, path = tempfile.mkstemp(prefix="mixnet-serve-")
        with os.fdopen(fd, "wb") as f:
            f.write(request)
        return path

    def predict(self, x):
        batched = self.max_batch_size > 1  # LitServe passes a list only when batching
        paths = x if batched else [x]
        try:
            refused = {i: problem for i, path in enumerate(paths) if (problem := refused_format(path))}
            accepted = [path for i, path in enumerate(paths) if i not in refused]
            results = iter(self.classify(accepted) if accepted else [])
        finally:
            for path in paths:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        answers = []
        for i in range(len(paths)):
            result = None if i in refused else next(results)
            # the fields of `mixnet predict --json`, less the image's path here (a temporary file)
            if result is None:
                answer = image_error(refused[i])
            elif result.error:
                answer = image_error(result.error)
            else:
                answer = dict(model=self.model_name, top=result.to_dict()["top"])
            # for /metrics, which the HTTP process keeps: the batch size, counted once per batch
            answer.update(batch_size=len(paths), batch_position=i)
            answers.append(answer)
        return answers if batched else answers[0]


# ------------------------------------------------------------------------------------------ HTTP process


class Metrics:
    """The Prometheus metrics of one server, in their own registry."""

    def __init__(self):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # memory and CPU of the HTTP process
        self.requests = Counter("mixnet_serve_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "code"], registry=self.registry)
        self.errors = Counter("mixnet_serve_errors", "Requests refused or failed, by kind", ["kind"],
                              registry=self.registry)
        self.latency = Histogram("mixnet_serve_predict_latency_seconds",
                                 "POST /predict: seconds from the request to its answer, any outcome",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30),
                                 registry=self.registry)
        self.batch_size = Histogram("mixnet_serve_batch_size", "Images per model batch",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=self.registry)


class CountRequests:
    """ASGI middleware: every HTTP request counted by endpoint and status, /predict timed."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_and_note_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note_status)
        finally:
            endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
            self.metrics.requests.labels(endpoint, str(status)).inc()
            if endpoint == PREDICT_PATH:
                self.metrics.latency.observe(time.perf_counter() - start)


def http_error_kind(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed", 504: "timeout"}.get(status, f"http_{status}")


class MixNetServer(ls.LitServer):
    """LitServe with mixnet's endpoints: POST /predict taking raw or multipart image bodies, the page at
    /, /info (model card and preprocessing), /metrics (Prometheus), and JSON ``{"error": ...}`` for
    every refusal. LitServe keeps the batching, the workers and /health."""

    def __init__(self, api: ClassifierAPI, info: dict, workers: int, max_body_bytes: int):
        # set before LitServer.__init__, which registers the endpoints
        self.service_info = info
        self.max_body_bytes = max_body_bytes
        self.classifier = api
        self.metrics = Metrics()
        self.failed_workers: List[str] = []
        super().__init__(api, accelerator="cpu", workers_per_device=workers, disable_openapi_url=True,
                         middlewares=[(CountRequests, {"metrics": self.metrics})])
        # /predict/ and /info/ are unknown paths (404), not redirects: Starlette's redirect to the path
        # without the slash names the client's Host header in its Location, whatever the client sent.
        self.app.router.redirect_slashes = False
        self.app.add_exception_handler(StarletteHTTPException, self.http_error)
        self.app.add_exception_handler(Exception, self.internal_error)

    def error(self, status: int, kind: str, message: str, headers: Optional[dict] = None) -> JSONResponse:
        self.metrics.errors.labels(kind).inc()
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    async def http_error(self, request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = getattr(exc, "kind", None) or http_error_kind(exc.status_code)
        message = exc.detail
        if exc.status_code == 404:
            message = f"no endpoint {request.url.path} (endpoints: {', '.join(ENDPOINTS)})"
        elif exc.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
            if request.url.path == PREDICT_PATH:
                message += ": POST the image"
        return self.error(exc.status_code, kind, message, exc.headers)

    async def internal_error(self, request: Request, exc: Exception) -> JSONResponse:
        # the traceback goes to the server's log (Starlette logs it), never to the client
        return self.error(500, "internal", f"internal error ({type(exc).__name__}); the server log has details")

    def _register_internal_endpoints(self):
        super()._register_internal_endpoints()
        # LitServe's own "/" (a line of text) and /info give way to the page and the model card.
        self.app.router.routes = [r for r in self.app.router.routes
                                  if getattr(r, "path", None) not in ("/", self.info_path)]
        page = resources.files(__package__).joinpath("page.html").read_text(encoding="utf-8")
        self.app.add_api_route("/", lambda: HTMLResponse(page), methods=["GET"])
        self.app.add_api_route(self.info_path, lambda: JSONResponse(self.service_info), methods=["GET"])
        self.app.add_api_route("/metrics", lambda: Response(generate_latest(self.metrics.registry),
                                                            media_type=CONTENT_TYPE_LATEST), methods=["GET"])
        # HEAD wherever GET goes (LitServe's /health included), as HTTP asks; uvicorn sends no body for it.
        for route in self.app.router.routes:
            if "GET" in getattr(route, "methods", ()):
                route.methods.add("HEAD")

    def _register_api_endpoints(self, lit_api, request_type, response_type):
        handler = RegularRequestHandler(lit_api, self)

        async def predict(request: Request) -> Response:
            body = await read_image_upload(request, self.max_body_bytes)
            answer = dict(await handler.handle_request(body, bytes))
            batch_size, position = answer.pop("batch_size"), answer.pop("batch_position")
            if position == 0:
                self.metrics.batch_size.observe(batch_size)
            if "error" in answer:
                return self.error(answer["status"], answer["kind"], answer["error"])
            return JSONResponse(answer)

        self.app.add_api_route(lit_api.api_path, predict, methods=["POST"])

    def verify_worker_status(self):
        # LitServe waits here for a ready worker before opening the port; open it at once instead, so that
        # /health answers 503 while the model loads and warms up. A worker that fails to start ends the
        # server (LitServe's worker monitor); its name is kept for the error message.
        pass

    def _init_manager(self, num_api_servers):
        # The manager process holds the queues and the shutdown event until the end of the shutdown below.
        # Forked with the stop signals blocked (they wait here meanwhile), it outlives one sent to the whole
        # process group (systemd's default KillMode, `timeout`, `kill -- -PGID`); manager.shutdown() ends it.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            return super()._init_manager(num_api_servers)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def _start_server(self, *args, **kwargs):
        http_processes = super()._start_server(*args, **kwargs)
        (self.classifier.http_pid.value,) = [p.pid for p in http_processes.values()]  # serve() starts one
        return http_processes

    def _perform_graceful_shutdown(self, manager, uvicorn_workers, shutdown_reason="normal"):
        with contextlib.suppress(Exception):  # the manager may already be gone
            self.failed_workers = [name for name, status in self.workers_setup_status.items()
                                   if status == WorkerSetupStatus.ERROR]
        super()._perform_graceful_shutdown(manager, uvicorn_workers, shutdown_reason)


# ------------------------------------------------------------------------------------------ entry point


def check_address(host: str, port: int) -> None:
    """One-line errors for an address LitServe cannot bind, before any model is loaded."""
    if host not in HOSTS:
        raise MixNetError(f"--host {host!r}: use 127.0.0.1 (this machine only, the default), 0.0.0.0 (all IPv4 "
                          f"interfaces) or :: (all IPv6 interfaces)")
    if not 1024 <= port <= 65535:
        raise MixNetError(f"--port {port}: use a port from 1024 to 65535")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as e:
            raise MixNetError(f"cannot listen on {host}:{port}: {(e.strerror or str(e)).lower()} "
                              f"(another server there? choose another --port)") from None


def model_name_of(model, source: Optional[str]) -> str:
    """The model's name in every answer: its weights tag, else the name of the folder or file it came
    from (never the path: that is the server's business), else its architecture."""
    cfg = model.pretrained_cfg
    return cfg.get("tag") or (source and Path(os.path.abspath(source)).name) or cfg["architecture"]


def describe_service(model, name: str, args: argparse.Namespace, threads: int) -> dict:
    """What GET /info answers: the served model, its card (``mixnet info --json`` of its architecture,
    with the parameters, MACs, classes and preprocessing of the model served: 10 classes, not 1,000, for
    the built-in model), the preprocessing, its classes, and the serving settings, with the precision
    and the runtime that runs it."""
    from ..data.images import eval_resize_size
    from ..deploy.quantize import model_precision, quantized_folder, read_quantization_config
    from ..inference.predict import class_names
    from ..info import model_card
    from ..pretrained.registry import WEIGHTS

    precision = model_precision(args.precision, args.weights, args.model)
    if precision == "int8":
        backend = read_quantization_config(quantized_folder(args.weights, args.model))["backend"]
    else:
        backend = "openvino" if precision == "bf16" else args.backend
    cfg = model.pretrained_cfg
    size = cfg["input_size"][-1]
    return dict(
        model=name,
        card=model_card(cfg.get("tag") if cfg.get("tag") in WEIGHTS else cfg["architecture"], pretrained_cfg=cfg),
        preprocessing=dict(input_size=list(cfg["input_size"]), resize_size=eval_resize_size(size, cfg["crop_pct"]),
                           crop_size=size, crop_pct=cfg["crop_pct"], interpolation=cfg["interpolation"],
                           mean=list(cfg["mean"]), std=list(cfg["std"])),
        classes=class_names(model),
        serving=dict(topk=args.topk, max_batch_size=args.max_batch_size, batch_timeout_ms=args.batch_timeout_ms,
                     workers=args.workers, threads=threads, max_body_mb=args.max_body_mb, precision=precision,
                     backend=backend, fast=args.fast))


def serve(args: argparse.Namespace, build_model: Callable) -> int:
    """Run the service until SIGTERM or Ctrl-C. ``args`` holds ``mixnet serve``'s options, with ``model``,
    ``weights``, ``fast``, ``backend``... as ``mixnet predict`` has them; ``build_model(args)`` gives
    ``(model, forward)`` from them in each worker (the CLI passes its ``inference_model``)."""
    check_address(args.host, args.port)
    # Built once here as each worker will build it, so that a problem with the model or its options
    # (--onnx, --precision, ...) is a one-line error before the server starts, not a worker dying later.
    model, forward = build_model(args)
    del forward
    name = model_name_of(model, args.model)
    # The workers share the cores but one, left to the HTTP process: on 2 cores, a 2-thread worker spun
    # against it and cost twice the CPU per image (benchmarks/RESULTS.md, `mixnet serve` under load).
    threads = args.threads or max(1, ((os.cpu_count() or 1) - 1) // args.workers)
    info = describe_service(model, name, args, threads)
    del model  # the workers load their own
    api = ClassifierAPI(build_model, args, name, topk=args.topk, threads=threads, max_batch_size=args.max_batch_size,
                        batch_timeout_s=args.batch_timeout_ms / 1000)
    server = MixNetServer(api, info, workers=args.workers, max_body_bytes=int(args.max_body_mb * 2**20))
    main_pid = os.getpid()

    def stop(signum, frame):
        if os.getpid() != main_pid:
            # the HTTP process (forked) inherits this handler; uvicorn re-raises the signal at the end of its
            # own graceful shutdown, and the process should then just end
            raise SystemExit(0)
        # LitServe's normal shutdown: the HTTP process finishes the requests in flight, then the workers
        # stop. The event is a manager proxy: set it from another thread, not inside this handler, which
        # interrupts the main thread in the middle of a call on the same proxy connection.
        threading.Thread(target=server._shutdown_event.set, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    print(f"mixnet serve: {name} on http://{args.host}:{args.port}/ (GET /health is 200 once the model is "
          f"loaded and warmed up; SIGTERM or Ctrl-C stops)", flush=True)
    try:
        server.run(host=args.host, port=args.port, num_api_servers=1, log_level=args.log_level,
                   generate_client_file=False,  # the rest are uvicorn's options
                   limit_concurrency=max(MIN_CONNECTIONS, 2 * args.max_batch_size * args.workers))
    except (EOFError, ConnectionError):
        # LitServe's worker monitor shut the server down (and its multiprocessing manager with it) under
        # the main thread, which was waiting on that manager
        raise MixNetError("an inference worker stopped (the log above says why); the server has shut down") from None
    if server.failed_workers:
        raise MixNetError("an inference worker could not load the model (the log above says why)")
    return 0
