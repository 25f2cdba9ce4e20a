"""A training step with blocks run piece by piece (the default) against split-and-concat, and timm's.

    python benchmarks/train_by_piece.py --model mixnet_s mixnet_l --batch-size 32 --image-size 128 \
        --threads 2 --repeats 10

One process, the three steps interleaved (``mixnet.deploy.benchmark.measure``), channels_last, SGD, the same
random weights; prints the median images/s of each and the ratios. "split" is our model with every block's
``pieces`` cleared, so its forward splits the expanded channels, runs the depthwise convs and
concatenates, as timm's does.
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

import mixnet
from mixnet.deploy.benchmark import build_train_step, measure, randomize_batchnorm
from mixnet.models.blocks import InvertedResidual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mixnet_s"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.model:
        model = randomize_batchnorm(mixnet.create_model(name))
        split = copy.deepcopy(model)
        for block in split.modules():
            if isinstance(block, InvertedResidual):
                block.pieces = None
        steps = {"pieces": build_train_step("mixnet-cl", model, name, args.batch_size),
                 "split": build_train_step("mixnet-cl", split, name, args.batch_size),
                 "timm": build_train_step("timm-cl", model, name, args.batch_size)}
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(memory_format=torch.channels_last)
        times = measure(steps, x, warmup=2, repeats=args.repeats)
        rate = {path: args.batch_size / statistics.median(t) for path, t in times.items()}
        print(f"{name}, batch {args.batch_size}, {args.image_size} px, {args.threads} threads, "
              f"{args.repeats} rounds: " + ", ".join(f"{p} {r:.1f} img/s" for p, r in rate.items())
              + f"; pieces / split x{rate['pieces'] / rate['split']:.3f}, pieces / timm "
              f"x{rate['pieces'] / rate['timm']:.3f}")


if __name__ == "__main__":
    main()
