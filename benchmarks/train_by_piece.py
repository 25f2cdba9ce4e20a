"""A training step with blocks run piece by piece against split-and-concat, and timm's.

    python benchmarks/train_by_piece.py --model mixnet_s mixnet_l --batch-size 32 --image-size 128 \
        --threads 2 --repeats 10
    python benchmarks/train_by_piece.py --per-block --model mixnet_s --batch-size 8 --image-size 128

One process, the steps interleaved (``mixnet.deploy.benchmark.measure``), channels_last, SGD, the same
random weights; prints the median images/s of each and the ratios. "pieces" is our default (a block runs
by piece where a piece has at least ``InvertedResidual.min_piece_elements`` elements), "all pieces" every
split block by piece, "split" every block's ``pieces`` cleared, so its forward splits the expanded
channels, runs the depthwise convs and concatenates, as timm's does.

``--per-block`` times each split block's forward and backward alone, by piece and split, on the input it
gets in the model at that batch and size: the measurements behind ``min_piece_elements``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from typing import Callable

import torch
from torch import Tensor, nn

import mixnet
from mixnet.deploy.benchmark import build_train_step, measure, randomize_batchnorm
from mixnet.models.blocks import InvertedResidual


def with_blocks(model: nn.Module, change: Callable[[InvertedResidual], None]) -> nn.Module:
    """A copy of ``model`` with ``change`` applied to each inverted-residual block."""
    model = copy.deepcopy(model)
    for block in model.modules():
        if isinstance(block, InvertedResidual):
            change(block)
    return model


def all_pieces(block: InvertedResidual) -> None:
    block.min_piece_elements = 0


def no_pieces(block: InvertedResidual) -> None:
    block.pieces = None


def whole_steps(name: str, model: nn.Module, args) -> None:
    steps = {"pieces": build_train_step("mixnet-cl", model, name, args.batch_size),
             "all pieces": build_train_step("mixnet-cl", with_blocks(model, all_pieces), name, args.batch_size),
             "split": build_train_step("mixnet-cl", with_blocks(model, no_pieces), name, args.batch_size),
             "timm": build_train_step("timm-cl", model, name, args.batch_size)}
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(memory_format=torch.channels_last)
    times = measure(steps, x, warmup=2, repeats=args.repeats)
    rate = {path: args.batch_size / statistics.median(t) for path, t in times.items()}
    print(f"{name}, batch {args.batch_size}, {args.image_size} px, {args.threads} threads, "
          f"{args.repeats} rounds: " + ", ".join(f"{p} {r:.1f} img/s" for p, r in rate.items())
          + "; pieces / " + ", ".join(f"{p} x{rate['pieces'] / rate[p]:.3f}" for p in rate if p != "pieces"))


def forward_backward(block: nn.Module) -> Callable[[Tensor], None]:
    def run(x: Tensor) -> None:
        y = block(x.requires_grad_())
        y.backward(torch.ones_like(y))
        block.zero_grad(set_to_none=True)
    return run


def per_block(name: str, model: nn.Module, args) -> None:
    model = model.to(memory_format=torch.channels_last).train()
    inputs = {}
    hooks = [block.register_forward_pre_hook(lambda b, a: inputs.__setitem__(b, a[0].detach()))
             for block in model.modules() if isinstance(block, InvertedResidual) and block.pieces is not None]
    with torch.no_grad():
        model(torch.randn(args.batch_size, 3, args.image_size, args.image_size)
              .to(memory_format=torch.channels_last))
    for hook in hooks:
        hook.remove()
    print(f"{name}, batch {args.batch_size}, {args.image_size} px, {args.threads} threads, "
          f"{args.repeats} rounds; ms forward and backward:")
    print("block | input C x H | pieces | elements per piece | by piece | split | split / by piece")
    for i, (block, x) in enumerate(inputs.items()):
        runs = {"by piece": forward_backward(with_blocks(block, all_pieces)),
                "split": forward_backward(with_blocks(block, no_pieces))}
        ms = {k: 1e3 * statistics.median(t) for k, t in measure(runs, x, warmup=2, repeats=args.repeats,
                                                                 settle_s=0.0).items()}
        _, c, h, _ = x.shape
        print(f"{i} | {c} x {h} | {len(block.pieces)} | {block.elements_per_piece(x):,.0f} | "
              f"{ms['by piece']:.2f} | {ms['split']:.2f} | x{ms['split'] / ms['by piece']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mixnet_s"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--per-block", action="store_true", help="time each split block alone")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.model:
        model = randomize_batchnorm(mixnet.create_model(name))
        (per_block if args.per_block else whole_steps)(name, model, args)


if __name__ == "__main__":
    main()
