"""`python -m bench.roofline`: the forward pass against this machine's matrix limit, per variant.

In one run, in interleaved rounds (the variants' order rotates every round), it times:

- the physical limit: a large GEMM (`torch.mm`, n x n) in fp32, and in bf16 / fp16 where the
  device computes in them natively, with torch's default threads (all cores);
- each model's forward with attention capture on (`ModelRunner.forward(batch, capture=True)`, the
  service's own code, or a compiled or CUDA-graphed form of the same capture graph), per variant
  and batch size.

It reports images/s (the median over the rounds), GFLOP/s from the FLOPs counted once per
architecture (`bench.flops`), and the fraction of the GEMM limit of the same precision measured
in the same rounds. Rates per CPU-second (process CPU time) are reported beside the wall-clock
ones: on a shared machine they say how efficiently the cores we got were used.

Correctness, per variant against the eager float32 forward: fp32 variants must match within
1e-4 (probabilities and attention records; the min-max normalised summary map within 1e-3);
low-precision variants are judged by top-1 agreement over views of the photos in
`bench.inputs` (crops and flips) and by how far their maps move. The shipped digit models'
agreement under bf16 is measured on their held-out canvases too.

Variants are named mode-precision[-cl]: mode eager (ModelRunner without trace), trace (the
frozen TorchScript trace the service uses on the CPU), compile (torch.compile with inductor of
the capture graph, made by make_fx), cudagraph (the capture graph replayed as a CUDA graph);
precision fp32, bf16 or fp16 (autocast); -cl channels_last. One variant list serves every
device: a variant the device cannot run is skipped with its reason printed, so the CUDA command
runs the same code as the CPU one.

    .venv/bin/python -m bench.roofline                      # CPU, resnet50 + se / cbam at 224
    .venv/bin/python -m bench.roofline --device cuda --batch-sizes 1,8,32,64
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from PIL import Image

from bench.flops import count_flops
from bench.inputs import _photos
from bench.machine import describe_machine, machine_state
from models import DataConfig
from service.device import resolve_device
from service.graph import SUMMARY_ATOL, TracedForward, _Capturing
from service.imaging import preprocess
from service.repository import ModelSource, random_sources, scan_repository
from service.runner import BatchOutput, ModelRunner, _to_cpu, autocast_problem, cpu_has_bf16
from service.settings import default_model_repository

__all__ = ["VARIANTS", "main"]

VARIANTS = (
    "eager-fp32",
    "trace-fp32",
    "trace-fp32-cl",
    "eager-bf16",
    "eager-bf16-cl",
    "eager-fp16",
    "eager-fp16-cl",
    "compile-fp32",
    "compile-bf16",
    "cudagraph-fp32-cl",
    "cudagraph-fp16-cl",
    "cudagraph-bf16-cl",
)
DEFAULT_VARIANTS = tuple(v for v in VARIANTS if not v.startswith("compile"))
REFERENCE = "eager-fp32"
FP32_ATOL = 1e-4
BF16_AGREEMENT = 0.99  # top-1 agreement a low-precision variant must keep
LOW_MAP_TOL = 0.05  # mean |summary map - fp32 summary map| a low-precision variant must keep
SHIPPED_CANVASES = 500
_PRECISION = {"fp32": "none", "bf16": "bf16", "fp16": "fp16"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Variant:
    name: str
    mode: str  # eager, trace, compile, cudagraph
    precision: str  # fp32, bf16, fp16
    channels_last: bool

    @classmethod
    def parse(cls, name: str) -> Variant:
        parts = name.split("-")
        if name not in VARIANTS:
            raise ValueError(f"unknown variant {name!r}; valid: {', '.join(VARIANTS)}")
        return cls(name, parts[0], parts[1], parts[-1] == "cl")

    def problem(self, device: torch.device) -> str | None:
        """Why this variant cannot run on `device`, or None."""
        problem = autocast_problem(device, _PRECISION[self.precision])
        if problem is not None:
            return problem.split(" Hint:")[0]
        if self.mode == "trace" and device.type != "cpu":
            return "the service traces models on the CPU only"
        if self.mode == "cudagraph" and device.type != "cuda":
            return "CUDA graphs need a CUDA device"
        if self.mode == "compile":
            if device.type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
                return "torch.compile on the CPU needs a C++ compiler (g++ or $CXX)"
            if device.type == "cuda" and importlib.util.find_spec("triton") is None:
                return "torch.compile on CUDA needs triton"
        return None


Forward = Callable[[torch.Tensor], BatchOutput]


def _capture_fn(module: Callable, capturing: _Capturing) -> Callable[[torch.Tensor], BatchOutput]:
    """Wrap a callable with _Capturing's outputs into a forward that returns a BatchOutput."""
    graph = TracedForward(module, module, capturing.names, capturing.has_summary)  # type: ignore[arg-type]

    def forward(x: torch.Tensor) -> BatchOutput:
        return _to_cpu(BatchOutput(*graph.capture(x)))

    return forward


