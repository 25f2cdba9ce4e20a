"""Model cards: parameters, multiply-adds, preprocessing and published weights of each architecture.

MACs are counted from the model itself, on the meta device (shapes only, no memory or arithmetic),
with torch's ``FlopCounterMode``: it counts convolutions and matrix products at 2 FLOPs per
multiply-add, so MACs = FLOPs / 2 ("conv + linear multiply-adds"; batch norm, activations, pooling
and the squeeze-excitation gating multiply are not counted). Counting takes about half a second per
model, so results are kept in a small JSON cache keyed by the architecture's full config.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

from .models.architectures import MODELS
from .data.images import eval_resize_size
from .errors import MixNetError
from .fileio import atomic_write, mixnet_cache_dir
from .factory import create_model, list_models, resolve_architecture

MACS_CONVENTION = "conv + linear multiply-adds"
CACHE_FILE = "model_stats.json"


def stats_cache_path() -> Path:
    """``model_stats.json`` in mixnet's cache folder (``fileio.mixnet_cache_dir``)."""
    return mixnet_cache_dir() / CACHE_FILE


def _stats_key(name: str, input_size: Sequence[int], num_classes: int) -> str:
    # The whole architecture config goes into the key, so a changed table never reads a stale count.
    spec = f"{MODELS[name].config!r}|{tuple(input_size)}|{num_classes}"
    return f"{name}:{hashlib.sha256(spec.encode()).hexdigest()[:16]}"


def count_stats(name: str, input_size: Optional[Sequence[int]] = None,
                num_classes: int = 1000) -> Tuple[int, int]:
    """``(parameters, MACs)`` of architecture ``name`` with ``num_classes`` classes for one image of
    ``input_size`` (default: the architecture's own), counted on the meta device."""
    input_size = tuple(input_size or MODELS[name].pretrained_cfg.input_size)
    with torch.device("meta"):
        model = create_model(name, num_classes=num_classes).eval()
        image = torch.empty(1, *input_size)
    params = sum(p.numel() for p in model.parameters())
    with FlopCounterMode(display=False) as counter:
        model(image)
    return params, counter.get_total_flops() // 2


def model_stats(names: Optional[Sequence[str]] = None, use_cache: bool = True,
                input_size: Optional[Sequence[int]] = None,
                num_classes: int = 1000) -> Dict[str, Dict[str, int]]:
    """``{name: {"params": ..., "macs": ...}}`` with ``num_classes`` classes at ``input_size`` (default:
    each architecture's own), from the cache when possible (an unreadable or unwritable cache is simply
    not used)."""
    names = list(names or list_models())
    cache_path = stats_cache_path()
    cache: Dict[str, Dict[str, int]] = {}
    if use_cache:
        try:
            cache = json.loads(cache_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            cache = {}
    result, missing = {}, False
    for name in names:
        size = tuple(input_size or MODELS[name].pretrained_cfg.input_size)
        key = _stats_key(name, size, num_classes)
        entry = cache.get(key)
        if not (isinstance(entry, dict) and {"params", "macs"} <= entry.keys()):
            params, macs = count_stats(name, size, num_classes)
            entry = cache[key] = {"params": params, "macs": macs}
            missing = True
        result[name] = {"params": int(entry["params"]), "macs": int(entry["macs"])}
    if use_cache and missing:
        try:
            with atomic_write(cache_path, "w", encoding="utf-8") as f:
                json.dump(cache, f, indent=1, sort_keys=True)
        except (OSError, MixNetError):
            pass  # a read-only home, or a cache folder below a file, only costs recounting next time
    return result


def pretrained_weights(architecture: str) -> List[dict]:
    """The published weights of an architecture with their reported accuracy and file size."""
    from .pretrained.registry import WEIGHTS, list_pretrained

    rows = []
    for tag in list_pretrained(architecture):
        entry = WEIGHTS[tag]
        rows.append(dict(tag=tag, top1=entry.top1, top5=entry.top5, file_size=entry.file_size,
                         license=entry.license))
    return rows


def model_card(name: str, use_cache: bool = True, pretrained_cfg: Optional[dict] = None) -> dict:
    """Everything ``mixnet info`` shows about one architecture, as plain data; for a weights tag, with
    the preprocessing and classes of those weights (and the parameters and MACs of that model), as for
    ``pretrained_cfg``, the config of a loaded model (``model.pretrained_cfg``: a run's, a file's)."""
    from .pretrained.checkpoint import registered_pretrained_cfg
    from .pretrained.registry import WEIGHTS

    arch = resolve_architecture(name)
    weights = name if name in WEIGHTS else None
    if pretrained_cfg is None and weights:
        pretrained_cfg = registered_pretrained_cfg(WEIGHTS[name])
    # The architecture's defaults first: a shipped config may leave fields out.
    cfg = {**MODELS[arch].pretrained_cfg.to_dict(), **(pretrained_cfg or {})}
    input_size, num_classes = tuple(cfg["input_size"]), cfg["num_classes"]
    stats = model_stats([arch], use_cache=use_cache, input_size=input_size, num_classes=num_classes)[arch]
    crop = input_size[-1]
    return dict(
        name=arch, weights=weights, description=MODELS[arch].description, params=stats["params"],
        macs=stats["macs"], macs_convention=MACS_CONVENTION, input_size=list(input_size), crop_size=crop,
        crop_pct=cfg["crop_pct"], resize_size=eval_resize_size(crop, cfg["crop_pct"]),
        interpolation=cfg["interpolation"], mean=list(cfg["mean"]), std=list(cfg["std"]),
        num_classes=num_classes, pretrained=pretrained_weights(arch))


def format_count(n: Optional[float], unit: str = "") -> str:
    """``239.2M``-style short counts."""
    if n is None:
        return "-"
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= threshold:
            return f"{n / threshold:.1f}{suffix}{unit}"
    return f"{n:g}{unit}"


def format_bytes(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2 ** 20:.1f} MiB"


def format_card(card: dict) -> str:
    """The model card as aligned text."""
    size = "x".join(map(str, card["input_size"]))
    lines = [
        f"{card['name']}: {card['description']}",
        *([f"  weights        {card['weights']}"] if card["weights"] else []),
        f"  classes        {card['num_classes']}",
        f"  parameters     {card['params']:,}",
        f"  MACs           {format_count(card['macs'])} at {size} ({card['macs_convention']})",
        f"  input size     {size}",
        f"  preprocessing  resize shorter side to {card['resize_size']} ({card['interpolation']}), "
        f"center crop {card['crop_size']} (crop_pct {card['crop_pct']})",
        f"  mean           {', '.join(f'{v:g}' for v in card['mean'])}",
        f"  std            {', '.join(f'{v:g}' for v in card['std'])}",
    ]
    if card["pretrained"]:
        width = max(len(w["tag"]) for w in card["pretrained"])
        lines.append("  pretrained weights:")
        lines.append(f"    {'tag':<{width}}  {'top-1':>6}  {'top-5':>6}  {'size':>9}")
        for w in card["pretrained"]:
            top1 = "-" if w["top1"] is None else f"{w['top1']:.2f}"
            top5 = "-" if w["top5"] is None else f"{w['top5']:.2f}"
            lines.append(f"    {w['tag']:<{width}}  {top1:>6}  {top5:>6}  {format_bytes(w['file_size']):>9}")
    else:
        lines.append("  pretrained weights: none published")
    return "\n".join(lines)
