"""The optimizer step alone: torch's AdamW against MuonAdamW (``--opt muon``), interleaved, on random
gradients of a fresh model (docs/small-data.md, "Muon for the dense convolutions").

    python benchmarks/optimizer_step.py --model mixnet_s --num-classes 10 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mixnet import create_model
from mixnet.training.optimizers import create_optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixnet_s")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=25, help="steps per optimizer; the first 5 are warm-up")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(args.model, num_classes=args.num_classes)
    optimizers = {name: create_optimizer(name, model, 4e-3, 0.05, beta2=0.99) for name in ("adamw", "muon")}
    times = {name: [] for name in optimizers}
    for _ in range(args.rounds):
        for name, optimizer in optimizers.items():
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            start = time.perf_counter()
            optimizer.step()
            times[name].append(time.perf_counter() - start)
    for name, t in times.items():
        print(f"{name}: median {1000 * statistics.median(t[5:]):.1f} ms per step")


if __name__ == "__main__":
    main()
