"""Inference images/s of our MixNet paths against timm's, side by side in one process (see RESULTS.md).

Runs ``mixnet.deploy.benchmark.run_benchmark`` (interleaved rounds, medians) for the issue's configurations and
prints a Markdown table with the ratios ours / timm, ready to paste into benchmarks/RESULTS.md.

    python benchmarks/inference_vs_timm.py                       # mixnet_s and mixnet_l, batch 1 and 32
    python benchmarks/inference_vs_timm.py --model mixnet_s --batch-size 1 --repeats 30 --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform

import torch

from mixnet.deploy.benchmark import INFER_PATHS, ratios, run_benchmark, to_json
from mixnet.fileio import atomic_write


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mixnet_s", "mixnet_l"])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--paths", default=",".join(INFER_PATHS), help="comma-separated benchmark paths")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", metavar="FILE", help="also write the raw results here")
    args = parser.parse_args()

    results = []
    for batch_size in args.batch_size:  # one batch size at a time: rounds stay interleaved within it
        results += run_benchmark(args.model, [batch_size], args.paths.split(","), warmup=args.warmup,
                                 repeats=args.repeats, num_threads=args.threads)
    print(f"{datetime.date.today()}, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| model | batch | path | images/s | p50 ms | p95 ms | peak MiB | setup s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        memory = "-" if r.peak_memory_mb is None else f"{r.peak_memory_mb:.0f}"
        print(f"| {r.model} | {r.batch_size} | {r.path} | {r.images_per_s:.1f} | {r.latency_p50_ms:.1f} | "
              f"{r.latency_p95_ms:.1f} | {memory} | {r.setup_s:.1f} |")
    print()
    for row in ratios(results):
        parts = ", ".join(f"{k[3:]} x{v:.2f}" for k, v in row.items() if k.startswith("vs_"))
        print(f"- {row['model']} batch {row['batch_size']}, best ours = {row['ours']}: {parts}")
    if args.json:
        with atomic_write(args.json, "w", encoding="utf-8") as f:
            json.dump(to_json(results), f, indent=2)


if __name__ == "__main__":
    main()