class CompiledForward:
    """torch.compile (inductor) of the capture graph, one compiled graph per batch size.

    make_fx turns `_Capturing` (the model under `capture_attention`, softmax and summary map)
    into one aten graph, with autocast's casts written into it, so the hooks never reach dynamo.
    """

    def __init__(self, model: torch.nn.Module, variant: Variant, device: torch.device) -> None:
        self.model = model.to(device).eval()
        if variant.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.variant, self.device = variant, device
        self._graphs: dict[int, Forward] = {}

    def _autocast(self) -> Any:
        dtype = _DTYPES[self.variant.precision]
        return torch.autocast(self.device.type, dtype=dtype, enabled=dtype != torch.float32)

    def _build(self, x: torch.Tensor) -> Forward:
        from torch.fx.experimental.proxy_tensor import make_fx

        capturing = _Capturing(self.model)
        with torch.no_grad(), self._autocast():
            graph = make_fx(capturing)(x)
        return _capture_fn(torch.compile(graph, dynamic=False), capturing)

    def __call__(self, batch: torch.Tensor) -> BatchOutput:
        x = batch.to(self.device)
        if self.variant.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        n = int(x.shape[0])
        with torch.inference_mode():
            if n not in self._graphs:
                self._graphs[n] = self._build(x)
            return self._graphs[n](x)


