"""Shared test infrastructure: no internet, data that must be there, torch state restored, fixtures.

- Network: every test process refuses socket connections to anything but loopback (127.0.0.0/8, ::1),
  so no test can reach the internet by accident; subprocesses inherit ``HF_HUB_OFFLINE=1``.
- Data: ``shared_data(...)`` gives a path under ``../shared/data``, skipping the test when it is absent,
  or failing it when ``MIXNET_REQUIRE_DATA=1`` (CI sets it: there, a skip would hide a broken test).
- Heavy subprocess tests (torchrun, SIGKILL, whole validation runs) carry ``HEAVY``, one xdist group, so
  ``--dist loadgroup`` runs them one after another in one worker instead of side by side on 2 cores.
- A worker that crashes fails the test it was running and the run goes on (tests/worker_crashes.py).
- Tests that torch.compile run ``ALONE`` with a longer limit (``COMPILES_TIMEOUT``): cold compiles are slow.
- Global torch state (deterministic algorithms, threads, RNGs: torch, numpy, random) is restored after
  every test.
"""

import contextlib
import ipaddress
import os
import random
import socket
from pathlib import Path

# Before anything imports huggingface_hub (it reads the variable once); tests that serve a local hub
# switch it off explicitly. Child processes inherit it through os.environ.
os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from colour_model import make_colour_model  # noqa: E402
from worker_crashes import pytest_testnodedown, pytest_xdist_make_scheduler  # noqa: E402,F401 (hooks)
from mixnet import save_pretrained  # noqa: E402
from mixnet.deploy import runtimes  # noqa: E402
from mixnet.deploy.runtimes import native_bf16  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
REQUIRE_DATA_ENV = "MIXNET_REQUIRE_DATA"
HEAVY = pytest.mark.xdist_group("heavy")
# Run by a second pytest process of their own (`-m alone`, no xdist; the main run leaves them out): the
# two-process download test took its xdist worker down in the full suite, though never when run alone.
ALONE = pytest.mark.alone
# Tests that torch.compile a model: with a cold kernel cache (a fresh CI machine) inductor builds hundreds
# of C++ kernels, and one compiled training step took over 600 s beside the other xdist worker. They run
# ALONE, so inductor's compile workers have both cores, under this limit instead of pytest's 600 s.
COMPILES_TIMEOUT = pytest.mark.timeout(1800)


# bf16 paths refuse CPUs without native bf16 (tested with a faked CPU). OpenVINO's bf16 needs the real
# thing (elsewhere it quietly runs f32); PyTorch's bf16 autocast runs anywhere (see allow_bf16).
needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16")
# `python -c ALLOW_BF16 ARGS...` runs the mixnet command with allow_bf16's fake CPU, for subprocess tests.
ALLOW_BF16 = ("import sys; from mixnet.deploy import runtimes; flags = runtimes.cpu_flags(); "
              "runtimes.cpu_flags = lambda cpuinfo=None: flags | {'avx512_bf16'}; "
              "from mixnet.cli import main; sys.exit(main(sys.argv[1:]))")


def allow_bf16(monkeypatch) -> None:
    """Let `--amp bf16` train on any CPU. Where bf16 is not native PyTorch emulates it: slower (which
    is why the trainer refuses it there) but with the same bf16 rounding, so tests of its arithmetic
    hold on every CI machine instead of skipping on most."""
    flags = runtimes.cpu_flags()
    monkeypatch.setattr(runtimes, "cpu_flags", lambda cpuinfo=None: flags | {"avx512_bf16"})

if os.environ.get("PYTEST_XDIST_WORKER"):
    # CI runs one process per core (-n auto): MixNet's many small kernels parallelise poorly inside one
    # process, so two single-threaded processes finish far sooner.
    torch.set_num_threads(1)


