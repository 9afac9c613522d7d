"""The roofline benchmark end to end on a small model (so the GPU command cannot rot on a CPU
machine), and its FLOP counter against a hand count."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from bench.flops import count_flops
from bench.roofline import main
from models import create_model
from service.runner import cpu_has_bf16


def test_flops_count_matrix_ops_and_attention_blocks() -> None:
    conv = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()).eval()
    assert count_flops(conv, (1, 8, 8)).total == 2 * (4 * 9 * 64)  # 2 per multiply-add
    plain = count_flops(create_model("resnet_small", "none").eval(), (1, 64, 64))
    cbam = count_flops(create_model("resnet_small", "cbam").eval(), (1, 64, 64))
    assert plain.attention == 0 and cbam.attention > 0
    assert cbam.total - plain.total == cbam.attention + cbam.capture


def test_roofline_runs_every_variant_or_says_why_not(tmp_path: Path) -> None:
    variants = "eager-fp32,trace-fp32-cl,eager-bf16,eager-fp16,cudagraph-fp16-cl"
    argv = ["--models", "resnet_small:se", "--variants", variants, "--batch-sizes", "1,2"]
    argv += ["--rounds", "1", "--gemm-size", "128", "--gemm-seconds", "0.05"]
    argv += ["--check-images", "4", "--no-shipped", "--out", str(tmp_path)]
    assert main(argv) == 0
    results = json.loads((tmp_path / "roofline.json").read_text())
    model = "resnet_small-se-random"
    ran = {row["variant"] for row in results["table"]}
    expected = {"eager-fp32", "trace-fp32-cl"} | ({"eager-bf16"} if cpu_has_bf16() else set())
    if not torch.cuda.is_available():
        assert ran == expected
        assert "CUDA" in results["skipped"]["eager-fp16"]
        assert "CUDA" in results["skipped"]["cudagraph-fp16-cl"]
    for row in results["table"]:
        assert row["model"] == model and row["batch_size"] in (1, 2)
        assert row["images_per_s"] > 0 and row["fraction_of_fp32_gemm"] > 0
        assert row["answers_kept"] is True, row
    assert results["checks"][f"{model}|trace-fp32-cl"]["probs_max_abs"] <= 1e-4
    assert results["flops"][model]["attention_gflops_per_image"] > 0
    assert results["gemm"]["fp32"][0]["gflops"] > 0
    assert "| trace-fp32-cl |" in (tmp_path / "roofline.md").read_text()
