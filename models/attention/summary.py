"""Summary map: one (N, H, W) picture per image from every site's spatial attention.

This is the single implementation used by the service and the benchmark.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F

from .capture import AttentionRecord

SPATIAL_KINDS = ("spatial", "context")


def spatial_views(records: Iterable[AttentionRecord]) -> list[AttentionRecord]:
    """One spatial-like record ("spatial" or "context") per site, in order of first appearance.

    A genuine map wins over a derived one at the same site; otherwise the first record is kept
    (a block called twice in one forward contributes its first call).
    """
    chosen: dict[str, AttentionRecord] = {}
    for record in records:
        if record.kind not in SPATIAL_KINDS:
            continue
        current = chosen.get(record.site)
        if current is None or (current.derived and not record.derived):
            chosen[record.site] = record
    return list(chosen.values())


def upsample_bilinear(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, h, w) -> (N, H, W): what ``F.interpolate(mode="bilinear", align_corners=False)``
    gives (to float rounding: differences up to about 1e-7 on maps in [0, 1], tested at 1e-6),
    faster where H and W are whole multiples of h and w (a ResNet stage's grid against its
    input: 2, 4, 8, ...).

    There, output row s*i + r of scale s sits at source position i + (2r + 1 - s) / 2s, so
    each of the s phases is one ``torch.lerp`` of the rows with their upper or lower
    neighbours (edge rows repeated, as the kernel clamps), and the phases interleave; the same
    along the columns. ``F.interpolate`` on these single-channel maps spent most of the summary
    map's time (17-31 us per image per site for 64 x 64 outputs, against 6-10 this way, in four
    runs of ``python -m bench.mapwork``: one thread, batch 16)."""
    height, width = size
    rows, cols = maps.shape[-2], maps.shape[-1]
    if height % rows or width % cols:
        return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return _upsample_whole(_upsample_whole(maps, width // cols, 2), height // rows, 1)


def _upsample_whole(maps: torch.Tensor, scale: int, dim: int) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of (N, h, w) along `dim` (1 or 2) by a whole
    `scale`; see `upsample_bilinear`."""
    if scale == 1:
        return maps
    n = maps.shape[dim]
    padded = torch.cat((maps.narrow(dim, 0, 1), maps, maps.narrow(dim, n - 1, 1)), dim)
    centre, before, after = (padded.narrow(dim, k, n) for k in (1, 0, 2))
    phases = []
    for r in range(scale):
        offset = (2 * r + 1 - scale) / (2 * scale)  # source position minus i, in (-1/2, 1/2)
        if offset < 0:
            phases.append(torch.lerp(centre, before, -offset))
        else:
            phases.append(torch.lerp(centre, after, offset))
    shape = list(maps.shape)
    shape[dim] = n * scale
    return torch.stack(phases, dim + 1).reshape(shape)


def _site_map(record: AttentionRecord) -> torch.Tensor:
    """(N, h, w) float32 view of one site; GC masks scaled so uniform = 1."""
    tensor = record.tensor.float()
    if tensor.dim() != 4 or tensor.shape[1] != 1:
        raise ValueError(f"{record.site}: expected an (N, 1, h, w) map, got {tuple(tensor.shape)}")
    if record.kind == "context":
        tensor = tensor * (tensor.shape[2] * tensor.shape[3])
    return tensor[:, 0]


def summary_map(records: Iterable[AttentionRecord], size: tuple[int, int]) -> torch.Tensor | None:
    """Average of all sites' spatial views on the input grid, min-max normalised per image.

    Normalisation: each site's view (a GC context mask multiplied by h*w, so a uniform mask is 1;
    gates and derived views as they are, in [0, 1]) is upsampled bilinearly
    (``align_corners=False``, `upsample_bilinear`) to ``size``; the sites are averaged with equal
    weight; then each image is rescaled to [0, 1] by (m - min) / (max - min), and a constant
    image becomes all zeros. Returns (N, H, W) float32 on the records' device, or None when no
    site has a view. Upsampling is linear, so views of the same grid are added first and
    upsampled once.
    """
    views = spatial_views(records)
    if not views:
        return None
    height, width = (int(v) for v in size)
    if height < 1 or width < 1:
        raise ValueError(f"size must be two positive ints, got {size!r}")
    with torch.autocast(views[0].tensor.device.type, enabled=False):
        maps = [_site_map(v) for v in views]
        if any(m.shape[0] != maps[0].shape[0] for m in maps):  # (sizes are tensors when traced)
            raise ValueError("records disagree on the batch size")
        sums: dict[tuple[int, int], torch.Tensor] = {}  # view grid -> sum of its views
        for site in maps:
            grid = (int(site.shape[1]), int(site.shape[2]))
            sums[grid] = sums[grid] + site if grid in sums else site
        total = [upsample_bilinear(m, (height, width)) for m in sums.values()]
        mean = torch.stack(total).sum(0) / len(views)
        low = mean.amin((1, 2), keepdim=True)
        span = mean.amax((1, 2), keepdim=True) - low
        scaled = ((mean - low) / span.clamp_min(torch.finfo(torch.float32).tiny)).clamp(0.0, 1.0)
        return torch.where(span > 0, scaled, torch.zeros_like(scaled))
