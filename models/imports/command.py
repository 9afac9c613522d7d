"""`attnserve import SOURCE --out DIR`: the subcommand for service/cli.py."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from models.attention import ATTENTION_BLOCKS
from models.imports import import_source
from models.registry import list_models


def register(subparsers: Any) -> None:
    """Add the `import` subcommand to `subparsers` (from add_subparsers())."""
    parser = subparsers.add_parser(
        "import",
        help="turn a timm / Hugging Face hub directory or a checkpoint into a model package",
        description="Import a timm / Hugging Face hub directory (config.json + model.safetensors "
        "or pytorch_model.bin) or a torchvision / official checkpoint (.safetensors, .pth, "
        ".pth.tar, .bin) into a model package the server serves. Sources: docs/models.md.",
    )
    parser.add_argument("source", help="hub directory or checkpoint file")
    parser.add_argument(
        "--out", required=True, help="package directory to create (absent or empty)"
    )
    parser.add_argument("--name", help="model name (default: the --out directory's name)")
    parser.add_argument("--arch", choices=list_models(), help="architecture (default: detected)")
    parser.add_argument(
        "--attention", choices=list(ATTENTION_BLOCKS), help="attention block (default: detected)"
    )
    parser.add_argument("--labels", help="class names, one a line (default: config or ImageNet-1k)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    try:
        card = import_source(
            args.source,
            args.out,
            name=args.name,
            arch=args.arch,
            attention=args.attention,
            labels_file=args.labels,
        )
    except ValueError as exc:
        sys.stderr.write(f"attnserve import: {exc}\n")
        return 2
    info = card.training["import"]
    sys.stdout.write(
        f"imported {args.source} ({info['layout']}) as {card.name}: {card.arch} + "
        f"{card.attention}, {card.num_classes} classes ({info['labels']}), input "
        f"{card.data_config.input_size[1]}x{card.data_config.input_size[2]} -> {args.out}\n"
    )
    return 0
