"""Summary map: one (N, H, W) picture per image from every site's spatial attention."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .capture import AttentionRecord
from .kinds import RESAMPLING_BLOCKS, SPATIAL_KINDS, display


def spatial_views(records: Iterable[AttentionRecord]) -> list[AttentionRecord]:
    """One spatial record (a kind the table marks spatial) per site, in order of first
    appearance.

    A genuine map wins over a derived one at the same site; otherwise the first record is kept
    (a block called twice in one forward contributes its first call). Sites recorded after a
    spatial transformer (`RESAMPLING_BLOCKS`) see its output, a resampled image whose grid is not
    the input's, so their maps are no view of the input and are left out (they stay records).
    """
    chosen: dict[str, AttentionRecord] = {}
    resampler: str | None = None
    for record in records:
        if resampler is not None and record.site != resampler:
            continue
        if record.block in RESAMPLING_BLOCKS:
            resampler = record.site
        if record.kind not in SPATIAL_KINDS:
            continue
        current = chosen.get(record.site)
        if current is None or (current.derived and not record.derived):
            chosen[record.site] = record
    return list(chosen.values())


def summary_map(records: Iterable[AttentionRecord], size: tuple[int, int]) -> torch.Tensor | None:
    """Average of all sites' spatial views on the input grid, min-max normalised per image.

    Normalisation: each site's view as `kinds.display` gives it (a GC context mask multiplied
    by h*w, so a uniform mask is 1; gates and derived views as they are, in [0, 1]) is upsampled
    bilinearly (``align_corners=False``) to ``size``; the sites are averaged with equal weight;
    then each image is rescaled to [0, 1] by (m - min) / (max - min), and a constant image
    becomes all zeros. Returns (N, H, W) float32 on the records' device, or None when no site
    has a view.
    """
    views = spatial_views(records)
    if not views:
        return None
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be two positive ints, got {size!r}")
    with torch.autocast(views[0].tensor.device.type, enabled=False):
        maps = [display(v.kind, v.tensor) for v in views]
        if any(m.shape[0] != maps[0].shape[0] for m in maps):  # (sizes are tensors when traced)
            raise ValueError("records disagree on the batch size")
        upsampled = [
            F.interpolate(m[:, None], size=(height, width), mode="bilinear", align_corners=False)
            for m in maps
        ]
        mean = torch.cat(upsampled, 1).mean(1)
        low = mean.amin((1, 2), keepdim=True)
        span = mean.amax((1, 2), keepdim=True) - low
        scaled = ((mean - low) / span.clamp_min(torch.finfo(torch.float32).tiny)).clamp(0.0, 1.0)
        return torch.where(span > 0, scaled, torch.zeros_like(scaled))
