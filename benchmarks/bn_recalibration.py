"""A model's val top-1 before and after its BatchNorm statistics are recomputed on the eval view.

Training crops are random-resized and evaluation crops centered, so the running statistics describe
another view of the photos than the one scored. This recomputes them as a plain average over the
training photos seen through the model's evaluation transform (the weights unchanged) and scores the
model on the val photos before and after: the check behind docs/small-data.md's "Two end-of-run checks".

    python benchmarks/bn_recalibration.py runs/s20_wd15_s1/final ../shared/data/imagenette2-224
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.utils.data import DataLoader

from mixnet.data.images import LabelledImageFolder, build_eval_transform, collate, folder_classes
from mixnet.factory import load_model
from mixnet.inference.validate import map_folders_to_classes, validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="weights tag, file, hub folder or training run")
    parser.add_argument("data", help="folder with train/<class>/ and val/<class>/")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the order the training photos are read in")
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model = load_model(args.model, progress=False).eval()
    before = validate(model, f"{args.data}/val", progress=False)

    train = f"{args.data}/train"
    dataset = LabelledImageFolder(train, transform=build_eval_transform(model),
                                  class_to_idx=map_folders_to_classes(folder_classes(train), model))
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:  # only the norms train: the blocks stay in eval mode, so they run unsplit
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average over every batch, not an exponential one
        norm.train()
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=args.batch_size, shuffle=True, num_workers=1, collate_fn=collate):
            model(batch.images)
    model.eval()
    after = validate(model, f"{args.data}/val", progress=False)
    print(json.dumps({"photos": len(dataset),
                      "top1_before": round(before.top1, 2), "loss_before": round(before.loss, 4),
                      "top1_after": round(after.top1, 2), "loss_after": round(after.loss, 4)}))


if __name__ == "__main__":
    main()