class CudaGraphForward(CompiledForward):
    """The capture graph recorded once per batch size as a CUDA graph and replayed; the input
    is copied into the graph's static input. Autocast's weight cache is off while recording."""

    def _build(self, x: torch.Tensor) -> Forward:
        capturing = _Capturing(self.model)
        dtype = _DTYPES[self.variant.precision]
        cast = {"enabled": dtype != torch.float32, "cache_enabled": False}
        static = x.clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.autocast("cuda", dtype=dtype, **cast):
            for _ in range(3):
                capturing(static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.autocast("cuda", dtype=dtype, **cast), torch.cuda.graph(graph):
            outputs = capturing(static)

        def replay(x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            static.copy_(x)
            graph.replay()
            return outputs

        return _capture_fn(replay, capturing)


def build_forward(source: ModelSource, variant: Variant, device: torch.device) -> Forward:
    """A fresh copy of the model, prepared as `variant` on `device`, as a capture forward."""
    model = source.build()
    if variant.mode in ("eager", "trace"):
        runner = ModelRunner(
            source.name,
            model,
            device=device,
            autocast=_PRECISION[variant.precision],
            channels_last=variant.channels_last,
            trace=variant.mode == "trace",
        )
        if variant.mode == "trace" and not runner.traced:
            raise RuntimeError("the trace disagreed with eager; the service would run it eagerly")
        return lambda batch: runner.forward(batch, capture=True)
    if variant.mode == "compile":
        return CompiledForward(model, variant, device)
    return CudaGraphForward(model, variant, device)


# --- inputs ------------------------------------------------------------------------------------


def photo_views(config: DataConfig, count: int) -> torch.Tensor:
    """`count` preprocessed views of the bench photos: for each photo the whole image, then the
    four corner squares of 70 % of its short side, each also mirrored (10 views per photo)."""
    views = []
    for _, array in _photos():
        image = Image.fromarray(array)
        w, h = image.size
        side = int(0.7 * min(w, h))
        boxes = [None, (0, 0), (w - side, 0), (0, h - side), (w - side, h - side)]
        for box in boxes:
            crop = image if box is None else image.crop((*box, box[0] + side, box[1] + side))
            for flip in (False, True):
                view = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else crop
                views.append(preprocess(view, config).tensor)
    order = [views[i::10] for i in range(10)]  # every photo first, then the next view of each
    return torch.stack([v for group in order for v in group][:count])


def _batches(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    return [x[i : i + size] for i in range(0, x.shape[0], size)]


def run_all(forward: Forward, x: torch.Tensor, size: int) -> BatchOutput:
    parts = [forward(b) for b in _batches(x, size)]
    first = parts[0]
    records = [
        type(r)(r.site, r.block, r.kind, torch.cat([p.records[i].tensor for p in parts]), r.derived)
        for i, r in enumerate(first.records)
    ]
    summary = None if first.summary is None else torch.cat([p.summary for p in parts])  # type: ignore[misc]
    return BatchOutput(torch.cat([p.probs for p in parts]), records, summary)


def compare(reference: BatchOutput, got: BatchOutput) -> dict[str, Any]:
    """How far `got` is from `reference`: top-1 agreement, max differences, summary map error."""
    n = len(got)
    ref = BatchOutput(reference.probs[:n], reference.records, reference.summary)
    agree = (ref.probs.argmax(1) == got.probs.argmax(1)).float().mean().item()
    if [(r.site, r.kind) for r in ref.records] != [(r.site, r.kind) for r in got.records]:
        raise ValueError("the variant records other attention sites than eager")
    record_diff = max(
        (
            (a.tensor[:n] - b.tensor).abs().max().item()
            for a, b in zip(ref.records, got.records, strict=True)
        ),
        default=0.0,
    )
    out = {
        "images": n,
        "top1_agreement": round(agree, 4),
        "probs_max_abs": (ref.probs - got.probs).abs().max().item(),
        "records_max_abs": record_diff,
    }
    if ref.summary is not None and got.summary is not None:
        diff = (ref.summary[:n] - got.summary).abs()
        out["summary_max_abs"] = diff.max().item()
        out["summary_mean_abs"] = diff.mean().item()
    return out


def judge(variant: Variant, diff: dict[str, Any]) -> bool:
    if variant.precision == "fp32":
        return (
            diff["probs_max_abs"] <= FP32_ATOL
            and diff["records_max_abs"] <= FP32_ATOL
            and diff.get("summary_max_abs", 0.0) <= SUMMARY_ATOL
        )
    return (
        diff["top1_agreement"] >= BF16_AGREEMENT
        and diff.get("summary_mean_abs", 0.0) <= LOW_MAP_TOL
    )


def shipped_agreement(
    precision: str, device: torch.device, count: int = SHIPPED_CANVASES
) -> list[dict[str, Any]]:
    """Every shipped model (the repository's latest versions): fp32 against `precision`
    autocast on the first `count` canvases of the models' fixed held-out set (real MNIST
    digits in clutter, never trained on), top-1 agreement and map error."""
    from models.training.data import heldout_canvases

    rows = []
    digits = heldout_canvases().subset(count).images
    for name, model_dir in sorted(scan_repository(default_model_repository()).items()):
        source = next(iter(model_dir.selected()), None)
        if source is None:
            continue
        config = cast(DataConfig, source.build().data_config)
        x = torch.stack([preprocess(Image.fromarray(d), config).tensor for d in digits])
        ref = ModelRunner(name, source.build(), device=device).forward(x, capture=True)
        low = ModelRunner(
            name, source.build(), device=device, autocast=_PRECISION[precision]
        ).forward(x, capture=True)
        rows.append({"model": name, "precision": precision, **compare(ref, low)})
    return rows


# --- timing -------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gemm_rate(
    device: torch.device, dtype: torch.dtype, n: int, budget_s: float
) -> dict[str, float]:
    """Sustained GFLOP/s of n x n matrix products for about `budget_s` seconds."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn((n, n), generator=generator).to(device, dtype)
    b = torch.randn((n, n), generator=generator).to(device, dtype)
    out = torch.mm(a, b)
    _sync(device)
    count, t0, c0 = 0, time.perf_counter(), time.process_time()
    while count < 2 or time.perf_counter() - t0 < budget_s:
        torch.mm(a, b, out=out)
        _sync(device)  # else CUDA queues far more products than the budget allows
        count += 1
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    flops = 2.0 * n**3 * count
    return {"gflops": flops / wall / 1e9, "gflops_per_cpu_s": flops / max(cpu, 1e-9) / 1e9}


def time_forward(forward: Forward, batch: torch.Tensor, repeats: int) -> dict[str, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        forward(batch)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    images = repeats * int(batch.shape[0])
    return {"images_per_s": images / wall, "images_per_cpu_s": images / max(cpu, 1e-9)}


def profile_forward(forward: Forward, batch: torch.Tensor) -> dict[str, Any]:
    """One forward under torch.profiler: the ops by self CPU time, and the convolutions' share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        forward(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key or "mkldnn" in e.key)
    return {
        "table": events.table(sort_by="self_cpu_time_total", row_limit=12),
        "self_cpu_ms": round(total / 1000, 1),
        "conv_share": round(conv / total, 3) if total else 0.0,
    }


# --- the run ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--models", default="resnet50:se,resnet50:cbam", help="arch:block, random weights"
    )
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help="comma-separated; 'all'")
    p.add_argument("--batch-sizes", default="1,8", help="comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median counts)")
    p.add_argument(
        "--repeats",
        type=int,
        default=0,
        help="forwards per timing; 0: 20 on CUDA, else 3 at batch 1 and 1 above",
    )
    p.add_argument("--gemm-size", type=int, default=0, help="GEMM n; 0: 2048 on CPU, 8192 on CUDA")
    p.add_argument("--gemm-seconds", type=float, default=1.0, help="per GEMM and round")
    p.add_argument("--check-images", type=int, default=60, help="photo views for agreement (<= 60)")
    p.add_argument("--no-shipped", action="store_true", help="skip the shipped models' agreement")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0: default")
    p.add_argument("--profile", default="", help="a variant to profile at the largest batch size")
    p.add_argument("--out", type=Path, default=Path("/tmp/roofline"), help="results directory")
    return p


