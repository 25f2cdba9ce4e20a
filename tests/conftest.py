"""Fixtures shared by several test files, and one thread per test process under pytest-xdist."""

import os

import pytest
import torch

from colour_model import make_colour_model
from mixnet import save_pretrained

if os.environ.get("PYTEST_XDIST_WORKER"):
    # The suite runs as one process per core (-n auto in pyproject): MixNet's many small kernels
    # parallelise poorly inside one process, so two single-threaded processes finish far sooner.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def colour_model():
    """A mixnet_s whose classifier is solved so that class k wins for images of colour k."""
    return make_colour_model()


@pytest.fixture(scope="session")
def weights_dir(colour_model, tmp_path_factory):
    """That model saved as a hub folder."""
    return save_pretrained(colour_model, tmp_path_factory.mktemp("weights"))
