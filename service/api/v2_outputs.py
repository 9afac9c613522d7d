"""/v2 inputs and outputs on the pipeline: request tensors -> pipeline calls -> response tensors.

"image" (BYTES, encoded files) goes through `Pipeline.predict`, exactly as /v1 images do;
"input" (FP32 or UINT8 shaped like the model input) through `Pipeline.predict_tensors`. Outputs:
"probabilities", "attention_summary" and, on request, "attention/<site>/<kind>" at native
resolution as the kinds table displays them, and for point records (a spatial transformer's
region) "attention/<site>/<kind>_original" in the original image's pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from models import RECORD_KINDS
from service.api.v2_codec import InputTensor, OutputTensor, Requested, encode_response
from service.budget import TENSOR_VALUE_BYTES, result_cost
from service.errors import BadRequest
from service.forward import ImageResult
from service.hosting import HostedModel
from service.maps import MapRequest, output_size
from service.pipeline import Pipeline

__all__ = [
    "IMAGE",
    "MAP_SIZE",
    "PROBABILITIES",
    "SITE_PREFIX",
    "SUMMARY",
    "TENSOR",
    "build_outputs",
    "encode_outputs",
    "has_summary",
    "run_inputs",
    "site_outputs",
]

IMAGE, TENSOR = "image", "input"
PROBABILITIES, SUMMARY, SITE_PREFIX = "probabilities", "attention_summary", "attention/"
ORIGINAL = "_original"
MAP_SIZE = 64


def site_outputs(hosted: HostedModel) -> dict[str, int]:
    """Per-site output names and their rank (batch dimension included)."""
    outputs = {}
    for site in hosted.sites:
        for kind in site["kinds"]:
            name, rank = f"{SITE_PREFIX}{site['site']}/{kind}", 1 + RECORD_KINDS[kind].rank
            outputs[name] = rank
            if RECORD_KINDS[kind].points:
                outputs[name + ORIGINAL] = rank
    return outputs


def has_summary(hosted: HostedModel) -> bool:
    return any(RECORD_KINDS[k].spatial for site in hosted.sites for k in site["kinds"])


def map_request(wanted: list[Requested]) -> MapRequest:
    """The maps the requested outputs need: none, the summary, or every record."""
    names = {r.name for r in wanted}
    if any(name.startswith(SITE_PREFIX) for name in names):
        return MapRequest("all", MAP_SIZE)
    return MapRequest("summary" if SUMMARY in names else "none", MAP_SIZE)


async def run_inputs(
    pipeline: Pipeline, hosted: HostedModel, tensor: InputTensor, maps: MapRequest
) -> list[ImageResult]:
    """The input tensor checked against the model and run through the pipeline."""
    shape = tensor.shape
    if shape:
        classes = len(hosted.data_config.labels)
        cost = result_cost(
            hosted.map_counts, maps, head_bytes=classes * TENSOR_VALUE_BYTES, image_format="tensor"
        )
        pipeline.check_budget([cost], shape[0], "items")
    if tensor.name == IMAGE:
        if tensor.datatype != "BYTES" or len(shape) not in (1, 2) or shape[1:] not in ((), (1,)):
            raise BadRequest(
                f"input {IMAGE!r} must be BYTES with shape [N] or [N, 1], "
                f"got {tensor.datatype} {list(shape)}"
            )
        assert isinstance(tensor.data, list)  # BYTES inputs are lists (v2_codec)
        return await pipeline.predict(hosted, tensor.data, maps)
    expected = [-1, *hosted.data_config.input_size]
    if (
        tensor.datatype not in ("FP32", "UINT8")
        or len(shape) != 4
        or list(shape[1:]) != expected[1:]
    ):
        raise BadRequest(
            f"input {TENSOR!r} must be FP32 or UINT8 with shape {expected} (N, C, H, W), "
            f"got {tensor.datatype} {list(shape)}"
        )
    assert isinstance(tensor.data, np.ndarray)
    return await pipeline.predict_tensors(hosted, tensor.data, maps)


def build_outputs(
    hosted: HostedModel, wanted: list[Requested], results: list[ImageResult]
) -> list[OutputTensor]:
    """The requested output tensors from the per-image results (HTTP and gRPC)."""
    tensors = []
    for request in wanted:
        if request.name == PROBABILITIES:
            tensors.append(_probabilities(request, results, hosted.data_config.labels))
        elif request.name == SUMMARY:
            tensors.append(_summary(request, results))
        else:
            tensors.append(_site(request, results))
    return tensors


def encode_outputs(
    hosted: HostedModel, wanted: list[Requested], results: list[ImageResult], head: dict[str, Any]
) -> tuple[bytes, int | None]:
    """The response body (and header length if binary) from the per-image results."""
    return encode_response(head, build_outputs(hosted, wanted, results))


def _probabilities(
    request: Requested, results: list[ImageResult], labels: tuple[str, ...]
) -> OutputTensor:
    probs = np.stack([r.probs for r in results])
    if request.classes:
        return classification(request.name, probs, labels, request.classes, request.binary)
    return OutputTensor(request.name, "FP32", probs.shape, probs, request.binary)


def _summary(request: Requested, results: list[ImageResult]) -> OutputTensor:
    """On the original images when all get the same map shape, else on the model input grid."""
    maps = [r.maps for r in results if r.maps is not None]
    geometries = [r.geometry for r in results]
    same = len(
        {None if g is None else output_size(g.width, g.height, MAP_SIZE) for g in geometries}
    )
    on_image = same == 1 and geometries[0] is not None
    stacked = np.stack([m.summary if on_image else m.grid_summary for m in maps])
    grid = {"grid": "original" if on_image else "input"}
    return OutputTensor(SUMMARY, "FP32", stacked.shape, stacked, request.binary, grid)


def _site(request: Requested, results: list[ImageResult]) -> OutputTensor:
    """One site's record per image at native resolution (GC context scaled so uniform = 1), or
    a point record on the original image (`ORIGINAL`; the model input for tensor inputs)."""
    site, kind = request.name[len(SITE_PREFIX) :].rsplit("/", 1)
    original = kind.endswith(ORIGINAL) and kind not in RECORD_KINDS
    kind = kind.removesuffix(ORIGINAL) if original else kind
    values = []
    for result in results:
        assert result.maps is not None  # site outputs ask for every record (map_request)
        pool = result.maps.layers if original else result.maps.native
        values.append(next(m.values for m in pool if (m.layer, m.kind) == (site, kind)))
    stacked = np.stack(values)
    return OutputTensor(request.name, "FP32", stacked.shape, stacked, request.binary)


def classification(
    name: str, probs: np.ndarray, labels: tuple[str, ...], k: int, binary: bool
) -> OutputTensor:
    """The classification extension: BYTES [N, k] of "<value>:<index>:<label>", highest first."""
    k = min(k, probs.shape[1])
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    strings = [
        f"{probs[n, i]:f}:{i}:{labels[i]}".encode() for n, row in enumerate(order) for i in row
    ]
    return OutputTensor(name, "BYTES", (probs.shape[0], k), strings, binary)
