"""Turn a training run into the built-in default model shipped inside the package.

    python scripts/package_default_model.py RUN_DIR [--weights ema|raw]

Writes ``src/mixnet/pretrained/files/mixnet_s.imagenette.safetensors`` (fp16: half the size, same answers; the
loader casts back to fp32) and its ``.json`` hub config, with the run's evaluation size and readable
class names, and prints the sha256 to register in ``mixnet.pretrained.registry.WEIGHTS``. Also draws the training
curve into ``docs/imagenette-curves.png``: when the run started from another run's weights
(``--pretrained RUN/last.pth`` or ``RUN/final/...``), that run's epochs come first, so the figure shows
the whole training.
The run's class folders are ImageNet wnids; the shipped names are ImageNet's readable names for them,
from which ``validate`` maps the wnid folders back.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from mixnet import create_model, save_pretrained
from mixnet.pretrained.download import file_sha256
from mixnet.data.imagenet import imagenet_class_names, imagenet_wnids
from mixnet.training.run_dir import LAST, load_checkpoint, write_curves
from mixnet.fileio import atomic_write

TAG = "mixnet_s.imagenette"
PACKAGE_WEIGHTS = Path(__file__).resolve().parents[1] / "src" / "mixnet" / "pretrained" / "files"
CURVES = Path(__file__).resolve().parents[1] / "docs" / "imagenette-curves.png"


def training_stages(state) -> list:
    """The checkpoint's state, preceded by those of the runs it was started from (oldest first)."""
    stages = [state]
    while stages[0].config.get("pretrained"):
        # RUN/last.pth, RUN/final/model.safetensors or another folder inside RUN: the run is the
        # file's folder or the one above it, whichever holds a training checkpoint
        started_from = Path(stages[0].config["pretrained"])
        previous_run = next((d for d in started_from.parents[:2] if (d / LAST).is_file()), None)
        if previous_run is None:
            break  # started from published or foreign weights: nothing more to draw
        stages.insert(0, load_checkpoint(previous_run / LAST))
    return stages


def write_whole_curve(stages: list) -> None:
    history, marks, offset = [], [], 0
    for stage in stages:
        history += [{**row, "epoch": row["epoch"] + offset} for row in stage.history]
        offset = history[-1]["epoch"]
        marks.append(offset)
    write_curves(CURVES, history, marks=tuple(marks[:-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--weights", choices=["ema", "raw"], default="ema")
    parser.add_argument("--checkpoint", default="last.pth", help="checkpoint file in the run directory")
    args = parser.parse_args()

    state = load_checkpoint(args.run_dir / args.checkpoint)
    config = state.config
    names_by_wnid = dict(zip(imagenet_wnids(), imagenet_class_names()))
    class_names = [names_by_wnid[wnid] for wnid in state.class_names]
    model = create_model(config["model"], num_classes=len(class_names), **config["model_args"])
    model.load_state_dict(state.state_dict_ema if args.weights == "ema" else state.state_dict)
    model.pretrained_cfg.update(input_size=(3, config["eval_size"], config["eval_size"]),
                                crop_pct=config["eval_crop_pct"], interpolation=config["interpolation"])
    model.half()
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(model, tmp, class_names=class_names)
        hub_config = json.loads((folder / "config.json").read_text())
        hub_config["training"] = dict(run=str(args.run_dir), checkpoint=args.checkpoint, epoch=state.epoch,
                                      update=state.update, weights=args.weights, epochs=config["epochs"],
                                      started_from=config.get("pretrained"))
        PACKAGE_WEIGHTS.mkdir(parents=True, exist_ok=True)
        target = PACKAGE_WEIGHTS / f"{TAG}.safetensors"
        with atomic_write(target) as f:
            f.write((folder / "model.safetensors").read_bytes())
        with atomic_write(target.with_suffix(".json"), "w", encoding="utf-8") as f:
            json.dump(hub_config, f, indent=2)
    print(f"{target} ({target.stat().st_size:,} bytes) from epoch {state.epoch}, update {state.update}")
    print(f"sha256 {file_sha256(target)}")
    stages = training_stages(state)
    write_whole_curve(stages)
    print(f"{CURVES}: {len(stages)} stage(s), {sum(len(s.history) for s in stages)} epochs")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