def _median(rows: list[dict[str, float]], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model, variant and batch size: medians over the rounds and the fractions."""
    limits = {p: _median(rows, "gflops") for p, rows in results["gemm"].items() if rows}
    cpu_limits = {
        p: _median(rows, "gflops_per_cpu_s") for p, rows in results["gemm"].items() if rows
    }
    table = []
    for key, rounds in results["forward"].items():
        model, variant, batch = key.split("|")
        gflops = results["flops"][model]["gflops_per_image"]
        precision = Variant.parse(variant).precision
        rate = _median(rounds, "images_per_s")
        cpu_rate = _median(rounds, "images_per_cpu_s")
        rates = [r["images_per_s"] for r in rounds]
        row = {
            "model": model,
            "variant": variant,
            "batch_size": int(batch),
            "images_per_s": round(rate, 3),
            "spread": round((max(rates) - min(rates)) / rate, 3),
            "gflops": round(rate * gflops, 2),
            "fraction_of_fp32_gemm": round(rate * gflops / limits["fp32"], 3),
            "fraction_of_fp32_gemm_per_cpu_s": round(cpu_rate * gflops / cpu_limits["fp32"], 3),
        }
        if precision != "fp32" and precision in limits:
            row[f"fraction_of_{precision}_gemm"] = round(rate * gflops / limits[precision], 3)
        check = results["checks"].get(f"{model}|{variant}")
        if check is not None:
            row["answers_kept"] = check["pass"]
        table.append(row)
    return table


def markdown(results: dict[str, Any], table: list[dict[str, Any]]) -> str:
    lines = ["| GEMM | GFLOP/s (median) | GFLOP/s per CPU-second |", "|---|---|---|"]
    for precision, rows in results["gemm"].items():
        if rows:
            lines.append(
                f"| {precision} n={results['gemm_size']} | {_median(rows, 'gflops'):.1f} | "
                f"{_median(rows, 'gflops_per_cpu_s'):.1f} |"
            )
    for precision, reason in results["gemm_skipped"].items():
        lines.append(f"| {precision} | skipped: {reason} | |")
    lines += ["", "| model | variant | batch | img/s | spread | GFLOP/s | of fp32 GEMM | "
              "per CPU-s | of own-precision GEMM | answers kept |", "|" + "---|" * 10]  # fmt: skip
    reference = {(r["model"], r["batch_size"]): r["images_per_s"] for r in table
                 if r["variant"] == "trace-fp32"}  # fmt: skip
    for r in table:
        own = next(
            (v for k, v in r.items() if k in ("fraction_of_bf16_gemm", "fraction_of_fp16_gemm")), ""
        )
        base = reference.get((r["model"], r["batch_size"]))
        gain = f" ({r['images_per_s'] / base:.2f}x)" if base else ""
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['batch_size']} | "
            f"{r['images_per_s']:.2f}{gain} | "
            f"{r['spread']:.2f} | {r['gflops']:.1f} | {r['fraction_of_fp32_gemm']:.2f} | "
            f"{r['fraction_of_fp32_gemm_per_cpu_s']:.2f} | {own} | {r.get('answers_kept', '')} |"
        )
    lines += ["", "| model | variant | images | top-1 agreement | probs max | records max | "
              "summary max | summary mean | pass |", "|" + "---|" * 9]  # fmt: skip
    for key, c in results["checks"].items():
        model, variant = key.split("|")
        lines.append(
            f"| {model} | {variant} | {c['images']} | {c['top1_agreement']:.3f} | "
            f"{c['probs_max_abs']:.2e} | {c['records_max_abs']:.2e} | "
            f"{c.get('summary_max_abs', 0.0):.2e} | {c.get('summary_mean_abs', 0.0):.2e} | "
            f"{c['pass']} |"
        )
    for row in results["shipped"]:
        lines.append(
            f"| {row['model']} (shipped, held-out canvases) | eager-{row['precision']} | "
            f"{row['images']} | "
            f"{row['top1_agreement']:.3f} | {row['probs_max_abs']:.2e} | "
            f"{row['records_max_abs']:.2e} | {row.get('summary_max_abs', 0.0):.2e} | "
            f"{row.get('summary_mean_abs', 0.0):.2e} | |"
        )
    if results["skipped"]:
        lines += ["", "Skipped:"] + [f"- {v}: {why}" for v, why in results["skipped"].items()]
    return "\n".join(lines) + "\n"


def _gemm_precisions(device: torch.device) -> tuple[list[str], dict[str, str]]:
    run, skipped = ["fp32"], {}
    for precision in ("bf16", "fp16"):
        problem = autocast_problem(device, precision)
        if precision == "fp16" and device.type == "cpu":
            problem = "fp16 matrix products are measured on CUDA only"
        if problem is None:
            run.append(precision)
        else:
            skipped[precision] = problem.split(" Hint:")[0]
    return run, skipped


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = VARIANTS if args.variants == "all" else args.variants.split(",")
    variants = [Variant.parse(v.strip()) for v in names if v.strip()]
    if REFERENCE not in [v.name for v in variants]:
        variants.insert(0, Variant.parse(REFERENCE))
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    gemm_n = args.gemm_size or (8192 if device.type == "cuda" else 2048)
    precisions, gemm_skipped = _gemm_precisions(device)
    print(f"device {device}; cpu bf16: {cpu_has_bf16()}; torch threads {torch.get_num_threads()}")

    results: dict[str, Any] = {
        "command": " ".join(
            ["python -m bench.roofline", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": describe_machine(args.device),
        "state_before": machine_state(),
        "gemm_size": gemm_n,
        "gemm": {p: [] for p in precisions},
        "gemm_skipped": gemm_skipped,
        "flops": {},
        "forward": {},
        "checks": {},
        "skipped": {},
        "shipped": [],
        "profile": {},
    }
    forwards: dict[tuple[str, str], Forward] = {}
    inputs: dict[str, torch.Tensor] = {}
    for entry in args.models.split(","):
        source = random_sources([entry])[0]
        model = source.build()
        config = cast(DataConfig, model.data_config)
        results["flops"][source.name] = count_flops(model, tuple(config.input_size)).as_dict()
        print(f"{source.name}: {results['flops'][source.name]}", flush=True)
        views = photo_views(config, args.check_images)
        inputs[source.name] = views
        reference: BatchOutput | None = None
        for variant in variants:
            problem = variant.problem(device)
            if problem is not None:
                results["skipped"][variant.name] = problem
                print(f"skip {variant.name}: {problem}", flush=True)
                continue
            t0 = time.perf_counter()
            try:
                forward = build_forward(source, variant, device)
                for size in sizes:  # warm-up (and compile or record) at every batch size
                    forward(views[:1].repeat(size, 1, 1, 1))
            except Exception as exc:  # a variant that fails to build is reported, not fatal
                results["skipped"][f"{source.name} {variant.name}"] = f"failed: {exc!r}"[:300]
                print(f"skip {source.name} {variant.name}: failed: {exc!r}", flush=True)
                continue
            built_s = time.perf_counter() - t0
            n = views.shape[0] if variant.precision != "fp32" or variant.name == REFERENCE else 4
            got = run_all(forward, views[:n], max(sizes))
            if reference is None:
                reference = got
            diff = compare(reference, got)
            diff["pass"] = judge(variant, diff)
            diff["build_s"] = round(built_s, 1)
            results["checks"][f"{source.name}|{variant.name}"] = diff
            forwards[(source.name, variant.name)] = forward
            print(f"{source.name} {variant.name}: built in {built_s:.1f} s; {diff}", flush=True)

    if not args.no_shipped:
        for precision in ("bf16", "fp16"):
            if (
                any(v.precision == precision for v in variants)
                and autocast_problem(device, precision) is None
            ):
                results["shipped"] += shipped_agreement(precision, device)

    keys = list(forwards)
    for round_ in range(args.rounds):
        for precision in precisions:
            results["gemm"][precision].append(
                gemm_rate(device, _DTYPES[precision], gemm_n, args.gemm_seconds)
            )
        shift = round_ % max(1, len(keys))
        for name, variant_name in keys[shift:] + keys[:shift]:
            for size in sizes:
                views = inputs[name]
                batch = views[:1].repeat(size, 1, 1, 1) if size > views.shape[0] else views[:size]
                repeats = args.repeats or (20 if device.type == "cuda" else 3 if size == 1 else 1)
                row = time_forward(forwards[(name, variant_name)], batch, repeats)
                results["forward"].setdefault(f"{name}|{variant_name}|{size}", []).append(row)
        gemm = {p: round(r[-1]["gflops"], 1) for p, r in results["gemm"].items()}
        print(f"round {round_ + 1}/{args.rounds} done; GEMM GFLOP/s {gemm}", flush=True)

    if args.profile:
        for name in inputs:
            if (name, args.profile) in forwards:
                batch = inputs[name][:1].repeat(max(sizes), 1, 1, 1)
                results["profile"][name] = profile_forward(forwards[(name, args.profile)], batch)
                print(f"{name} {args.profile}:\n{results['profile'][name]['table']}", flush=True)
    results["state_after"] = machine_state()
    table = summarise(results)
    results["table"] = table
    text = markdown(results, table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "roofline.json").write_text(json.dumps(results, indent=1, default=str))
    (args.out / "roofline.md").write_text(f"`{results['command']}`\n\n{text}")
    print(text)
    print(f"wrote {args.out / 'roofline.json'} and roofline.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
