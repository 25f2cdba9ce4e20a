"""Pretrained weights: registry facts, real downloads from a local HTTP server, safe loading, hub format.

timm is the oracle: files it writes must load here with equal logits, and ours must load in timm.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import http.server
import io
import json
import pickle
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import mixnet
from conftest import ALONE, RunsCode, randomized
from mixnet.data.imagenet import imagenet_class_names
from mixnet.errors import MixNetError
from mixnet.factory import load_model
from mixnet.pretrained import checkpoint as checkpoint_module
from mixnet.pretrained import download as hub
from mixnet.pretrained.checkpoint import RUN_MODEL_DIRNAME, save_pretrained
from mixnet.pretrained.registry import DEFAULT_TAG, RELEASE_BASE, WEIGHTS, default_tag

PUBLISHED = ["mixnet_s.ft_in1k", "mixnet_m.ft_in1k", "mixnet_l.ft_in1k", "mixnet_xl.ra_in1k",
             "tf_mixnet_s.in1k", "tf_mixnet_m.in1k", "tf_mixnet_l.in1k"]


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def timm():
    """timm, the oracle, for the tests that compare with it (the others run without it)."""
    return pytest.importorskip("timm")


@pytest.fixture(scope="module")
def reference():
    """A mixnet_s with random weights (batch norm and classifier included): what the files below hold."""
    return randomized("mixnet_s")


@pytest.fixture(scope="module")
def timm_s(timm, reference):
    """timm's mixnet_s holding the same weights."""
    model = timm.create_model("mixnet_s")
    model.load_state_dict(reference.state_dict())
    return model.eval()


