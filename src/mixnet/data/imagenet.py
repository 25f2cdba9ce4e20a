"""The ImageNet-1k classes in standard index order: WordNet ids and readable names.

The list ships with the package (``imagenet_classes.tsv``), derived from the file names of the
imagenet-sample-images collection, one photo per class, whose sorted order is the standard index.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import List, Tuple


@lru_cache(maxsize=1)
def _table() -> Tuple[Tuple[str, str], ...]:
    text = resources.files(__package__).joinpath("imagenet_classes.tsv").read_text(encoding="utf-8")
    return tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line)


def imagenet_wnids() -> List[str]:
    """The 1000 WordNet ids (``n01440764``, ...) in class-index order."""
    return [wnid for wnid, _ in _table()]


def imagenet_class_names() -> List[str]:
    """The 1000 readable class names (``tench``, ``goldfish``, ...) in class-index order."""
    return [name for _, name in _table()]
