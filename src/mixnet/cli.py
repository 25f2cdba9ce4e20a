"""The ``mixnet`` command: one subcommand per job, each a thin layer over the Python API.

Exit codes: 0 success, 1 the job ran but some inputs failed, 2 usage or input errors.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from . import __version__
from .errors import MixNetError
from .model import create_model, list_models
from .configs import MODELS


def count_parameters(name: str) -> int:
    import torch

    with torch.device("meta"):  # no memory, no init cost: only shapes are needed
        model = create_model(name)
    return sum(p.numel() for p in model.parameters())


def cmd_list(args: argparse.Namespace) -> int:
    rows = [dict(name=name, params=count_parameters(name), description=MODELS[name].description)
            for name in list_models()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'model':<14}{'params':>13}  description")
    for r in rows:
        print(f"{r['name']:<14}{r['params']:>13,}  {r['description']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixnet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"mixnet {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("list", help="list the model architectures")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except MixNetError as e:
        print(f"mixnet {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
