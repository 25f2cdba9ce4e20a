"""The first epochs of a training run, scored on the val photos: the probes behind docs/small-data.md.

Trains the first K epochs of an E-epoch `small-data` run (the schedule is that of the full run), evaluates
raw and EMA weights after each, and prints one JSON line per epoch. Settings are TrainConfig fields as
JSON; ``model_args`` reaches create_model, so ``{"model_args": {"init": "reference"}}`` starts from the
paper's initialisation.

    python benchmarks/first_epoch_probe.py ../shared/data/imagenette2-224 /tmp/probe-4e-3 \\
        '{"lr": 4e-3, "warmup_epochs": 0.5, "drop_rate": 0, "drop_path_rate": 0}'
"""

from __future__ import annotations

import argparse
import json

from mixnet.training.config import TrainConfig
from mixnet.training.distributed import setup_runtime
from mixnet.training.loop import Trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data")
    parser.add_argument("output", help="run directory (checkpoints and metrics of the probe)")
    parser.add_argument("settings", nargs="?", default="{}", help="TrainConfig fields as JSON")
    parser.add_argument("--epochs-run", type=int, default=1, help="epochs to train (K)")
    args = parser.parse_args()
    values = dict(data=args.data, output=args.output, epochs=5, train_size=128, eval_size=128, progress=False,
                  checkpoint_minutes=0, eval_every=1)
    values.update(json.loads(args.settings))
    config = TrainConfig.from_recipe("small-data", **values)
    trainer = Trainer(config, setup_runtime(config.device, config.threads))
    trainer.run_dir.mkdir(parents=True, exist_ok=True)
    for _ in range(args.epochs_run):
        trainer.train_epoch(None)
        row = trainer.finish_epoch()
        print(json.dumps({k: row.get(k) for k in ("epoch", "train_loss", "val_top1", "ema_val_top1",
                                                   "train_images_per_s", "epoch_time_s")}), flush=True)


if __name__ == "__main__":
    main()
