"""Training throughput (images/s) of our MixNet against timm's, in the same training step, side by side.

The step is the one ``mixnet train`` runs per update: forward under the chosen precision, label-smoothed
cross-entropy, backward, optimizer step (the recipe's optimizer, weight decay off biases and norms) and
the weight-EMA update. Inputs are random tensors already in memory (data loading is the same for both
models and is measured by ``--data`` separately). Models are timed in interleaved rounds, so load from
other processes hits both alike; medians are reported, and the ratio is ours / timm's (> 1: we are faster).

    python benchmarks/train_throughput.py --model mixnet_s --batch-size 64 --size 128 --channels-last
    python benchmarks/train_throughput.py --data /path/to/imagenette2-224 --size 128   # + loader images/s
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from mixnet import TrainConfig, create_model
from mixnet.training.optimizers import ModelEma, create_optimizer


def make_step(model, config: TrainConfig, channels_last: bool, amp: str):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format).train()
    optimizer = create_optimizer(config.opt, model, 1e-3, config.weight_decay, config.momentum, config.opt_eps)
    ema = ModelEma(model, 0.999)
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if amp == "bf16" else nullcontext
    updates = [0]

    def step(images, targets):
        images = images.contiguous(memory_format=memory_format)
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = F.cross_entropy(model(images).float(), targets, label_smoothing=0.1)
        loss.backward()
        optimizer.step()
        ema.update(model, updates[0])
        updates[0] += 1

    return step


def time_models(args) -> dict:
    import timm

    config = TrainConfig.from_recipe(args.recipe)
    torch.manual_seed(0)
    steps = {
        "mixnet": make_step(create_model(args.model, num_classes=args.num_classes,
                                         drop_path_rate=config.drop_path_rate), config, args.channels_last, args.amp),
        "timm": make_step(timm.create_model(args.model, num_classes=args.num_classes,
                                            drop_path_rate=config.drop_path_rate), config, args.channels_last, args.amp),
    }
    images = torch.randn(args.batch_size, 3, args.size, args.size)
    targets = torch.randint(0, args.num_classes, (args.batch_size,))
    for step in steps.values():
        for _ in range(args.warmup):
            step(images, targets)
    times = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(images, targets)
            times[name].append(time.perf_counter() - start)
    result = {name: args.batch_size / statistics.median(t) for name, t in times.items()}
    return dict(images_per_s=result, ratio=result["mixnet"] / result["timm"])


def time_loader(args) -> float:
    """Images/s of the training data pipeline alone (decode + augmentation), as ``mixnet train`` runs it."""
    from torch.utils.data import DataLoader

    from mixnet.data.images import LabelledImageFolder, build_train_transform, collate
    from mixnet.training.sampling import EpochSampler, SeededSamples

    config = TrainConfig.from_recipe(args.recipe)
    transform = build_train_transform(args.size, scale=config.scale, randaugment_ops=config.randaugment_ops,
                                      randaugment_magnitude=config.randaugment_magnitude,
                                      randaugment_std=config.randaugment_std)
    dataset = LabelledImageFolder(f"{args.data}/train", transform=transform)
    loader = DataLoader(SeededSamples(dataset), batch_size=args.batch_size, num_workers=args.workers,
                        sampler=EpochSampler(len(dataset), 0), collate_fn=collate)
    count, start = 0, None
    for i, batch in enumerate(loader):
        if i == 1:  # the first batch includes worker start-up
            count, start = 0, time.perf_counter()
        count += len(batch.images)
        if i == args.loader_batches:
            break
    return count / (time.perf_counter() - start)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixnet_s")
    parser.add_argument("--recipe", default="small-data", help="optimizer and drop-path come from this recipe")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", help="also time the data pipeline on DIR/train")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--loader-batches", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = dict(settings=vars(args), threads=torch.get_num_threads(), **time_models(args))
    if args.data:
        report["loader_images_per_s"] = time_loader(args)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    ips = report["images_per_s"]
    print(f"{args.model} training step, batch {args.batch_size} at {args.size} px, amp {args.amp}, "
          f"channels_last {args.channels_last}, {report['threads']} threads:")
    print(f"  mixnet {ips['mixnet']:8.1f} img/s   timm {ips['timm']:8.1f} img/s   ratio {report['ratio']:.2f}")
    if args.data:
        print(f"  data pipeline ({args.workers} workers): {report['loader_images_per_s']:.1f} img/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
