"""`attnserve train`, `attnserve evaluate` and `attnserve zoo`: subcommands for service/cli.py.

`register(subparsers)` adds them to an argparse subparsers object; each sets `func`, which
takes the parsed namespace and returns an exit code.
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from models.attention import ATTENTION_BLOCKS, SINGLE_BLOCKS
from models.package import load_package
from models.registry import get_arch_spec
from models.training.data import (
    HELDOUT_RECIPE,
    TrainingData,
    digits_training_data,
    heldout_canvases,
    scoring_canvases,
    validation_canvases,
)
from models.training.evaluate import evaluate_grid, evaluate_model, format_grid, format_table
from models.training.imagefolder import imagefolder_training_data, load_folder
from models.training.train import TrainConfig, accuracy, save_trained, train_model

ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
ZOO_RECIPE = TrainConfig(
    arch="resnet_small",
    epochs=24,
    batch_size=64,
    lr=4e-3,
    weight_decay=0.05,
    seed=0,
    model_kwargs={"depths": [1, 2, 1]},
)
"""The one recipe every shipped digits-<block> model is trained with (only the block differs)."""
ZOO_BLOCKS = SINGLE_BLOCKS
"""The shipped models: every block alone (combinations such as "stn+cbam" are not shipped)."""
ZOO_STN = {"transform": "attention", "output_size": [32, 32]}
"""The zoo's transformer: the paper's attention-restricted transform (scale and translation),
sampling a 32x32 output from the 64x64 canvas as the paper samples a smaller output."""


STN_EPOCH_FACTOR = 3
"""A front transformer's classifier sees the 32x32 crop, a quarter of the pixels, so an epoch
costs about a third: digits-stn trains three times the epochs in about the same time."""


def zoo_epochs(block: str, epochs: int = ZOO_RECIPE.epochs) -> int:
    """The epochs of digits-<block> for a zoo of `epochs` epochs."""
    return epochs * STN_EPOCH_FACTOR if "stn" in block.split("+") else epochs


ZOO_STN_TRAINING = {"stn_lr_scale": 0.3, "stn_box_loss": 10.0, "stn_box_scale": 0.85}
"""How digits-stn's transformer trains: at 0.3x the learning rate, and pulled towards the digit
box's central 85 % by an L1 loss on theta (10x; docs/models.md, "The spatial transformer")."""


def zoo_config(block: str, epochs: int = ZOO_RECIPE.epochs) -> TrainConfig:
    """The training recipe of digits-<block> for a zoo of `epochs` epochs."""
    stn = ZOO_STN_TRAINING if "stn" in block.split("+") else {}
    return replace(
        ZOO_RECIPE,
        attention=block,
        epochs=zoo_epochs(block, epochs),
        model_kwargs=zoo_model_kwargs(block),
        **stn,
    )


def zoo_model_kwargs(block: str) -> dict[str, Any]:
    """The architecture options of digits-<block>: the recipe's, plus the transformer's."""
    extra = {"stn_kwargs": ZOO_STN} if "stn" in block.split("+") else {}
    return {**ZOO_RECIPE.model_kwargs, **extra}


ZOO_THREADS = 1
"""One thread per model: deterministic, and faster than two on a busy machine."""


