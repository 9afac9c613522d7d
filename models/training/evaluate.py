"""Localization benchmark: do a model's attention maps point at the digit it classifies?

On the held-out cluttered-digit canvases every model is scored for accuracy and, for its summary
map (`models.summary_map`, the function the service uses) and for every site's spatial view,
by two localization scores against the digit's 28x28 placement box:
- pointing game: the map's argmax (first one on ties) falls inside the box;
- energy in box: the share of the map's mass inside the box (a map with no mass counts as
  uniform, i.e. the baseline).
A uniform map scores box area / canvas area on both (784 / 4096 = 0.191). A spatial
transformer's `region` is scored by its IoU with the digit box. `evaluate_grid` repeats the
scores over the clutter recipes of the evaluation grid, which training never draws.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from models.attention import capture_attention, spatial_views, summary_map
from models.training.data import (
    GRID_RECIPES,
    Canvases,
    ClutterRecipe,
    box_fraction,
    heldout_canvases,
)
from models.training.train import to_input


def box_masks(boxes: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """(N, H, W) boolean masks of the (x0, y0, x1, y1) boxes."""
    rows = torch.arange(size[0]).view(1, -1, 1)
    cols = torch.arange(size[1]).view(1, 1, -1)
    b = torch.from_numpy(boxes).view(-1, 4, 1, 1)
    return (cols >= b[:, 0]) & (cols < b[:, 2]) & (rows >= b[:, 1]) & (rows < b[:, 3])


def localization(maps: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (pointing hit, energy in box) of (N, H, W) non-negative maps."""
    flat = maps.flatten(1)
    inside = masks.flatten(1)
    hits = inside.gather(1, flat.argmax(1, keepdim=True))[:, 0].float()
    total = flat.sum(1)
    energy = (flat * inside).sum(1) / total.clamp_min(1e-12)
    uniform = inside.float().mean(1)
    return hits, torch.where(total > 0, energy, uniform)


def region_iou(corners: torch.Tensor, boxes: np.ndarray, samples: int = 4) -> torch.Tensor:
    """Per-image IoU of a convex quadrilateral (N, 4, 2) of (x, y) pixel-edge coordinates with
    the (x0, y0, x1, y1) boxes: the intersection counted on `samples` x `samples` points per
    pixel of the box, the quadrilateral's own area by the shoelace formula."""
    quad = corners.double()
    b = torch.from_numpy(boxes).double()
    x, y = quad[..., 0], quad[..., 1]
    area = 0.5 * (x * y.roll(-1, 1) - x.roll(-1, 1) * y).sum(1).abs()
    ious = []
    for n in range(len(b)):
        x0, y0, x1, y1 = (float(v) for v in b[n])
        xs = x0 + (torch.arange(round((x1 - x0) * samples), dtype=torch.float64) + 0.5) / samples
        ys = y0 + (torch.arange(round((y1 - y0) * samples), dtype=torch.float64) + 0.5) / samples
        px, py = torch.meshgrid(xs, ys, indexing="xy")
        edges = quad[n].roll(-1, 0) - quad[n]
        cross = edges[:, 0, None, None] * (py - quad[n, :, 1, None, None]) - edges[
            :, 1, None, None
        ] * (px - quad[n, :, 0, None, None])
        inside = (cross >= 0).all(0) | (cross <= 0).all(0)
        inter = inside.double().mean() * (x1 - x0) * (y1 - y0)
        union = area[n] + (x1 - x0) * (y1 - y0) - inter
        ious.append(inter / union.clamp_min(1e-12))
    return torch.stack(ious).float()


class _Scores:
    """Running sums of pointing hits and energies per map name."""

    def __init__(self) -> None:
        self.sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
        self.info: dict[str, dict[str, Any]] = {}

    def add(self, name: str, maps: torch.Tensor, masks: torch.Tensor) -> None:
        hits, energy = localization(maps, masks)
        entry = self.sums[name]
        entry[0] += float(hits.sum())
        entry[1] += float(energy.sum())
        entry[2] += len(hits)

    def result(self, name: str) -> dict[str, Any]:
        hits, energy, count = self.sums[name]
        return {
            **self.info.get(name, {}),
            "pointing": round(hits / count, 4),
            "energy": round(energy / count, 4),
        }


