"""Fixtures shared by several test files."""

import pytest

from colour_model import make_colour_model
from mixnet import save_pretrained


@pytest.fixture(scope="session")
def colour_model():
    """A mixnet_s whose classifier is solved so that class k wins for images of colour k."""
    return make_colour_model()


@pytest.fixture(scope="session")
def weights_dir(colour_model, tmp_path_factory):
    """That model saved as a hub folder."""
    return save_pretrained(colour_model, tmp_path_factory.mktemp("weights"))
