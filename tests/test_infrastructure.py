"""The test suite's own guards (tests/conftest.py): no internet, data required where CI says so, torch
state restored, a crashed xdist worker failing its test rather than hanging the run."""

import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import NetworkRefused, shared_data, torch_state_restored


@pytest.mark.parametrize("address", [("8.8.8.8", 53), ("2001:4860:4860::8888", 53), ("example.com", 80)])
def test_connections_beyond_loopback_are_refused(address):
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        with pytest.raises(NetworkRefused, match="only loopback is allowed"):
            s.connect(address)
        with pytest.raises(NetworkRefused):
            s.connect_ex(address)
    if address[0][0].isdigit():  # create_connection would resolve a name first (DNS)
        with pytest.raises(NetworkRefused):
            socket.create_connection(address, timeout=1)


def test_loopback_connections_work():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname(), timeout=5) as client:
            peer, _ = server.accept()
            with peer:
                client.sendall(b"ping")
                assert peer.recv(4) == b"ping"


def test_subprocesses_inherit_hub_offline():
    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_missing_data_skips_or_fails_as_ci_asks(monkeypatch):
    monkeypatch.delenv("MIXNET_REQUIRE_DATA", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no-such-folder not present"):
        shared_data("no-such-folder")
    monkeypatch.setenv("MIXNET_REQUIRE_DATA", "1")
    with pytest.raises(pytest.fail.Exception, match="MIXNET_REQUIRE_DATA=1 says it must be"):
        shared_data("no-such-folder")


def test_torch_state_is_restored_after_a_test_changes_it():
    threads = torch.get_num_threads()
    assert not torch.are_deterministic_algorithms_enabled()
    with torch_state_restored():
        entry = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
        torch.use_deterministic_algorithms(True)
        torch.set_num_threads(threads + 1)
        torch.rand(3), np.random.rand(3), random.random()
    assert not torch.are_deterministic_algorithms_enabled() and torch.get_num_threads() == threads
    assert torch.equal(torch.get_rng_state(), entry[0])
    assert np.array_equal(np.random.get_state()[1], entry[1]) and random.getstate() == entry[2]


# A group of four, a test that kills its worker between ungrouped ones, and one that kills its worker
# inside the group: with pytest-xdist 3.8's own group scheduler this run waits forever.
CRASHING_SUITE = """
import os, signal, time, pytest

def crash():
    os.kill(os.getpid(), signal.SIGKILL)

@pytest.mark.parametrize("i", range(12))
def test_before(i):
    time.sleep(0.05)

@pytest.mark.xdist_group("heavy")
@pytest.mark.parametrize("i", range(4))
def test_grouped(i):
    time.sleep(0.1)
    if i == 2:
        crash()

def test_that_crashes():
    crash()

@pytest.mark.parametrize("i", range(12))
def test_after(i):
    time.sleep(0.05)
"""


def test_a_worker_that_crashes_fails_its_test_and_the_run_goes_on_to_the_end(tmp_path):
    (tmp_path / "test_suite.py").write_text(CRASHING_SUITE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not this project's settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env["PYTHONPATH"] = str(Path(__file__).parent)  # where worker_crashes is
    run = subprocess.run([sys.executable, "-m", "pytest", "-n", "2", "--dist", "loadgroup", "-p", "worker_crashes",
                          "-p", "no:cacheprovider", "-q", "test_suite.py"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=180)
    out = run.stdout
    assert run.returncode == 1, out[-3000:]
    assert "2 failed, 27 passed" in out, out[-3000:]  # 29 tests, each run once: the crashed ones not again
    for name in ("test_that_crashes", "test_grouped[2]"):
        assert f"crashed while running 'test_suite.py::{name}" in out, out[-3000:]
    assert out.count("ended with exit status -9; memory available now:") == 2, out[-3000:]