def _user_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[..., int]:
    """Report a bad path or an unusable package/folder as one line and exit status 2."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ValueError, FileNotFoundError) as exc:
            sys.stderr.write(f"attnserve {getattr(args, 'command', '')}: {exc}\n")
            return 2

    return run


def register(subparsers: Any) -> None:
    """Add the train, evaluate and zoo subcommands to `subparsers` (from add_subparsers())."""
    _add_train(subparsers.add_parser("train", help="train a model and write a model package"))
    _add_evaluate(
        subparsers.add_parser("evaluate", help="accuracy and localization of a model package")
    )
    _add_zoo(subparsers.add_parser("zoo", help="retrain the shipped digits-<block> models"))


class _DataSource(argparse.Action):
    """`--data digits` or `--data imagefolder PATH`, stored as (kind, path or None)."""

    def __call__(self, parser: Any, namespace: Any, values: Any, option: Any = None) -> None:
        if values == ["digits"]:
            setattr(namespace, self.dest, ("digits", None))
        elif len(values) == 2 and values[0] == "imagefolder":
            setattr(namespace, self.dest, ("imagefolder", Path(values[1])))
        else:
            parser.error(f"--data {' '.join(values)}: expected 'digits' or 'imagefolder PATH'")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=ZOO_THREADS, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _data_option(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument(
        "--data",
        nargs="+",
        action=_DataSource,
        default=("digits", None),
        metavar="SOURCE",
        help=help_text,
    )


def _add_train(parser: argparse.ArgumentParser) -> None:
    d = ZOO_RECIPE
    _data_option(parser, "'digits' (cluttered digits) or 'imagefolder PATH' (a folder per class)")
    parser.add_argument("--arch", default=d.arch, help="architecture (see models.list_models)")
    parser.add_argument("--attention", default="none", choices=ATTENTION_BLOCKS)
    parser.add_argument("--epochs", type=int, default=d.epochs)
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=d.weight_decay)
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--depths", type=int, nargs="+", help="blocks per stage (resnet_small; the zoo: 1 2 1)"
    )
    parser.add_argument(
        "--stn-transform", choices=("affine", "attention"), help="stn: the transform (affine)"
    )
    parser.add_argument(
        "--stn-output-size", type=int, nargs=2, metavar=("H", "W"), help="stn: sampled size"
    )
    parser.add_argument(
        "--stn-lr-scale", type=float, default=d.stn_lr_scale, help="stn: x the learning rate"
    )
    parser.add_argument(
        "--stn-box-loss",
        type=float,
        default=d.stn_box_loss,
        help="stn: weight of the L1 loss between theta and the digit box (digits data only)",
    )
    parser.add_argument(
        "--stn-box-scale",
        type=float,
        default=d.stn_box_scale,
        help="stn: the box loss's target, the digit box scaled about its centre by this",
    )
    parser.add_argument(
        "--image-size", type=int, nargs=3, metavar=("C", "H", "W"), help="imagefolder input size"
    )
    parser.add_argument(
        "--val-per-class", type=int, default=0, help="digits: validation digits per class"
    )
    parser.add_argument("--limit", type=int, help="digits: train on the first N training digits")
    parser.add_argument("--max-batches", type=int, help="stop each epoch after N batches")
    parser.add_argument("--name", help="package name (default: <data>-<attention>)")
    parser.add_argument("--out", type=Path, required=True, help="package directory to write")
    _common(parser)
    parser.set_defaults(func=run_train)


def _add_evaluate(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("package", type=Path, help="model package directory")
    parser.add_argument("--limit", type=int, help="evaluate on the first N held-out canvases")
    parser.add_argument(
        "--val-per-class",
        type=int,
        default=0,
        help="digits: score on the validation carve of `train --val-per-class N` instead of the "
        "held-out digits (what a recipe is chosen on)",
    )
    _data_option(parser, "'digits' (the held-out canvases) or 'imagefolder PATH'")
    parser.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _common(parser)
    parser.set_defaults(func=run_evaluate)


def _add_zoo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=ZOO_DIR, help="where digits-<block>/ go")
    parser.add_argument(
        "--blocks",
        nargs="+",
        default=list(ZOO_BLOCKS),
        choices=ATTENTION_BLOCKS,
        metavar="BLOCK",
        help=f"blocks to retrain (default: all of {', '.join(ZOO_BLOCKS)})",
    )
    parser.add_argument("--epochs", type=int, default=ZOO_RECIPE.epochs)
    parser.add_argument(
        "--jobs",
        type=int,
        default=min(len(ZOO_BLOCKS), os.cpu_count() or 1),
        help="models trained in parallel, one process each (default: one per CPU core)",
    )
    _common(parser)
    parser.set_defaults(func=run_zoo)


def _training_data(args: argparse.Namespace, config: TrainConfig) -> TrainingData:
    kind, path = args.data
    if kind == "digits":
        return digits_training_data(config.seed, args.val_per_class, args.limit)
    size = args.image_size or get_arch_spec(config.arch).data_config(3, 2).input_size
    return imagefolder_training_data(path, tuple(size), config.seed)


def _train_config(args: argparse.Namespace) -> TrainConfig:
    kwargs: dict[str, Any] = {"depths": args.depths} if args.depths else {}
    stn = {"transform": args.stn_transform, "output_size": args.stn_output_size}
    stn = {k: v for k, v in stn.items() if v is not None}
    if stn:
        kwargs["stn_kwargs"] = stn
    return TrainConfig(
        arch=args.arch,
        attention=args.attention,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        seed=args.seed,
        stn_lr_scale=args.stn_lr_scale,
        stn_box_loss=args.stn_box_loss,
        stn_box_scale=args.stn_box_scale,
        model_kwargs=kwargs,
        max_batches=args.max_batches,
    )


@_user_errors
def run_train(args: argparse.Namespace) -> int:
    """Train one model as asked on the command line and write its package."""
    torch.set_num_threads(args.threads)
    config = _train_config(args)
    data = _training_data(args, config)
    result = train_model(config, data, progress=not args.no_progress)
    if data.name == "digits":  # the grid of recipes: `attnserve evaluate`
        metrics = {"dataset": "digits-heldout", **evaluate_model(result.model, heldout_canvases())}
        if args.val_per_class:  # what a recipe is chosen on: the held-out recipe, other digits
            val = validation_canvases(HELDOUT_RECIPE, args.val_per_class)
            scores = evaluate_model(result.model, val)
            metrics["validation"] = {
                "recipe": HELDOUT_RECIPE.name,
                "samples": len(val),
                **{k: scores[k] for k in ("accuracy", "summary", "region_iou") if k in scores},
            }
    elif data.validation is not None:
        acc = accuracy(result.model, *data.validation)
        metrics = {"dataset": "imagefolder-validation", "accuracy": round(acc, 4)}
    else:
        metrics = {}
    name = args.name or f"{data.name}-{config.attention}"
    save_trained(name, config, data, result, args.out, metrics)
    print(f"wrote {args.out} ({result.wall_time_s:.0f} s): {json.dumps(_brief(metrics))}")
    return 0


def _brief(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("accuracy", "summary", "region_iou", "validation")
    return {k: metrics[k] for k in keys if k in metrics}


def _digit_metrics(model: Any, limit: int | None = None, val_per_class: int = 0) -> dict[str, Any]:
    """Scores on the held-out digits (or, with `val_per_class`, on that validation carve of the
    training digits): the held-out recipe, and every recipe of the grid."""
    canvases = functools.partial(scoring_canvases, val_per_class=val_per_class)
    dataset = f"digits-validation-{val_per_class}" if val_per_class else "digits-heldout"
    scores = evaluate_model(model, canvases(HELDOUT_RECIPE).subset(limit))
    grid = evaluate_grid(model, limit=limit, canvases=canvases)
    return {"dataset": dataset, **scores, "grid": grid}


@_user_errors
def run_evaluate(args: argparse.Namespace) -> int:
    """Print accuracy and localization scores of a package on the held-out digits (or a folder)."""
    torch.set_num_threads(args.threads)
    model, card = load_package(args.package)
    kind, path = args.data
    if kind == "imagefolder":
        config = card.data_config
        images, labels, _ = load_folder(path, config.input_size, config.crop_pct)
        metrics: dict[str, Any] = {
            "samples": len(labels),
            "accuracy": accuracy(model, images, labels),
        }
    else:
        metrics = _digit_metrics(model, args.limit, args.val_per_class)
    if args.json:
        print(json.dumps(metrics, indent=2))
    elif kind == "imagefolder":
        print(f"{card.name}: accuracy {metrics['accuracy']:.4f} on {metrics['samples']} images")
    else:
        row = {card.name: {"block": card.attention, **metrics}}
        print(format_table(row))
        print("\nunseen clutter recipes (pieces x size): accuracy / pointing / energy in box")
        print(format_grid(row))
    return 0


def zoo_member(block: str, out: Path, epochs: int, threads: int, progress: bool) -> dict[str, Any]:
    """Train digits-<block> with the zoo recipe, score it on the held-out set and save it."""
    torch.set_num_threads(threads)
    config = zoo_config(block, epochs)
    data = digits_training_data(config.seed)
    result = train_model(config, data, progress=progress)
    metrics = _digit_metrics(result.model)
    name = f"digits-{block}"
    save_trained(name, config, data, result, out / name, metrics)
    print(f"{name}: {result.wall_time_s:.0f} s, {json.dumps(_brief(metrics))}", flush=True)
    return {"block": block, "wall_time_s": round(result.wall_time_s, 1), **metrics}


@_user_errors
def run_zoo(args: argparse.Namespace) -> int:
    """Retrain every digits-<block> model with the zoo recipe (`--jobs` processes at a time)."""
    start = time.perf_counter()
    progress = args.jobs == 1 and not args.no_progress
    print(f"training {len(args.blocks)} models into {args.out}, {args.jobs} at a time", flush=True)
    tasks = [(block, args.out, args.epochs, args.threads, progress) for block in args.blocks]
    if args.jobs == 1:
        rows = [zoo_member(*task) for task in tasks]
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            rows = list(pool.map(zoo_member, *zip(*tasks, strict=True)))
    table = {f"digits-{row['block']}": row for row in rows}
    print(format_table(table))
    print("\nunseen clutter recipes (pieces x size): accuracy / pointing / energy in box")
    print(format_grid(table))
    print(f"zoo wall time: {time.perf_counter() - start:.0f} s")
    return 0
