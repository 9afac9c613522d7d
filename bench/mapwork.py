"""`python -m bench.mapwork [MODEL]`: the map work of a maps=all answer, old way against new.

On one thread, for a batch of digits through MODEL (default digits-coordatt) with attention
capture, microseconds per image of:

- upsampling one site's view to the model input grid: `F.interpolate` (bilinear) against
  `models.attention.summary.upsample_bilinear` (what `summary_map` uses), per view grid;
- a maps=all answer of every image of the batch: `service.maps.prepare_maps` giving the
  batch's maps as rounded numbers that orjson then writes per image (as the service did, and
  still does for the numbers of a PNG answer), against `prepare_maps` writing the JSON text
  itself (`_json_text`, what the service does for JSON answers); both then `build_result`
  and orjson per image.

Each figure is the median of `--repeats` timings of `--rounds` calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson
import torch
import torch.nn.functional as F

from bench.inprocess import load_model
from bench.inputs import load_inputs
from models.attention.summary import upsample_bilinear
from service.maps import MapOptions, MapPlan, build_result, prepare_maps
from service.pipeline import forward_items, prepare_items
from service.worker import keep_freed_memory

__all__ = ["main", "measure"]


def _us_per_image(fn: Callable[[], Any], images: int, rounds: int, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(rounds):
            fn()
        times.append((time.perf_counter() - start) / rounds / images)
    return round(1e6 * statistics.median(times), 1)


def measure(
    model: str = "digits-coordatt", batch: int = 16, rounds: int = 20, repeats: int = 5
) -> dict[str, float]:
    """{case: microseconds per image}, see the module docstring."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(model, batch, rounds, repeats)
    finally:
        torch.set_num_threads(threads)


def _measure(model: str, batch: int, rounds: int, repeats: int) -> dict[str, float]:
    keep_freed_memory()  # as the server does: no page faults from freed buffers
    loaded = load_model(model)
    options = MapOptions(maps="all")
    data = [image.data for image in load_inputs("digits")[:batch]]
    pairs = [prepare_items(d, [loaded.data_config], options, max_pixels=10**8)[0] for d in data]
    items = [item for _, item in pairs]
    out = forward_items(loaded.runner, items)
    size = tuple(loaded.data_config.input_size[1:])
    results: dict[str, float] = {}
    views = {tuple(r.tensor.shape[2:]): r.tensor[:, 0] for r in out.records if r.kind == "spatial"}
    for grid, view in sorted(views.items()):
        key = f"upsample {grid[0]}x{grid[1]} -> {size[0]}x{size[1]}"
        results[f"{key}: F.interpolate"] = _us_per_image(
            lambda v=view: _interpolate(v, size), batch, rounds, repeats
        )
        results[f"{key}: upsample_bilinear"] = _us_per_image(
            lambda v=view: upsample_bilinear(v, size), batch, rounds, repeats
        )
    json_plans = [item.maps for item in items]
    assert all(isinstance(plan, MapPlan) for plan in json_plans)
    # the same maps prepared as numbers (what a PNG answer gets), then written by orjson
    number_plans = [dataclasses.replace(plan, map_format="png") for plan in json_plans]
    labels = loaded.data_config.labels

    def answers(plans: list[Any]) -> list[bytes]:
        maps = prepare_maps(out.records, out.summary, plans)
        return [
            orjson.dumps(
                build_result(out.probs[g], maps[g], p.geometry, labels, options),
                option=orjson.OPT_SERIALIZE_NUMPY,
            )
            for g, (p, _) in enumerate(pairs)
        ]

    assert orjson.loads(answers(number_plans)[0]) == orjson.loads(answers(json_plans)[0])
    results["maps as numbers, then orjson"] = _us_per_image(
        lambda: answers(number_plans), batch, rounds, repeats
    )
    results["maps as JSON text"] = _us_per_image(
        lambda: answers(json_plans), batch, rounds, repeats
    )
    return results


def _interpolate(view: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(view[:, None], size=size, mode="bilinear", align_corners=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.mapwork", description=__doc__)
    parser.add_argument("model", nargs="?", default="digits-coordatt")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    results = measure(args.model, args.batch, args.rounds, args.repeats)
    print(f"{args.model}, batch {args.batch}, one thread: microseconds per image")
    for case, value in results.items():
        print(f"{case:<48} {value:8.1f}")


if __name__ == "__main__":
    main()
