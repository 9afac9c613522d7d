"""The peer servers' side of `python -m bench.peers`: the classifier both peers serve (one
exported TorchScript file with the same preprocessing as attnserve) and TorchServe's handler.

This file runs in the peers' own virtual environment (torch, numpy, Pillow and the peer), so
it imports nothing from attnserve: the preprocessing repeats service.imaging's for RGB images
(shorter side to size / crop_pct, centre crop, normalise) with the model's data config, read
from `meta.json` next to the TorchScript file. Each answer is the top 5 classes with their
probabilities, as attnserve answers with maps=none.
"""

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

TOP_K = 5
_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


class Classifier:
    """A TorchScript classifier and its data config: bytes in, top-5 JSON-able dicts out."""

    def __init__(self, model_file: Path, threads: int) -> None:
        torch.set_num_threads(threads)
        meta = json.loads(model_file.with_name("meta.json").read_text())
        self.size = tuple(meta["input_size"])
        self.crop_pct = float(meta["crop_pct"])
        self.resample = _RESAMPLE[meta["interpolation"]]
        self.mean = np.asarray(meta["mean"], dtype=np.float32)
        self.std = np.asarray(meta["std"], dtype=np.float32)
        self.labels = meta["labels"]
        self.model = torch.jit.load(str(model_file), map_location="cpu").eval()

    def preprocess(self, data: bytes) -> torch.Tensor:
        """service.imaging.preprocess for an RGB image."""
        image = Image.open(io.BytesIO(data))
        image.load()
        image = image.convert("RGB")
        _, out_h, out_w = self.size
        target_h, target_w = math.floor(out_h / self.crop_pct), math.floor(out_w / self.crop_pct)
        scale = max(target_h / image.height, target_w / image.width)
        width = max(target_w, int(image.width * scale))
        height = max(target_h, int(image.height * scale))
        left, top = round((width - out_w) / 2.0), round((height - out_h) / 2.0)
        image = image.resize((width, height), resample=self.resample)
        image = image.crop((left, top, left + out_w, top + out_h))
        array = np.asarray(image, dtype=np.float32) / np.float32(255.0)
        array = np.ascontiguousarray(((array - self.mean) / self.std).transpose(2, 0, 1))
        return torch.from_numpy(array)

    def predict(self, batch: torch.Tensor) -> list[dict[str, Any]]:
        """Top-5 classes and probabilities of each image of `batch`."""
        with torch.inference_mode():
            probs = torch.softmax(self.model(batch), dim=1)
            values, indices = probs.topk(TOP_K, dim=1)
        return [
            {
                "predictions": [
                    {"label": self.labels[i], "index": i, "probability": p}
                    for i, p in zip(row_i, row_p, strict=True)
                ]
            }
            for row_i, row_p in zip(indices.tolist(), values.tolist(), strict=True)
        ]


# TorchServe: a module-level `handle` is the handler's entry point (called with data None once
# at load, then with a batch of requests, each a dict whose "body" or "data" holds the bytes).
_served: Classifier | None = None


def handle(data: list[dict[str, Any]] | None, context: Any) -> list[Any] | None:
    """TorchServe's entry point for one batch of requests."""
    global _served
    if _served is None:
        model_dir = Path(context.system_properties["model_dir"])
        _served = Classifier(model_dir / "model.pt", int(os.environ.get("PEER_THREADS", "1")))
    if data is None:
        return None
    tensors = [_served.preprocess(bytes(r.get("body") or r.get("data"))) for r in data]
    return _served.predict(torch.stack(tensors))
