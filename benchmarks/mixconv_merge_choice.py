"""Merged or split, block by block: which MixConv form each runtime runs faster (see RESULTS.md).

A merged MixConv is one depthwise conv with its smaller kernels zero-padded to the largest (more
multiply-adds, one kernel call); a split one is a split, one conv per kernel size and a concat. Which
is faster depends on the layer (kernel sizes, resolution, width) and the runtime. This script exports
the inference graph with every MixConv merged and with none merged, names each ONNX node after the block
it comes from, and sums OpenVINO's per-node times per block (splits, concats, the activations they keep
from being fused: everything in the block). Blocks that ran faster split make a third graph, merged
everywhere else. Then the three graphs are timed end to end, interleaved, in each runtime.

    python benchmarks/mixconv_merge_choice.py --model mixnet_s --batch-size 1 --precision f32 bf16
"""

from __future__ import annotations

import argparse
import ast
import collections
import re
import statistics
import tempfile
from pathlib import Path
from typing import Dict, List

import onnx
import torch

from mixnet import create_model
from mixnet.deploy.benchmark import measure, randomize_batchnorm
from mixnet.deploy.export import OnnxRuntimeModel, export_model
from mixnet.deploy.runtimes import OpenVinoModel
from mixnet.models.fusion import mixed_conv_names
from openvino_layer_times import layer_times  # benchmarks/, beside this script


def block_of(scopes: List[str]) -> str:
    """'blocks.2.0' for a node made inside block 2.0, else 'other' (stem, head, classifier)."""
    blocks = [s for s in scopes if re.fullmatch(r"blocks\.\d+\.\d+", s)]
    return blocks[0] if blocks else "other"


def name_nodes_by_block(path: Path) -> None:
    """Rename every node of the ONNX file at ``path`` to 'BLOCK|name', so profilers report blocks.

    Nodes the exporter left without scopes (the splits) take the block of the node that consumes them.
    """
    graph = onnx.load(str(path))
    blocks: Dict[int, str] = {}
    for i, node in enumerate(graph.graph.node):
        meta = {p.key: p.value for p in node.metadata_props}
        if "pkg.torch.onnx.name_scopes" in meta:
            blocks[i] = block_of(ast.literal_eval(meta["pkg.torch.onnx.name_scopes"]))
    consumers = collections.defaultdict(list)
    for i, node in enumerate(graph.graph.node):
        for name in node.input:
            consumers[name].append(i)
    for i, node in enumerate(graph.graph.node):
        if i not in blocks:
            users = [j for out in node.output for j in consumers[out] if j in blocks]
            blocks[i] = blocks[users[0]] if users else "other"
        node.name = f"{blocks[i]}|{node.name}"
    onnx.save(graph, str(path))


def block_of_node(p) -> str:
    """The block a profiled OpenVINO node belongs to; reorders are named after the node they feed
    ('..._blocks.2.0|node_Conv_7')."""
    found = re.search(r"(blocks\.\d+\.\d+)\|", p.node_name)
    return found.group(1) if found else "other"


def block_order(block: str) -> list:
    """Sort key: 'blocks.2.10' after 'blocks.2.9'."""
    return [int(t) if t.isdigit() else t for t in block.split(".")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mixnet_s")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", nargs="+", default=["f32", "bf16"], help="OpenVINO precision hints")
    parser.add_argument("--calls", type=int, default=30, help="profiled calls per graph")
    parser.add_argument("--rounds", type=int, default=30, help="interleaved end-to-end rounds")
    args = parser.parse_args()
    torch.manual_seed(0)
    model = randomize_batchnorm(create_model(args.model)).eval()
    shape = (args.batch_size, 3, args.image_size, args.image_size)
    all_mixconvs = mixed_conv_names(model)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {}
        for label, merge in (("merged", True), ("split", False)):
            graphs[label] = export_model(model, Path(tmp) / f"{label}.onnx", "onnx", merge_mixconv=merge).path
            name_nodes_by_block(graphs[label])
        runners = {f"onnxruntime fp32 {label}": OnnxRuntimeModel(path, args.threads)
                   for label, path in graphs.items()}
        for precision in args.precision:
            merged = layer_times(graphs["merged"], precision, shape, args.threads, args.calls, key=block_of_node)
            split = layer_times(graphs["split"], precision, shape, args.threads, args.calls, key=block_of_node)
            print(f"\n{args.model} batch {args.batch_size} OpenVINO {precision}: ms per block, median of "
                  f"{args.calls} profiled calls (blocks with a MixConv)")
            print("| block | MixConvs | merged | split | faster |\n|---|---|---:|---:|---|")
            split_blocks = []
            for block in sorted(merged, key=block_order):
                mixconvs = [n[len(block) + 1:] for n in all_mixconvs if n.startswith(block + ".")]
                if not mixconvs:
                    continue
                faster = "split" if split.get(block, 0.0) < merged[block] else "merged"
                if faster == "split":
                    split_blocks.append(block)
                print(f"| {block} | {', '.join(mixconvs)} | {merged[block]:.3f} | {split.get(block, 0.0):.3f} "
                      f"| {faster} |")
            print(f"sum over the graph: merged {sum(merged.values()):.2f} ms, split {sum(split.values()):.2f} ms")
            keep_merged = [n for n in all_mixconvs if not any(n.startswith(b + ".") for b in split_blocks)]
            chosen = export_model(model, Path(tmp) / f"chosen-{precision}.onnx", "onnx",
                                  merge_mixconv=keep_merged).path
            for label, path in (*graphs.items(), ("chosen", chosen)):
                runners[f"openvino {precision} {label}"] = OpenVinoModel(path, precision, args.threads)
        x = torch.randn(shape)
        times = measure(runners, x, warmup=3, repeats=args.rounds)
        print(f"\nend to end, {args.rounds} interleaved rounds, images/s (median):")
        for name, seconds in times.items():
            print(f"  {name:32s} {args.batch_size / statistics.median(seconds):8.1f}")


if __name__ == "__main__":
    main()
