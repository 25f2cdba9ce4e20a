"""Where a training step's time goes, ours and timm's side by side: torch.profiler, grouped by kind of op.

    python benchmarks/train_step_profile.py --model mixnet_s --batch-size 32 --image-size 128 --threads 2

One process, both models built with the same random weights, channels_last, SGD, steps interleaved;
prints milliseconds per step (self CPU time) for each kind of op, and each kind's share of the step.
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


def kind(name: str, shapes) -> str:
    """The row an aten op's time is added to (depthwise convs told apart by their [C, 1, k, k] weight, and
    strided ones in backward by their smaller gradient)."""
    if name in ("aten::convolution_backward", "aten::mkldnn_convolution"):
        weight = shapes[2] if name == "aten::convolution_backward" else shapes[1]
        direction = "backward" if name.endswith("backward") else "forward"
        if len(weight) == 4 and weight[1] == 1 and weight[0] > 1:
            stride2 = name.endswith("backward") and shapes[0][2] < shapes[1][2]
            return f"depthwise conv {direction}{' (stride 2)' if stride2 else ''}"
        return f"other conv {direction}"
    if "batch_norm" in name:
        return "batch norm " + ("backward" if "backward" in name else "forward")
    if name in ("aten::cat", "aten::copy_", "aten::split_with_sizes", "aten::clone", "aten::contiguous"):
        return "cat / split copies"
    if any(a in name for a in ("silu", "threshold", "relu", "sigmoid", "clamp")):
        return "activations"
    if name in ("aten::add_", "aten::mul", "aten::mul_", "aten::add", "aten::addcmul_", "aten::lerp_"):
        return "elementwise add / mul"
    return "other"


def profile_steps(model, x, y, steps: int):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    rows = defaultdict(float)
    for event in prof.key_averages(group_by_input_shape=True):
        if event.key.startswith("aten::"):
            rows[kind(event.key, event.input_shapes)] += event.self_cpu_time_total / 1000 / steps
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixnet_s")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="profiles of each model, interleaved")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import timm

    import mixnet

    torch.manual_seed(0)
    ours = mixnet.create_model(args.model, num_classes=10)
    theirs = timm.create_model(args.model, num_classes=10)
    theirs.load_state_dict(ours.state_dict())
    models = {"mixnet": ours, "timm": theirs}
    for m in models.values():
        m.train().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.batch_size,))
    totals = {name: defaultdict(list) for name in models}
    for _ in range(args.rounds):
        for name, m in models.items():
            for row, ms in profile_steps(m, x, y, args.steps).items():
                totals[name][row].append(ms)
    median = {name: {row: sorted(v)[len(v) // 2] for row, v in rows.items()} for name, rows in totals.items()}
    step = {name: sum(rows.values()) for name, rows in median.items()}
    print(f"{args.model}, batch {args.batch_size}, {args.image_size} px, {args.threads} threads: ms per step "
          f"(self CPU time, median of {args.rounds} profiles of {args.steps} steps)")
    print("| op kind | mixnet ms | share | timm ms | share |\n|---|---:|---:|---:|---:|")
    for row in sorted(median["mixnet"], key=lambda r: -median["mixnet"][r]):
        cells = [f"{median[n].get(row, 0.0):.1f} | {100 * median[n].get(row, 0.0) / step[n]:.0f}%" for n in models]
        print(f"| {row} | {' | '.join(cells)} |")
    print(f"| **step** | {step['mixnet']:.1f} | | {step['timm']:.1f} | |")


if __name__ == "__main__":
    main()
