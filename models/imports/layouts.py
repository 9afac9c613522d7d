"""Key layouts of the supported checkpoints and how each maps onto the project's module names.

A layout renames every source key to a key of a project model; nothing else is changed. Which
architecture and block a checkpoint holds is read from its keys (stage depths, the attention
block's parameter names, the stem) and settled by building each candidate on the meta device and
comparing key sets and shapes exactly: the first layout and architecture that fit every key win.

Facts behind the renames (key names of the reference code):
- timm ``ResNet`` and torchvision: the project's names; timm calls the block ``se`` whatever it is.
- timm ``skresnext*``: ``ConvNormAct`` pairs (``conv1.conv``/``conv1.bn``), SK paths
  ``conv2.paths.i.{conv,bn}`` and ``conv2.attn.{fc_reduce,bn,fc_select}``.
- the SENet Caffe layout (timm ``legacy_se*``, Cadene pretrainedmodels): ``layer0.conv1``,
  ``layer0.bn1``, ``se_module``, ``last_linear``.
- official ECA-Net (BangguWu/ECANet ``eca_resnet.py``): the block is ``eca``.
- official CBAM (Jongchan/attention-module): ``cbam.ChannelGate.mlp.{1,3}`` (``mlp.0`` is a
  Flatten), ``cbam.SpatialGate.spatial.{conv,bn}``.
- official MobileNetV2 + CA (houqb/CoordAttention ``mbv2_ca.py``): ``features.0`` stem,
  ``features.i.conv.j`` sequential blocks (CA at ``conv.6`` with ``conv2``/``conv3`` for the
  h/w convs), ``conv.0/1`` head, ``classifier.1`` (after a Dropout).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from models.attention import ATTENTION_BLOCKS, create_attention
from models.registry import create_model, get_arch_spec, list_models

Rename = Callable[[list[str]], dict[str, str]]
BN_COUNTER = "num_batches_tracked"


def _rules(*pairs: tuple[str, str]) -> Rename:
    """A rename from (regex, replacement) pairs applied in order to every key."""
    compiled = [(re.compile(p), r) for p, r in pairs]

    def rename(keys: list[str]) -> dict[str, str]:
        out = {}
        for key in keys:
            new = key
            for pattern, repl in compiled:
                new = pattern.sub(repl, new)
            out[key] = new
        return out

    return rename


_BLOCK = r"^(layer\d+\.\d+)\."
_MBV2_EXPANDED = {
    0: "conv_pw",
    1: "bn1",
    3: "conv_dw",
    4: "bn2",
    6: "attn",
    7: "conv_pwl",
    8: "bn3",
}
_MBV2_PLAIN = {0: "conv_dw", 1: "bn2", 3: "conv_pwl", 4: "bn3"}
_MBV2_FIXED = {
    "features.0.0.": "conv_stem.",
    "features.0.1.": "bn1.",
    "conv.0.": "conv_head.",
    "conv.1.": "bn2.",
    "classifier.1.": "classifier.",
}


def _mbv2_rename(keys: list[str]) -> dict[str, str]:
    """mbv2_ca.py names: a block is expanding when it has a ninth sequential entry (conv.8)."""
    expanded = {m.group(1) for k in keys if (m := re.match(r"features\.(\d+)\.conv\.8\.", k))}
    out = {}
    for key in keys:
        new = key
        prefix = next((p for p in _MBV2_FIXED if key.startswith(p)), None)
        match = re.match(r"features\.(\d+)\.conv\.(\d+)\.(.*)$", key)
        if prefix is not None:
            new = _MBV2_FIXED[prefix] + key[len(prefix) :]
        elif match and match.group(1) != "0":
            table = _MBV2_EXPANDED if match.group(1) in expanded else _MBV2_PLAIN
            name = table.get(int(match.group(2)))
            if name is not None:
                rest = re.sub(r"^conv2\.", "conv_h.", match.group(3))
                rest = re.sub(r"^conv3\.", "conv_w.", rest) if name == "attn" else rest
                new = f"blocks.{int(match.group(1)) - 1}.{name}.{rest}"
        out[key] = new
    return out


def _is_legacy(arch: str) -> bool:
    return arch.startswith("legacy_")


def _is_resnet(arch: str) -> bool:
    return arch.startswith(("resnet", "resnext")) and arch != "resnet_small"


@dataclass(frozen=True)
class Layout:
    """A family of checkpoints: its name, the registry archs it can hold, its rename."""

    name: str
    archs: Callable[[str], bool]
    rename: Rename


LAYOUTS: tuple[Layout, ...] = (
    Layout("timm / torchvision ResNet", _is_resnet, _rules((r"\.se\.", ".attn."))),
    Layout(
        "timm SK-ResNeXt",
        _is_resnet,
        _rules(
            (_BLOCK + r"conv1\.conv\.", r"\1.conv1."),
            (_BLOCK + r"conv1\.bn\.", r"\1.bn1."),
            (_BLOCK + r"conv2\.paths\.(\d+)\.conv\.", r"\1.conv2.branches.\2.0."),
            (_BLOCK + r"conv2\.paths\.(\d+)\.bn\.", r"\1.conv2.branches.\2.1."),
            (_BLOCK + r"conv2\.attn\.fc_reduce\.", r"\1.conv2.fc1.0."),
            (_BLOCK + r"conv2\.attn\.bn\.", r"\1.conv2.fc1.1."),
            (_BLOCK + r"conv2\.attn\.fc_select\.", r"\1.conv2.fc2."),
            (_BLOCK + r"conv3\.conv\.", r"\1.conv3."),
            (_BLOCK + r"conv3\.bn\.", r"\1.bn3."),
        ),
    ),
    Layout(
        "SENet Caffe layout (timm legacy_*, pretrainedmodels)",
        _is_legacy,
        _rules(
            (r"^layer0\.conv1\.", "conv1."),
            (r"^layer0\.bn1\.", "bn1."),
            (r"\.se_module\.", ".attn."),
            (r"^last_linear\.", "fc."),
        ),
    ),
    Layout("official ECA-Net ResNet", _is_resnet, _rules((r"\.eca\.", ".attn."))),
    Layout(
        "official CBAM ResNet",
        _is_resnet,
        _rules(
            (r"\.cbam\.ChannelGate\.mlp\.1\.", ".attn.mlp.0."),
            (r"\.cbam\.ChannelGate\.mlp\.3\.", ".attn.mlp.2."),
            (r"\.cbam\.SpatialGate\.spatial\.conv\.", ".attn.spatial_conv."),
            (r"\.cbam\.SpatialGate\.spatial\.bn\.", ".attn.spatial_bn."),
        ),
    ),
    Layout(
        "official MobileNetV2 + Coordinate Attention (mbv2_ca)",
        lambda arch: arch == "mobilenetv2",
        _mbv2_rename,
    ),
)


@dataclass
class Mismatch:
    """How a renamed checkpoint differs from a model's state dict."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.shapes)

    def describe(self) -> str:
        parts = []
        if self.missing:
            parts.append(f"{len(self.missing)} missing keys, e.g. {self.missing[:3]}")
        if self.unexpected:
            parts.append(f"{len(self.unexpected)} unexpected keys, e.g. {self.unexpected[:3]}")
        if self.shapes:
            parts.append(f"{len(self.shapes)} shapes differ, e.g. {'; '.join(self.shapes[:3])}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Plan:
    """A checkpoint matched to a model: which layout, architecture and options, and its
    tensors under the model's key names (float tensors as float32)."""

    layout: str
    arch: str
    attention: str
    num_classes: int
    in_chans: int
    model_kwargs: dict[str, Any]
    state: dict[str, torch.Tensor]
    filled_counters: int


def compare(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> Mismatch:
    """Key and shape differences; BN counters absent from the checkpoint do not count."""
    mismatch = Mismatch(
        missing=sorted(k for k in set(expected) - set(state) if not k.endswith("." + BN_COUNTER)),
        unexpected=sorted(set(state) - set(expected)),
    )
    for key in sorted(set(expected) & set(state)):
        if tuple(expected[key].shape) != tuple(state[key].shape):
            mismatch.shapes.append(
                f"{key}: checkpoint {tuple(state[key].shape)}, model {tuple(expected[key].shape)}"
            )
    return mismatch


def resolve(
    tensors: dict[str, torch.Tensor],
    *,
    arch: str | None = None,
    attention: str | None = None,
) -> Plan:
    """Find the layout and architecture that fit every key; ValueError listing what was tried."""
    if arch is not None and arch not in list_models():
        raise ValueError(f"unknown architecture {arch!r}; valid: {_importable()}")
    if attention is not None and attention not in ATTENTION_BLOCKS:
        raise ValueError(f"unknown attention block {attention!r}; valid: {list(ATTENTION_BLOCKS)}")
    tried = []
    for layout in LAYOUTS:
        mapping = layout.rename(list(tensors))
        state = {new: tensors[old] for old, new in mapping.items()}
        if len(state) != len(tensors):
            tried.append((layout.name, None, "two source keys map to one model key"))
            continue
        block = attention or _infer_attention(state)
        archs = [a for a in ([arch] if arch else _importable()) if layout.archs(a)]
        best: tuple[str, Mismatch] | None = None
        for candidate in _depth_filtered(archs, state):
            try:
                kwargs = _block_options(candidate, block, state)
                expected = _meta_state(candidate, block, state, kwargs)
            except (TypeError, ValueError) as exc:
                mismatch = Mismatch(shapes=[f"cannot build: {exc}"])
            else:
                mismatch = compare(expected, state)
                if mismatch.size == 0:
                    return _plan(layout.name, candidate, block, kwargs, expected, state)
            if best is None or mismatch.size < best[1].size:
                best = (candidate, mismatch)
        if best is None:
            tried.append((layout.name, None, "no architecture with these stage depths"))
        else:
            tried.append((layout.name, f"{best[0]} + {block}", best[1].describe()))
    raise ValueError(_no_fit_message(tried))


def _importable() -> list[str]:
    return [a for a in list_models() if _is_resnet(a) or _is_legacy(a) or a == "mobilenetv2"]


def _depth_filtered(archs: list[str], state: dict[str, torch.Tensor]) -> list[str]:
    """Archs whose stage depths equal the checkpoint's (archs without stages stay)."""
    depths = []
    for stage in range(1, 9):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if not blocks:
            break
        depths.append(max(blocks) + 1)
    keep = []
    for arch in archs:
        layers = get_arch_spec(arch).params.get("layers")
        if layers is None or tuple(layers) == tuple(depths):
            keep.append(arch)
    return keep


def _infer_attention(state: dict[str, torch.Tensor]) -> str:
    """The block whose parameter names equal those of the checkpoint's first attention site."""
    if any(".branches." in k for k in state):
        return "sk"
    site = next((k.split(".attn.")[0] for k in state if ".attn." in k), None)
    if site is None:
        return "none"
    names = {k[len(site) + len(".attn.") :] for k in state if k.startswith(site + ".attn.")}
    for block in ATTENTION_BLOCKS:
        if block in ("none", "sk"):
            continue
        try:
            with torch.device("meta"):
                module = create_attention(block, 64)
        except (TypeError, ValueError):
            continue
        if module is not None and set(module.state_dict()) == names:
            return block
    return "none"


def _block_options(arch: str, attention: str, state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """ECA kernels per stage and GC stages as the checkpoint has them (ResNets only)."""
    if not arch.startswith(("resnet", "resnext", "legacy_")):
        return {}
    if attention == "eca":
        kernels = []
        for stage in range(1, 9):
            weight = state.get(f"layer{stage}.0.attn.conv.weight")
            if weight is None:
                break
            kernels.append(int(weight.shape[-1]))
        return {"eca_kernels": kernels}
    if attention == "gc":
        stages = {m.group(1) for k in state if (m := re.match(r"layer(\d+)\.\d+\.attn\.", k))}
        return {"gc_stages": sorted(map(int, stages))}
    return {}


def _meta_state(
    arch: str, attention: str, state: dict[str, torch.Tensor], kwargs: dict[str, Any]
) -> dict[str, torch.Tensor]:
    """The state dict of the candidate model, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = create_model(arch, attention, _num_classes(state), _in_chans(state), **kwargs)
    return model.state_dict()


def _num_classes(state: dict[str, torch.Tensor]) -> int:
    head = state.get("fc.weight", state.get("classifier.weight"))
    if head is None or head.ndim != 2:
        raise ValueError("no classifier weight (fc.weight / classifier.weight)")
    return int(head.shape[0])


def _in_chans(state: dict[str, torch.Tensor]) -> int:
    for key in ("conv1.weight", "conv1.0.weight", "conv_stem.weight"):
        if key in state and state[key].ndim == 4:
            return int(state[key].shape[1])
    raise ValueError("no stem convolution (conv1 / conv1.0 / conv_stem)")


def _plan(
    layout: str,
    arch: str,
    attention: str,
    kwargs: dict[str, Any],
    expected: dict[str, torch.Tensor],
    state: dict[str, torch.Tensor],
) -> Plan:
    """The checkpoint's tensors under the model's names, dtypes as the model's, counters filled."""
    out = {}
    for key, want in expected.items():
        got = state.get(key)
        if got is None:  # a BN counter (compare allows only those to be absent)
            got = torch.zeros((), dtype=want.dtype)
        out[key] = got.to(want.dtype) if got.dtype != want.dtype else got
    filled = len(expected) - len(state)
    return Plan(layout, arch, attention, _num_classes(state), _in_chans(state), kwargs, out, filled)


def _no_fit_message(tried: Iterable[tuple[str, str | None, str]]) -> str:
    lines = ["the weights fit no supported layout. Layouts tried (closest architecture):"]
    for name, closest, detail in tried:
        lines.append(f"  - {name}: {closest + ': ' if closest else ''}{detail}")
    lines.append(
        "Hint: supported are the sources in docs/models.md; --arch/--attention pick the "
        "architecture and block when they cannot be read from the keys."
    )
    return "\n".join(lines)
