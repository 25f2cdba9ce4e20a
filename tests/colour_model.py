"""A MixNet whose answers are known: its classifier is solved so that class k wins for images of colour k.

Shared by test_predict.py and test_evaluate.py. The expected answers come from the construction
(least squares on the pooled features of solid-colour inputs built here by hand), not from the code
under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mixnet import create_model

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 50, 210)}
INPUT_SIZE = 64  # small inputs keep the tests fast; solid colours look the same at any size


def make_colour_model(margin: float = 10.0):
    """``margin``: how many logits each colour's own class leads by. The default 10 gives near-certain
    answers; a small margin gives probabilities far from 0 and 1, where a wrong computation shows."""
    torch.manual_seed(0)
    model = create_model("mixnet_s", num_classes=len(COLOURS)).eval()
    model.pretrained_cfg.update(input_size=(3, INPUT_SIZE, INPUT_SIZE), class_names=list(COLOURS))
    mean = torch.tensor(model.pretrained_cfg["mean"])[:, None, None]
    std = torch.tensor(model.pretrained_cfg["std"])[:, None, None]
    solid = torch.stack([(torch.tensor(rgb, dtype=torch.float32)[:, None, None] / 255 - mean) / std
                         for rgb in COLOURS.values()]).expand(-1, 3, INPUT_SIZE, INPUT_SIZE)
    with torch.no_grad():
        features = model.forward_head(model.forward_features(solid), pre_logits=True)  # (3, 1536)
        # W @ f_k = margin e_k: each colour's own class leads by ``margin`` logits.
        model.classifier.weight.copy_(margin * torch.linalg.pinv(features.T.double()).float())
        model.classifier.bias.zero_()
        assert model(solid).argmax(1).tolist() == list(range(len(COLOURS)))
    return model


def write_colour_image(path: Path, colour: str, size=(80, 60)) -> Path:
    """A solid colour with a little noise, saved in the format of the file's suffix."""
    rng = np.random.default_rng(len(str(path)))
    pixels = np.clip(np.array(COLOURS[colour]) + rng.integers(-6, 7, (size[1], size[0], 3)), 0, 255)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.astype(np.uint8)).save(path)
    return path


def write_framed_square(path: Path, centre: str, frame: str) -> Path:
    """A 100 px photo of colour ``frame`` with a 30 px square of colour ``centre`` in its middle: what the
    model answers depends on how much of the photo its center crop keeps."""
    img = Image.new("RGB", (100, 100), COLOURS[frame])
    img.paste(COLOURS[centre], (35, 35, 65, 65))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
