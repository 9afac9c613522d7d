"""Attention capture: forward hooks that exist only inside a ``with capture_attention(...)`` block.

Every block routes its gating nonlinearity through a named :class:`Tap` submodule that carries a
``kind``. A block whose records are functions of its taps (the spatial transformer's region and
sampling density, from theta) lists them in ``computed_kinds`` and computes them in
``computed_records(input, taps)``, which runs only while captured. ``capture_attention`` hooks
those taps and the block itself on entry and removes every hook on exit (also on an exception),
so an uncaptured model runs no extra code and a captured one computes bit-identical outputs:
the hooks only read tensors, never replace them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .kinds import RECORD_KINDS

_EPS = 1e-6

TapOutputs = dict[str, list[torch.Tensor]]


class Tap(nn.Module):
    """Applies ``act`` (identity by default) and marks the result as attention of a given kind."""

    def __init__(self, kind: str, act: nn.Module | None = None) -> None:
        super().__init__()
        self.kind = kind
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"


@dataclass(frozen=True, eq=False)
class AttentionRecord:
    """One attention tensor of one block call; detached, float32, batch dimension first.

    ``eq=False``: records hold tensors, so equality is identity (tensor ``==`` is elementwise).
    """

    site: str
    block: str
    kind: str
    tensor: torch.Tensor
    derived: bool = False


@dataclass(frozen=True)
class SiteInfo:
    """An attention site (module path of a block), its block name and the kinds it records."""

    site: str
    block: str
    kinds: tuple[str, ...]


@dataclass
class AttentionCapture:
    """What a ``capture_attention`` block collected: records in forward order."""

    records: list[AttentionRecord] = field(default_factory=list)


def _retention_map(x: torch.Tensor, taps: TapOutputs) -> torch.Tensor:
    """SE/ECA: R = sum_c s_c|X_c| / (sum_c |X_c| + eps), the share of activation the gate keeps."""
    gate = taps["channel"][0].float().reshape(x.shape[0], -1)
    mass = x.float().abs()
    kept = torch.einsum("nc,nchw->nhw", gate, mass)
    return (kept / (mass.sum(1) + _EPS)).clamp(0.0, 1.0).unsqueeze(1)


def _coord_map(x: torch.Tensor, taps: TapOutputs) -> torch.Tensor:
    """CoordAtt: mean over channels of gate_h * gate_w, an (N, 1, H, W) map in (0, 1)."""
    gate_h = taps["coord_h"][0].float()[..., 0]
    gate_w = taps["coord_w"][0].float()[:, :, 0, :]
    return (torch.einsum("nch,ncw->nhw", gate_h, gate_w) / gate_h.shape[1]).unsqueeze(1)


def _branch_share(x: torch.Tensor, taps: TapOutputs) -> torch.Tensor:
    """SK: share of the dilated branch, sum_c a_1c|U_1c| / (sum_m sum_c a_mc|U_mc| + eps)."""
    weights = taps["branch"][0].float()
    mass = [
        torch.einsum("nc,nchw->nhw", weights[:, m], u.float().abs())
        for m, u in enumerate(taps["feature"])
    ]
    total = torch.stack(mass).sum(0) + _EPS
    return (mass[1] / total).clamp(0.0, 1.0).unsqueeze(1)


DERIVED_VIEWS: dict[str, Callable[[torch.Tensor, TapOutputs], torch.Tensor]] = {
    "se": _retention_map,
    "eca": _retention_map,
    "coordatt": _coord_map,
    "sk": _branch_share,
}
"""Derived spatial views (kind "spatial", derived=True) for blocks without a genuine spatial map."""


def _taps(block: nn.Module) -> list[Tap]:
    return [m for m in block.modules() if isinstance(m, Tap)]


def iter_blocks(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(module path, block)`` for every attention block (``block_name`` plus taps)."""
    for name, module in model.named_modules():
        if isinstance(getattr(module, "block_name", None), str) and _taps(module):
            yield name, module


def list_sites(model: nn.Module, derived: bool = False) -> list[SiteInfo]:
    """Describe every attention site without running the model; ``derived`` adds derived views."""
    sites = []
    for name, block in iter_blocks(model):
        kinds = [t.kind for t in _taps(block) if t.kind in RECORD_KINDS]
        kinds += getattr(block, "computed_kinds", ())
        if derived and block.block_name in DERIVED_VIEWS:
            kinds.append("spatial")
        sites.append(SiteInfo(name, block.block_name, tuple(dict.fromkeys(kinds))))
    return sites


def _to_record_tensor(kind: str, tensor: torch.Tensor) -> torch.Tensor:
    tensor = tensor.detach()
    if kind == "channel":
        tensor = tensor.reshape(tensor.shape[0], -1)
    return tensor.to(torch.float32, copy=True)


def _hook_block(
    site: str, block: nn.Module, records: list[AttentionRecord], derived: bool
) -> list[RemovableHandle]:
    """Hook one block's taps (collect) and the block (turn this call's tap outputs into records).

    The pre-hook drops what a call that raised half-way may have left behind.
    """
    name: str = block.block_name
    pending: TapOutputs = {}

    def on_tap(tap: nn.Module, args: tuple, output: torch.Tensor) -> None:
        pending.setdefault(tap.kind, []).append(output)

    def on_block(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        taps = dict(pending)
        pending.clear()
        with torch.no_grad(), torch.autocast(output.device.type, enabled=False):
            for kind, tensors in taps.items():
                if kind in RECORD_KINDS:
                    records.extend(
                        AttentionRecord(site, name, kind, _to_record_tensor(kind, t))
                        for t in tensors
                    )
            computed = getattr(module, "computed_records", None)
            if computed is not None:
                records.extend(
                    AttentionRecord(site, name, kind, tensor.float())
                    for kind, tensor in computed(args[0], taps).items()
                )
            if derived and name in DERIVED_VIEWS:
                view = DERIVED_VIEWS[name](args[0], taps)
                records.append(AttentionRecord(site, name, "spatial", view.float(), derived=True))

    handles = [
        tap.register_forward_hook(on_tap)
        for tap in _taps(block)
        if tap.kind in RECORD_KINDS or derived
    ]
    handles.append(block.register_forward_pre_hook(lambda module, args: pending.clear()))
    handles.append(block.register_forward_hook(on_block))
    return handles


@contextlib.contextmanager
def capture_attention(model: nn.Module, derived: bool = False) -> Iterator[AttentionCapture]:
    """Record every block's attention during forwards run inside the with-block.

    Hooks are registered on entry and removed on exit, even when the body raises. Records are
    detached float32 copies (also under autocast), batch-first, in forward order. ``derived=True``
    adds the derived spatial views of SE, ECA, CoordAtt and SK (see ``DERIVED_VIEWS``).
    """
    capture = AttentionCapture()
    handles: list[RemovableHandle] = []
    try:
        for site, block in iter_blocks(model):
            handles.extend(_hook_block(site, block, capture.records, derived))
        yield capture
    finally:
        for handle in handles:
            handle.remove()