def shared_data(*parts: str) -> Path:
    """``../shared/data/<parts>``; skips the calling test when it is missing, fails it under
    ``MIXNET_REQUIRE_DATA=1``."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        message = f"{path} not present"
        if os.environ.get(REQUIRE_DATA_ENV) == "1":
            pytest.fail(f"{message}, and {REQUIRE_DATA_ENV}=1 says it must be", pytrace=False)
        pytest.skip(message)
    return path


def counting(monkeypatch, owner, name: str) -> list:
    """Replace ``owner.name`` by a wrapper that still calls it and records each call in the returned
    list: proof that a code path ran."""
    calls = []
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


class RunsCode:
    """A pickle payload: unpickling it creates ``marker``, proof that a loader ran code from a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


# ---------------------------------------------------------------------------------------------- network


class NetworkRefused(OSError):
    pass


def _is_loopback(address) -> bool:
    if not isinstance(address, tuple):  # AF_UNIX paths and the like never leave the machine
        return True
    try:
        return ipaddress.ip_address(address[0]).is_loopback
    except ValueError:  # a host name: only "localhost" is allowed without resolving it
        return address[0] == "localhost"


def _guarded(method):
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address):
            raise NetworkRefused(f"tests may not connect to {address!r}: only loopback is allowed")
        return method(self, address)

    return connect


socket.socket.connect = _guarded(socket.socket.connect)
socket.socket.connect_ex = _guarded(socket.socket.connect_ex)


# ---------------------------------------------------------------------------------------------- torch state


@contextlib.contextmanager
def torch_state_restored():
    """Deterministic-algorithm mode, thread count and RNG states (torch, numpy, random) as they were
    on entry, whatever the body changed."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    rngs = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        torch.set_rng_state(rngs[0])
        np.random.set_state(rngs[1])
        random.setstate(rngs[2])


@pytest.fixture(autouse=True)
def restore_torch_state():
    """Training in-process switches on deterministic algorithms, sets threads and draws random numbers:
    none of that may leak into the next test."""
    with torch_state_restored():
        yield


# ---------------------------------------------------------------------------------------------- models


def randomized(name: str, seed: int = 0, **kwargs) -> torch.nn.Module:
    """``create_model(name, **kwargs)`` in eval mode with random batch-norm statistics and affine
    parameters and a random classifier: a fresh model's classifier is all zeros, and two forms of a
    model that both output zeros agree whatever their bugs."""
    from mixnet import create_model
    from mixnet.deploy.benchmark import randomize_batchnorm

    torch.manual_seed(seed)
    model = randomize_batchnorm(create_model(name, **kwargs), seed)
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, torch.nn.Linear):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            classifier.weight.copy_(torch.randn(classifier.weight.shape, generator=generator) * 0.05)
            classifier.bias.copy_(torch.rand(classifier.bias.shape, generator=generator) * 0.2 - 0.1)
    return model.eval()


@pytest.fixture(scope="session")
def colour_model():
    """A mixnet_s whose classifier is solved so that class k wins for images of colour k."""
    return make_colour_model()


@pytest.fixture(scope="session")
def weights_dir(colour_model, tmp_path_factory):
    """That model saved as a hub folder."""
    return save_pretrained(colour_model, tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="session")
def soft_colour_model():
    """The colour model with a margin of 1 logit: probabilities near 0.5, not saturated."""
    return make_colour_model(margin=1.0)


@pytest.fixture(scope="session")
def soft_weights_dir(soft_colour_model, tmp_path_factory):
    return save_pretrained(soft_colour_model, tmp_path_factory.mktemp("soft_weights"))


BIAS = (1.0, 0.0, -0.5)  # added to the logits: visibly different probabilities


@pytest.fixture(scope="session")
def biased_onnx(soft_colour_model, tmp_path_factory):
    """``(model, file)``: the soft model with BIAS added to its classifier, in PyTorch and exported to ONNX.
    Run in place of the soft model's own export, its answers show which file ran."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import copy

    from mixnet.deploy.export import export_model

    biased = copy.deepcopy(soft_colour_model)
    with torch.no_grad():
        biased.classifier.bias.add_(torch.tensor(BIAS))
    return biased, export_model(biased, tmp_path_factory.mktemp("onnx") / "biased.onnx").path
