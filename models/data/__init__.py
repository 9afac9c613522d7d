"""Data files shipped with the models package: the ImageNet-1k class names.

``imagenet_classes.txt`` holds the 1000 ImageNet-1k (ILSVRC 2012) class names in class-index order,
one a line, in the wording of torchvision's weights metadata (from pytorch/hub
``imagenet_classes.txt``). Checkpoints trained on ImageNet-1k answer in these names after import.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

IMAGENET_CLASSES_FILE = Path(__file__).resolve().parent / "imagenet_classes.txt"


@cache
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names, index order."""
    names = tuple(IMAGENET_CLASSES_FILE.read_text(encoding="utf-8").splitlines())
    if len(names) != 1000:
        raise RuntimeError(f"{IMAGENET_CLASSES_FILE} holds {len(names)} names, expected 1000")
    return names