@torch.no_grad()
def evaluate_model(model: nn.Module, canvases: Canvases, batch_size: int = 100) -> dict[str, Any]:
    """Accuracy and localization scores (summary map and per site) of `model` on `canvases`."""
    size = canvases.images.shape[-2:]
    if tuple(model.data_config.input_size) != (1, *size):
        raise ValueError(
            f"the digit canvases are 1x{size[0]}x{size[1]} but the model takes "
            f"{model.data_config.input_size}. Hint: evaluate it on its own data "
            "(--data imagefolder PATH)"
        )
    model.eval()
    scores = _Scores()
    correct = 0
    has_summary = False
    ious: list[torch.Tensor] = []
    for start in range(0, len(canvases), batch_size):
        part = slice(start, start + batch_size)
        x = to_input(canvases.images[part, None], model.data_config)
        with capture_attention(model, derived=True) as cap:
            logits = model(x)
        correct += int((logits.argmax(1).numpy() == canvases.labels[part]).sum())
        masks = box_masks(canvases.boxes[part], size)
        summary = summary_map(cap.records, size)
        if summary is not None:
            has_summary = True
            scores.add("summary", summary, masks)
        for view in spatial_views(cap.records):
            scores.info[view.site] = {"kind": view.kind, "derived": view.derived}
            scores.add(view.site, summary_map([view], size), masks)
        regions = [r.tensor for r in cap.records if r.kind == "region"]
        if regions:
            ious.append(region_iou(regions[0], canvases.boxes[part]))
    result = {
        "samples": len(canvases),
        "accuracy": round(correct / len(canvases), 4),
        "baseline": round(box_fraction(), 4),
        "summary": scores.result("summary") if has_summary else None,
        "sites": {site: scores.result(site) for site in scores.info},
    }
    if ious:
        result["region_iou"] = round(float(torch.cat(ious).mean()), 4)
    return result


def _heldout(recipe: ClutterRecipe) -> Canvases:
    return heldout_canvases(recipe=recipe)


def evaluate_grid(
    model: nn.Module,
    recipes: tuple[ClutterRecipe, ...] = GRID_RECIPES,
    limit: int | None = None,
    canvases: Callable[[ClutterRecipe], Canvases] = _heldout,
) -> dict[str, dict[str, Any]]:
    """Per recipe of the grid (`limit` canvases each, of the held-out digits unless `canvases`
    draws others): accuracy, the summary map's pointing and energy, and the region IoU of a
    spatial transformer."""
    grid = {}
    for recipe in recipes:
        metrics = evaluate_model(model, canvases(recipe).subset(limit))
        row = {"samples": metrics["samples"], "accuracy": metrics["accuracy"]}
        if metrics["summary"] is not None:
            row.update(metrics["summary"])
        if "region_iou" in metrics:
            row["region_iou"] = metrics["region_iou"]
        grid[recipe.name] = row
    return grid


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table, one row per model: accuracy, summary and per-site localization."""
    base = box_fraction()
    lines = [
        "| model | block | accuracy | pointing (summary) | energy in box (summary) "
        "| per-site pointing / energy |",
        "|---|---|---|---|---|---|",
    ]
    for name, metrics in results.items():
        summary = metrics.get("summary")
        point = f"{summary['pointing']:.3f}" if summary else "n/a (no map)"
        energy = f"{summary['energy']:.3f}" if summary else "n/a (no map)"
        sites = "; ".join(
            f"{site} {s['kind']}{'*' if s['derived'] else ''} {s['pointing']:.2f} / "
            f"{s['energy']:.2f}"
            for site, s in metrics.get("sites", {}).items()
        )
        if "region_iou" in metrics:
            sites += f"; region IoU with the box {metrics['region_iou']:.2f}"
        lines.append(
            f"| {name} | {metrics.get('block', '')} | {metrics['accuracy']:.3f} | {point} "
            f"| {energy} | {sites or '-'} |"
        )
    lines.append(f"| uniform map | - | - | {base:.3f} | {base:.3f} | - |")
    return "\n".join(lines)


def format_grid(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table, one row per model and one column per recipe of its "grid" metrics:
    accuracy / pointing / energy (and region IoU where there is a region); then worst-case
    columns over the grid."""
    first = next(iter(results.values()))["grid"]
    names = [r.name for r in GRID_RECIPES if r.name in first] or list(first)
    lines = [
        "| model | " + " | ".join(names) + " | min accuracy | min pointing |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for name, metrics in results.items():
        grid = metrics["grid"]
        cells = [_grid_cell(grid[recipe]) for recipe in names]
        worst_acc = min(row["accuracy"] for row in grid.values())
        points = [row["pointing"] for row in grid.values() if "pointing" in row]
        worst_point = f"{min(points):.3f}" if points else "-"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {worst_acc:.3f} | {worst_point} |")
    base = box_fraction()
    uniform = f"- / {base:.2f} / {base:.2f}"
    lines.append("| uniform map | " + " | ".join([uniform] * len(names)) + f" | - | {base:.3f} |")
    return "\n".join(lines)


def _grid_cell(row: dict[str, Any]) -> str:
    cell = f"{row['accuracy']:.3f}"
    if "pointing" in row:
        cell += f" / {row['pointing']:.2f} / {row['energy']:.2f}"
    if "region_iou" in row:
        cell += f" / IoU {row['region_iou']:.2f}"
    return cell
