"""The test suite's own guards (tests/conftest.py): no internet, data required where CI says so, torch
state restored."""

import os
import random
import socket

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
