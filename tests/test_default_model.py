"""The built-in default model: real weights trained here, real photos, so these tests can fail."""

from pathlib import Path

import pytest

import mixnet
from conftest import HEAVY, shared_data
from mixnet.cli import main
from mixnet.pretrained.registry import DEFAULT_TAG, WEIGHTS

ROOT = Path(__file__).resolve().parents[1]

# The class of each shipped example photo, known from the Imagenette folder it was copied from.
EXAMPLES = {"tench.jpg": "tench", "english_springer.jpg": "English springer", "church.jpg": "church",
            "garbage_truck.jpg": "garbage truck", "golf_ball.jpg": "golf ball", "parachute.jpg": "parachute"}


@pytest.fixture(scope="module")
def model():
    return mixnet.load_model(DEFAULT_TAG)


def test_default_model_is_a_10_class_mixnet_s_with_readable_names(model):
    assert model.model_name == "mixnet_s" and model.num_classes == 10
    assert "golf ball" in model.pretrained_cfg["class_names"]


def test_default_model_classifies_the_example_photos(model):
    assert sorted(p.name for p in (ROOT / "examples").glob("*.jpg")) == sorted(EXAMPLES)
    results = mixnet.predict(model, sorted((ROOT / "examples").glob("*.jpg")), topk=1)
    for result in results:
        assert result.error is None
        assert result.top[0].name == EXAMPLES[Path(result.source).name], result.source


def test_predict_without_a_model_uses_the_default(capsys):
    assert main(["predict", str(ROOT / "examples" / "church.jpg"), "--json", "--topk", "1"]) == 0
    assert '"church"' in capsys.readouterr().out


@HEAVY
def test_validate_reproduces_the_registered_imagenette_accuracy(model):
    entry = WEIGHTS[DEFAULT_TAG]
    report = mixnet.validate(model, shared_data("imagenette2-224", "val"), batch_size=64, workers=2,
                             progress=False)
    # Thread counts change float rounding, which may flip a borderline image: allow one image (0.03%).
    assert abs(report.top1 - entry.top1) <= 0.03
    assert abs(report.top5 - entry.top5) <= 0.03