@pytest.fixture(scope="module")
def images():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def assert_same_logits(ours, theirs, x):
    torch.testing.assert_close(logits(ours, x), logits(theirs, x), rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def release_file(reference):
    """A checkpoint named like a release file: <arch>-<first 8 hex of its sha256>.pth."""
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    data = buffer.getvalue()
    return f"mixnet_s-{hashlib.sha256(data).hexdigest()[:8]}.pth", data


class FileServer:
    """Serves in-memory files on 127.0.0.1, with Range support and scripted failures."""

    def __init__(self):
        self.files = {}
        self.requests = []  # (path, Range header or None)
        self.drops_left = 0  # this many responses stop halfway, then close the connection
        self.ignore_range = False
        self.release = threading.Event()  # cleared: responses stop halfway until it is set
        self.release.set()
        self.hub_files = {}  # (repo_id, file name) -> bytes, served as the Hugging Face hub
        self.hub_requests = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.do_GET(head=True)

            def do_GET(self, head=False):
                if self.path.startswith("/hf/"):
                    self.serve_hub(head)
                    return
                name = self.path.rsplit("/", 1)[-1]
                if self.path.startswith("/weights/"):
                    server.requests.append((self.path, self.headers.get("Range")))
                data = server.files.get(name)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                ranged = self.headers.get("Range")
                if ranged and not server.ignore_range:
                    start = int(ranged.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if server.drops_left > 0:
                    server.drops_left -= 1
                    self.wfile.write(body[:len(body) // 2])
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)
                    self.close_connection = True
                    return
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                server.release.wait(timeout=60)
                self.wfile.write(body[len(body) // 2:])

            def serve_hub(self, head):
                """Just enough of the hub's file endpoint: /hf/<org>/<repo>/resolve/<revision>/<file>."""
                parts = self.path.split("/")
                if "/resolve/" not in self.path:  # huggingface_hub's own API calls: not a file request
                    self.send_error(404, "Not Found")
                    return
                key = ("/".join(parts[2:4]), parts[-1])
                server.hub_requests.append(key)
                data = server.hub_files.get(key)
                if data is None:
                    self.send_error(404, "Entry Not Found")
                    return
                self.send_response(200)
                self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")
                self.send_header("X-Linked-Etag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if not head:
                    self.wfile.write(data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/weights"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = FileServer()
    yield s
    s.close()


@pytest.fixture
def local_hub(monkeypatch, server):
    """The Hugging Face hub endpoint is the local server too (which knows no hub repositories)."""
    from huggingface_hub import constants

    endpoint = server.url.rsplit("/", 1)[0] + "/hf"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(scope="module")
def hub_file(reference):
    """The same weights as the hub holds them: model.safetensors."""
    from safetensors.torch import save

    return save(reference.state_dict())


@pytest.fixture
def served_entry(monkeypatch, server, release_file, hub_file, tmp_path, local_hub):
    """mixnet_s.ft_in1k served on GitHub and the hub, registered with the digests of the files made here
    (computed independently with hashlib); URL base and cache via env vars."""
    name, data = release_file
    server.files[name] = data
    entry = dataclasses.replace(WEIGHTS["mixnet_s.ft_in1k"], sha256=hashlib.sha256(data).hexdigest()[:8],
                                url=f"{RELEASE_BASE}/{name}", hf_sha256=hashlib.sha256(hub_file).hexdigest())
    server.hub_files[(entry.hf_hub_id, "model.safetensors")] = hub_file
    monkeypatch.setitem(WEIGHTS, entry.tag, entry)
    monkeypatch.setenv("MIXNET_WEIGHTS_URL_BASE", server.url)
    cache = tmp_path / "cache"
    monkeypatch.setenv("MIXNET_CACHE_DIR", str(cache))
    return entry, cache / name


def cache_files(cache: Path):
    """What is in the cache, lock files aside."""
    return sorted(p.name for p in cache.glob("*") if not p.name.endswith(".lock")) if cache.exists() else []


# ------------------------------------------------------------------------------------------ registry


def test_registry_matches_the_published_checkpoints(timm):
    from timm.models import get_pretrained_cfg

    assert set(PUBLISHED) <= set(WEIGHTS)
    for tag in PUBLISHED:
        entry, theirs = WEIGHTS[tag], get_pretrained_cfg(tag)
        assert entry.url == theirs.url and entry.hf_hub_id == theirs.hf_hub_id
        assert entry.url.startswith("https://github.com/rwightman/pytorch-image-models/releases/download/")
        # the digest prefix as timm's own configuration spells it in its URL
        assert theirs.url.endswith(f"-{entry.sha256}.pth") and len(entry.sha256) == 8
        assert entry.architecture == theirs.architecture and entry.architecture in mixnet.MODELS
        cfg = entry.pretrained_cfg
        assert (cfg.input_size, cfg.crop_pct, cfg.interpolation) == \
            (theirs.input_size, theirs.crop_pct, theirs.interpolation)
        assert (cfg.mean, cfg.std) == (theirs.mean, theirs.std)
        assert 75 < entry.top1 < entry.top5 < 100
    assert WEIGHTS["mixnet_xl.ra_in1k"].file_size == 48_001_170
    assert default_tag("mixnet_l") == "mixnet_l.ft_in1k"
    assert DEFAULT_TAG in WEIGHTS and WEIGHTS[DEFAULT_TAG].package_file and not WEIGHTS[DEFAULT_TAG].url


def test_no_published_weights_is_a_clear_error():
    with pytest.raises(MixNetError, match="no published weights for mixnet_xxl"):
        mixnet.create_model("mixnet_xxl", pretrained=True)


def test_sha256_checks_against_a_known_digest(tmp_path):
    path = tmp_path / "abc"
    path.write_bytes(b"abc")
    known = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"  # FIPS 180-2 test vector
    assert hub.file_sha256(path) == known
    hub.check_sha256(path, known)
    hub.check_sha256(path, known[:8].upper())
    for wrong in (known[:7] + "0", "0" * 64):
        with pytest.raises(MixNetError, match=rf"{path}: sha256 .* does not match the expected {wrong}"):
            hub.check_sha256(path, wrong)
    for unusable in ("", "ba78", "not hex!"):  # an empty or short prefix would accept (nearly) anything
        with pytest.raises(MixNetError, match="no usable sha256"):
            hub.check_sha256(path, unusable)


@pytest.fixture
def package_copy(tmp_path, monkeypatch):
    """The built-in weights files copied to a folder the package reads them from instead."""
    folder = tmp_path / "files"
    shutil.copytree(checkpoint_module.PACKAGE_FILES, folder)
    monkeypatch.setattr(checkpoint_module, "PACKAGE_FILES", folder)
    return folder / WEIGHTS[DEFAULT_TAG].package_file


def test_builtin_weights_load_and_are_the_registered_file():
    entry = WEIGHTS[DEFAULT_TAG]
    shipped = checkpoint_module.PACKAGE_FILES / entry.package_file
    assert hashlib.sha256(shipped.read_bytes()).hexdigest() == entry.sha256
    model = load_model(DEFAULT_TAG)
    assert model.num_classes == 10 and len(model.pretrained_cfg["class_names"]) == 10
    assert model.pretrained_cfg["tag"] == DEFAULT_TAG and model.pretrained_cfg["file"] == str(shipped)


def test_tampered_builtin_weights_are_refused(package_copy):
    data = bytearray(package_copy.read_bytes())
    data[-2] ^= 0x01  # one bit of the last tensor: still a readable safetensors file
    package_copy.write_bytes(bytes(data))
    from safetensors.torch import load_file

    assert load_file(package_copy)  # readable, so only the digest can catch it
    with pytest.raises(MixNetError, match=rf"{package_copy}: sha256 .* does not match the expected"):
        load_model(DEFAULT_TAG)


def test_missing_builtin_weights_are_named(package_copy):
    package_copy.unlink()
    with pytest.raises(MixNetError, match=rf"mixnet_s\.imagenette: the built-in weights are not in this "
                                          rf"installation \({package_copy} missing\)"):
        load_model(DEFAULT_TAG)


# ------------------------------------------------------------------------------------------ downloads


def test_download_verifies_caches_and_matches_timm(served_entry, server, timm_s, images):
    entry, cached = served_entry
    model = mixnet.create_model("mixnet_s", pretrained=True, progress=False)
    assert_same_logits(model, timm_s, images)
    assert cached.is_file() and cache_files(cached.parent) == [cached.name]  # no .part left
    assert model.pretrained_cfg["class_names"] == imagenet_class_names()
    assert model.pretrained_cfg["tag"] == "mixnet_s.ft_in1k"
    assert len(server.requests) == 1
    again = mixnet.create_model("mixnet_s.ft_in1k", pretrained=True, progress=False)  # from the cache
    assert len(server.requests) == 1
    assert_same_logits(again, timm_s, images)


def test_arguments_override_environment(served_entry, server, tmp_path, monkeypatch):
    monkeypatch.setenv("MIXNET_WEIGHTS_URL_BASE", "http://127.0.0.1:9/nowhere")
    cache = tmp_path / "elsewhere"
    mixnet.create_model("mixnet_s", pretrained="mixnet_s.ft_in1k", cache_dir=cache, url_base=server.url,
                        source="github", progress=False)
    assert cache_files(cache) == [served_entry[1].name]


def test_hash_mismatch_is_refused_and_discarded(served_entry, server):
    entry, cached = served_entry
    server.files[cached.name] = server.files[cached.name][:-4] + b"evil"
    with pytest.raises(MixNetError, match=rf"{cached.name}: .*sha256 .* not the expected {entry.sha256}"):
        mixnet.create_model("mixnet_s", pretrained=True, progress=False)
    assert cache_files(cached.parent) == []
    # A file that is not the published one is an alarm, not an outage: the hub, which holds the right
    # file here, is not asked.
    assert len(server.requests) == 1 and server.hub_requests == []


def test_404_names_the_url_and_where_to_put_the_file(served_entry, server):
    entry, cached = served_entry
    del server.files[cached.name]
    with pytest.raises(MixNetError) as error:
        mixnet.create_model("mixnet_s", pretrained=True, source="github", progress=False)
    message = str(error.value)
    assert "HTTP 404" in message and f"{server.url}/{cached.name}" in message and "\n" not in message
    server.hub_files.clear()
    with pytest.raises(MixNetError, match=rf"fetch {server.url}/{cached.name} yourself and put it at {cached}"):
        mixnet.create_model("mixnet_s", pretrained=True, progress=False)  # auto: the hub lacks it too
    assert server.hub_requests  # it was asked
    assert cache_files(cached.parent) == []


def test_offline_with_nothing_cached(served_entry, server, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    entry, cached = served_entry
    with pytest.raises(MixNetError) as error:
        mixnet.create_model("mixnet_s", pretrained=True, progress=False)
    message = str(error.value)
    assert cached.name in message and f"{server.url}/{cached.name}" in message and str(cached) in message
    assert "offline" in message and not server.requests


def test_unreachable_release_without_a_hub_copy_says_where_to_put_the_file(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # offline, but not told so
    entry = WEIGHTS["mixnet_s.ft_in1k"]
    assert entry.hf_sha256 is None  # the hub is no fallback for it: GitHub's failure is the last word
    unreachable = "http://127.0.0.1:9/nowhere"  # the discard port: nothing listens, the connection is refused
    with pytest.raises(MixNetError) as error:
        load_model(entry.tag, cache_dir=tmp_path, url_base=unreachable, progress=False)
    message = str(error.value)
    assert f"cannot reach {unreachable}/{entry.filename}" in message and "\n" not in message
    assert f"fetch {unreachable}/{entry.filename} yourself and put it at {tmp_path / entry.filename}" in message
    assert cache_files(tmp_path) == []


def test_dropped_connection_is_resumed_with_range(served_entry, server, reference, images):
    entry, cached = served_entry
    server.drops_left = 1
    model = mixnet.create_model("mixnet_s", pretrained=True, source="github", progress=False)
    assert_same_logits(model, reference, images)
    (_, first_range), (_, second_range) = server.requests
    size = len(server.files[cached.name])
    assert first_range is None and second_range == f"bytes={size // 2}-"
    assert cache_files(cached.parent) == [cached.name]


def test_connection_that_keeps_dropping_fails_cleanly_then_resumes_next_time(served_entry, server):
    entry, cached = served_entry
    server.drops_left = 100
    with pytest.raises(MixNetError, match=rf"{cached.name}: download from .* broke off after"):
        mixnet.create_model("mixnet_s", pretrained=True, source="github", progress=False)
    part = cached.with_name(cached.name + ".part")
    assert not cached.exists() and part.is_file()  # never a partial file under the final name
    kept = part.stat().st_size
    assert 0 < kept < len(server.files[cached.name])
    server.drops_left = 0
    mixnet.create_model("mixnet_s", pretrained=True, source="github", progress=False)
    assert server.requests[-1][1] == f"bytes={kept}-"
    assert cache_files(cached.parent) == [cached.name]
    assert cached.read_bytes() == server.files[cached.name]


def test_server_ignoring_range_restarts_from_scratch(served_entry, server, reference, images):
    entry, cached = served_entry
    cached.parent.mkdir(parents=True)
    cached.with_name(cached.name + ".part").write_bytes(b"stale bytes of some other file")
    server.ignore_range = True
    model = mixnet.create_model("mixnet_s", pretrained=True, source="github", progress=False)
    assert server.requests[0][1] == "bytes=30-"
    assert_same_logits(model, reference, images)


def test_corrupt_cached_file_is_reported(served_entry):
    entry, cached = served_entry
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"not the weights")
    with pytest.raises(MixNetError, match=rf"{cached}: sha256 .*delete the cached file"):
        mixnet.create_model("mixnet_s", pretrained=True, progress=False)


# ------------------------------------------------------------------------------------------ local files


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch notes the plain-pickle variant
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    payload = {"conv_stem.weight": torch.zeros(1), "extra": RunsCode(marker)}
    with open(path, "wb") as f:
        torch.save(payload, f) if writer == "torch.save" else pickle.dump(payload, f)
    refused = rf"{path}: refused: .*objects other than tensors"
    if writer == "torch.save":  # the global it would call is named (a raw pickle fails on an opcode first)
        refused += r" .*\((io|builtins)\.open\)"  # RunsCode unpickles by calling open
    with pytest.raises(MixNetError, match=refused):
        mixnet.create_model("mixnet_s", pretrained=path)
    assert not marker.exists()


@pytest.mark.parametrize("place", ["hub folder", "run checkpoint"])
def test_malicious_pickle_in_a_hub_folder_or_run_checkpoint_runs_nothing(tmp_path, place, capsys):
    from mixnet.cli import main

    marker = tmp_path / "pwned"
    if place == "hub folder":  # timm's format: config.json + pytorch_model.bin
        spec = tmp_path / "hub"
        spec.mkdir()
        (spec / "config.json").write_text(json.dumps({"architecture": "mixnet_s", "num_classes": 10}))
        path = spec / "pytorch_model.bin"
        payload = {"conv_stem.weight": torch.zeros(1), "extra": RunsCode(marker)}
    else:  # what --pretrained RUN/last.pth or --weights RUN/last.pth reads
        spec = path = tmp_path / "run" / "last.pth"
        path.parent.mkdir()
        payload = {"epoch": 3, "state_dict": {"conv_stem.weight": torch.zeros(1)}, "optimizer": RunsCode(marker)}
    torch.save(payload, path)
    with pytest.raises(MixNetError, match=rf"{path}: refused: .*objects other than tensors"):
        load_model(spec)
    example = Path(__file__).resolve().parents[1] / "examples" / "church.jpg"
    assert main(["predict", str(example), "--weights", str(spec), "--workers", "0"]) == 2
    assert f"{path}: refused" in capsys.readouterr().err
    assert not marker.exists()


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_file_is_a_one_line_error(tmp_path, reference, suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"model{suffix}"
    if suffix == ".pth":
        torch.save(reference.state_dict(), path)
    else:
        save_file(reference.state_dict(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(MixNetError, match=rf"{path}: not a readable .*truncated or corrupt") as error:
        load_model(path, architecture="mixnet_s")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("content, said", [(b"", "empty"), (None, r"it starts with b'\\xff\\xd8")])
def test_a_file_that_is_no_checkpoint_at_all_is_named_so_not_suspected_of_holding_code(tmp_path, content, said):
    path = tmp_path / "model.pth"  # e.g. a photo passed as --weights by mistake, or an empty download
    example = Path(__file__).resolve().parents[1] / "examples" / "church.jpg"
    path.write_bytes(example.read_bytes() if content is None else content)
    with pytest.raises(MixNetError, match=rf"{path}: not a PyTorch checkpoint \(neither a zip archive nor a "
                                          rf"pickle; {said}") as error:
        load_model(path, architecture="mixnet_s")
    assert "code" not in str(error.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_from_a_diverged_run_are_refused_in_one_line_before_any_prediction(tmp_path, capsys, value):
    weights = mixnet.create_model("mixnet_s", num_classes=10).state_dict()
    weights["blocks.3.0.bn1.running_var"][5] = value  # one value among 2.6 million is enough to poison every logit
    path = tmp_path / "diverged.pth"
    torch.save(weights, path)
    with pytest.raises(MixNetError, match=rf"{path}: NaN or infinite values in 1 of its tensors \(e.g. "
                                          r"blocks\.3\.0\.bn1\.running_var\)"):
        mixnet.create_model("mixnet_s", num_classes=10, pretrained=path)
    from mixnet.cli import main

    example = Path(__file__).resolve().parents[1] / "examples" / "church.jpg"
    assert main(["predict", str(example), "--weights", str(path), "--model", "mixnet_s", "--json",
                 "--workers", "0"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "NaN or infinite" in err


def test_wrong_architecture_is_named(timm, tmp_path):
    path = tmp_path / "m.pth"
    torch.save(timm.create_model("mixnet_m").state_dict(), path)
    with pytest.raises(MixNetError, match=rf"{path}: does not fit mixnet_s: .*looks like mixnet_m or "
                                          r"tf_mixnet_m weights") as error:
        mixnet.create_model("mixnet_s", pretrained=path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("layout", ["bare", "state_dict", "state_dict_ema", "model", "ddp", "saver"])
def test_timm_checkpoint_layouts_load_with_equal_logits(tmp_path, timm_s, images, layout):
    weights = timm_s.state_dict()
    noise = {k: torch.randn_like(v.float()).to(v.dtype) for k, v in weights.items()}
    checkpoint = {
        "bare": weights,
        "state_dict": {"epoch": 3, "arch": "mixnet_s", "state_dict": weights, "optimizer": {}},
        "state_dict_ema": {"state_dict": noise, "state_dict_ema": weights},  # EMA preferred
        "model": {"model": weights},
        "ddp": {"state_dict": {f"module.{k}": v for k, v in weights.items()}},
        # what timm's CheckpointSaver writes: the run's arguments ride along as an argparse.Namespace
        "saver": {"epoch": 3, "arch": "mixnet_s", "state_dict": weights, "optimizer": {}, "version": 2,
                  "args": argparse.Namespace(model="mixnet_s", lr=0.1, opt="rmsproptf"), "metric": 75.9},
    }[layout]
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    assert_same_logits(mixnet.create_model("mixnet_s", pretrained=path), timm_s, images)


@pytest.mark.parametrize("safe", [True, False])
def test_timm_hub_folder_loads_with_equal_logits_and_names(timm, tmp_path, images, safe):
    torch.manual_seed(2)
    theirs = timm.create_model("mixnet_s", num_classes=10).eval()
    names = [f"class {i}" for i in range(10)]
    timm.models.save_for_hf(theirs, tmp_path, model_config=dict(label_names=names), safe_serialization=safe)
    ours = load_model(tmp_path)
    assert ours.num_classes == 10 and ours.pretrained_cfg["class_names"] == names
    assert_same_logits(ours, theirs, images)
    via_create = mixnet.create_model("mixnet_s", pretrained=tmp_path)  # num_classes from the folder
    assert via_create.num_classes == 10
    assert_same_logits(via_create, theirs, images)


def test_save_pretrained_loads_in_timm_and_back(timm, tmp_path, images):
    ours = mixnet.create_model("mixnet_s", num_classes=10).eval()
    names = [f"n{i:08d}" for i in range(10)]
    folder = save_pretrained(ours, tmp_path / "hub", class_names=names)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    theirs = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    assert_same_logits(ours, theirs, images)
    assert list(theirs.pretrained_cfg["label_names"]) == names
    overlay = timm.create_model("mixnet_s", pretrained=True, num_classes=10,
                                pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"), num_classes=10))
    assert_same_logits(ours, overlay, images)
    back = load_model(folder)
    assert back.pretrained_cfg["class_names"] == names and back.pretrained_cfg["architecture"] == "mixnet_s"
    assert_same_logits(back, ours, images)
    # a training run directory holding its final model
    save_pretrained(back, tmp_path / "run" / RUN_MODEL_DIRNAME)
    (tmp_path / "run" / "config.json").write_text('{"recipe": "finetune"}')  # the run's own config
    assert load_model(tmp_path / "run").pretrained_cfg["class_names"] == names
    assert json.loads((folder / "config.json").read_text())["num_classes"] == 10


def test_other_num_classes_starts_a_fresh_classifier(tmp_path, reference, images):
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    with pytest.warns(UserWarning, match="classifier not loaded"):
        model = mixnet.create_model("mixnet_s", pretrained=path, num_classes=7).eval()
    assert model.classifier.out_features == 7 and "class_names" not in model.pretrained_cfg
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images), reference.forward_features(images),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("in_chans", [1, 5])
def test_stem_adapts_to_other_channel_counts_like_timm(timm, tmp_path, timm_s, in_chans):
    path = tmp_path / "w.pth"
    torch.save(timm_s.state_dict(), path)
    ours = mixnet.create_model("mixnet_s", pretrained=path, in_chans=in_chans)
    theirs = timm.create_model("mixnet_s", pretrained=True, in_chans=in_chans,
                               pretrained_cfg_overlay=dict(file=str(path)))
    x = torch.randn(2, in_chans, 64, 64)
    assert_same_logits(ours, theirs, x)
    assert ours.pretrained_cfg["input_size"][0] == in_chans


def test_features_only_takes_the_trunk(timm, tmp_path, timm_s, images):
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(timm_s.state_dict(), path)
    ours = mixnet.create_model("mixnet_s", pretrained=path, features_only=True).eval()
    theirs = timm.create_model("mixnet_s", pretrained=True, features_only=True,
                               pretrained_cfg_overlay=dict(file=str(path))).eval()
    with torch.no_grad():
        for a, b in zip(ours(images), theirs(images), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_bare_state_dict_needs_architecture_when_shapes_are_ambiguous(tmp_path, reference):
    path = tmp_path / "w.pth"
    torch.save(reference.state_dict(), path)
    with pytest.raises(MixNetError, match=rf"fit mixnet_s and tf_mixnet_s alike .*say which architecture "
                                          rf"\(e\.g\. --model mixnet_s --weights {path}, or "
                                          rf'architecture="mixnet_s" in Python\)'):
        load_model(path)
    assert load_model(path, architecture="mixnet_s").model_name == "mixnet_s"
    with pytest.raises(MixNetError, match="not a model name, a weights tag"):
        load_model(tmp_path / "missing.pth")


def test_hugging_face_hub_is_the_fallback_source_for_a_registered_digest(served_entry, server, reference, images):
    entry, cached = served_entry
    del server.files[cached.name]  # the GitHub release is gone
    model = mixnet.create_model("mixnet_s", pretrained=True, progress=False)
    assert_same_logits(model, reference, images)
    assert (entry.hf_hub_id, "model.safetensors") in server.hub_requests
    assert not cached.exists()  # the hub keeps its own cache, under ours when ours is moved
    assert list((cached.parent / "huggingface").rglob("model.safetensors"))
    github_requests = len(server.requests)
    again = mixnet.create_model("mixnet_s", pretrained=True, source="hf", progress=False)
    assert_same_logits(again, reference, images)
    assert len(server.requests) == github_requests  # source="hf" never asks GitHub


def test_hub_file_other_than_the_registered_one_is_refused(served_entry, server):
    from safetensors.torch import save

    entry, cached = served_entry
    del server.files[cached.name]
    # valid mixnet_s weights, only not the registered ones
    server.hub_files[(entry.hf_hub_id, "model.safetensors")] = save(randomized("mixnet_s", seed=7).state_dict())
    refused = r"timm/mixnet_s\.ft_in1k/model\.safetensors: refused, not the registered file .*sha256"
    with pytest.raises(MixNetError, match=refused):
        mixnet.create_model("mixnet_s", pretrained=True, progress=False)
    assert server.hub_requests  # it was fetched, then refused
    with pytest.raises(MixNetError, match=refused):  # now from the hub's cache: refused there too
        mixnet.create_model("mixnet_s", pretrained=True, progress=False)
    with pytest.raises(MixNetError, match=refused):
        mixnet.create_model("mixnet_s", pretrained=True, source="hf", progress=False)


@pytest.mark.parametrize("tag", PUBLISHED)
def test_tags_without_a_registered_hub_digest_never_use_the_hub(tag, server, local_hub, hub_file, tmp_path):
    entry = WEIGHTS[tag]
    assert entry.hf_hub_id and entry.hf_sha256 is None  # no full digest of the hub copies is known
    server.hub_files[(entry.hf_hub_id, "model.safetensors")] = hub_file  # the hub would serve a file
    with pytest.raises(MixNetError, match=rf"{entry.filename}: .* answered HTTP 404"):
        load_model(tag, cache_dir=tmp_path, url_base=server.url, progress=False)
    with pytest.raises(MixNetError, match=rf"{tag}: no sha256 is registered for a Hugging Face copy"):
        load_model(tag, cache_dir=tmp_path, source="hf", progress=False)
    assert len(server.requests) == 1 and server.hub_requests == []


@ALONE
def test_concurrent_downloads_of_one_file_make_one_request_and_one_good_file():
    # Server and both downloaders run in a script of their own, away from this process.
    script = Path(__file__).with_name("concurrent_download.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["returncodes"] == [0, 0], result["errors"]
    assert result["second_ready"] and result["requests_while_stalled"] == 1  # both were inside download()
    assert result["printed"] == [[result["dest"]], [result["dest"]]]
    assert result["intact"] and result["cache"] == ["weights.pth"]  # no .part left, no second copy
    assert result["requests"] == 1  # the second process found the first one's file


def test_rescaled_architecture_round_trips_through_a_hub_folder(tmp_path):
    # random statistics and head: a fresh zero-initialised head would make any two models agree
    model = randomized("mixnet_m", num_classes=4, width_multiplier=0.5, depth_multiplier=0.8)
    mixnet.save_pretrained(model, tmp_path / "small", class_names=list("abcd"))
    loaded = mixnet.load_model(tmp_path / "small").eval()
    assert loaded.config == model.config
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_unknown_architecture_with_weights_is_an_input_error_named_before_the_file_is_read(tmp_path, capsys):
    from mixnet.cli import main

    missing = tmp_path / "missing.pth"  # never read: the name is checked first
    with pytest.raises(MixNetError, match=r"unknown model 'bogus' \(known: mixnet_s,") as error:
        load_model(missing, architecture="bogus")
    assert isinstance(error.value, ValueError)  # what Python callers caught before
    with pytest.raises(MixNetError, match="unknown argument.*width_multipler") as error:
        mixnet.create_model("mixnet_s", width_multipler=2.0)
    assert isinstance(error.value, TypeError)
    example = Path(__file__).resolve().parents[1] / "examples" / "church.jpg"
    assert main(["predict", str(example), "--model", "bogus", "--weights", str(missing), "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mixnet predict: error: unknown model 'bogus'") and "Traceback" not in err


@pytest.fixture(scope="module")
def small_hub_folder(tmp_path_factory):
    """A hub folder as save_pretrained writes it, for a 3-class mixnet_s."""
    return save_pretrained(mixnet.create_model("mixnet_s", num_classes=3), tmp_path_factory.mktemp("hub") / "m")


# (field, wrong value, the problem the error states); a dotted field is one inside pretrained_cfg
WRONG_HUB_CONFIG_FIELDS = [
    ("pretrained_cfg.input_size", [3, 224], r"must be \[C, H, W\] .*, got \[3, 224\]"),
    ("pretrained_cfg.input_size", [3, 16, 16], r"must be .*H and W at least 32"),
    ("pretrained_cfg.input_size", "224", r"must be \[C, H, W\]"),
    ("pretrained_cfg.crop_pct", "x", r'must be a number in \(0, 1\], got "x"'),
    ("pretrained_cfg.crop_pct", 1.5, r"must be a number in \(0, 1\], got 1\.5"),
    ("pretrained_cfg.mean", "abc", r'must be a list of 3 numbers \(one per channel\), got "abc"'),
    ("pretrained_cfg.mean", [0.5, 0.5], r"must be a list of 3 numbers"),
    ("pretrained_cfg.std", [0.2, 0.2, 0], r"must be a list of 3 positive numbers"),
    ("pretrained_cfg.interpolation", 3, r"must be a string"),
    ("pretrained_cfg.num_classes", 7, r"is 7 for a classifier of 3 classes"),
    ("pretrained_cfg", [1, 2], r"must be a JSON object, got \[1, 2\]"),
    ("label_names", "abc", r'must be a list of class names, got "abc"'),
    ("num_classes", "3", r'is "3" for a classifier of 3 classes'),
]


@pytest.mark.parametrize("key, value, problem", WRONG_HUB_CONFIG_FIELDS,
                         ids=[f"{key}={json.dumps(value)}" for key, value, _ in WRONG_HUB_CONFIG_FIELDS])
def test_wrong_typed_hub_config_fields_are_one_line_errors_naming_the_field(small_hub_folder, tmp_path, key,
                                                                             value, problem):
    folder = tmp_path / "hub"
    shutil.copytree(small_hub_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    *parents, leaf = key.split(".")
    (config[parents[0]] if parents else config)[leaf] = value
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MixNetError, match=rf"{folder / 'config.json'}: {re.escape(key)} {problem}") as error:
        load_model(folder)
    assert "\n" not in str(error.value)
