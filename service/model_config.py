"""A model's own configuration: `config.json` in its repository directory, in Triton's JSON
model-config shape, so that a Triton repository habit carries over unchanged.

Read are the version policy, `max_batch_size`, `dynamic_batching` (queue delay, queue size,
default timeout), `instance_group` counts and the `autocast` parameter (the model's own
ATTNSERVE_AUTOCAST, in Triton's `parameters` shape); an unset knob falls back to the service
settings.
Any other key is refused with the list of the known ones, so a typo never passes silently.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["AUTOCAST_VALUES", "CONFIG_FILE", "ModelConfig", "config_from_json", "read_config"]

CONFIG_FILE = "config.json"
_KEYS = ("name", "platform", "backend", "version_policy", "max_batch_size", "dynamic_batching",
         "instance_group", "parameters")  # fmt: skip
_BATCHING_KEYS = ("max_queue_delay_microseconds", "default_queue_policy", "preferred_batch_size")
_QUEUE_KEYS = ("max_queue_size", "default_timeout_microseconds")
# The model's config endpoint lists arch and attention as parameters: accepted back, not used.
_PARAMETERS = ("autocast", "arch", "attention")
AUTOCAST_VALUES = ("none", "fp16", "bf16")


@dataclass(frozen=True)
class ModelConfig:
    """The version policy ("latest" with its count, "all", or "specific" versions) and the
    per-model serving knobs (None: the setting's value)."""

    policy: str = "latest"
    policy_versions: tuple[int, ...] = (1,)
    max_batch_size: int | None = None
    max_batch_delay_ms: float | None = None
    max_queue_size: int | None = None
    timeout_s: float | None = None
    instances: int | None = None
    autocast: str | None = None

    def select(self, available: list[int]) -> list[int]:
        """The versions this policy serves out of those in the repository, highest first."""
        ordered = sorted(available, reverse=True)
        if self.policy == "all":
            return ordered
        if self.policy == "specific":
            return [v for v in ordered if v in self.policy_versions]
        return ordered[: self.policy_versions[0]]

    def policy_json(self) -> dict[str, Any]:
        """The version policy in Triton's JSON shape."""
        if self.policy == "all":
            return {"all": {}}
        if self.policy == "specific":
            return {"specific": {"versions": list(self.policy_versions)}}
        return {"latest": {"num_versions": self.policy_versions[0]}}


def read_config(directory: Path) -> ModelConfig:
    """The directory's config.json, or the defaults when there is none; ValueError if invalid."""
    path = directory / CONFIG_FILE
    if not path.is_file():
        return ModelConfig()
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        return config_from_json(text, directory.name)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def config_from_json(text: str, name: str) -> ModelConfig:
    """Parse a Triton-shaped JSON model config for model `name`; ValueError saying what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON: {exc}") from None
    _check_keys(data, _KEYS, "the model config")
    if data.get("name", name) != name:
        raise ValueError(f"its name {data['name']!r} is not the model's name {name!r}")
    policy, versions = _policy(data.get("version_policy", {"latest": {"num_versions": 1}}))
    batching = data.get("dynamic_batching", {})
    _check_keys(batching, _BATCHING_KEYS, "dynamic_batching")
    queue = batching.get("default_queue_policy", {})
    _check_keys(queue, _QUEUE_KEYS, "default_queue_policy")
    delay_us = _number(batching, "max_queue_delay_microseconds", 0, 10_000_000)
    timeout_us = _number(queue, "default_timeout_microseconds", 1, 3_600_000_000)
    return ModelConfig(
        policy=policy,
        policy_versions=versions,
        max_batch_size=_number(data, "max_batch_size", 1, 1024),
        max_batch_delay_ms=None if delay_us is None else delay_us / 1000.0,
        max_queue_size=_number(queue, "max_queue_size", 1, 100_000),
        timeout_s=None if timeout_us is None else timeout_us / 1e6,
        instances=_instances(data.get("instance_group")),
        autocast=_autocast(data.get("parameters", {})),
    )


def _autocast(parameters: Any) -> str | None:
    """The `autocast` parameter ({"string_value": "bf16"}), None when unset."""
    _check_keys(parameters, _PARAMETERS, "parameters")
    if "autocast" not in parameters:
        return None
    entry = parameters["autocast"]
    value = entry.get("string_value") if isinstance(entry, dict) and len(entry) == 1 else None
    if value not in AUTOCAST_VALUES:
        raise ValueError(
            f'parameters.autocast must be {{"string_value": one of {list(AUTOCAST_VALUES)}}}, '
            f"got {entry!r}"
        )
    return str(value)


def _check_keys(data: Any, known: tuple[str, ...], where: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a JSON object")
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{where} has unknown key(s) {unknown}; known: {list(known)}")


def _number(data: dict[str, Any], key: str, low: int, high: int) -> int | None:
    """An integer setting in [low, high]; JSON strings of digits too (protobuf's int64 form)."""
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{key} must be an integer from {low} to {high}, got {value!r}")
    return value


def _policy(data: Any) -> tuple[str, tuple[int, ...]]:
    """("latest", (n,)), ("all", ()) or ("specific", versions) from Triton's version_policy."""
    if not isinstance(data, dict) or len(data) != 1:
        raise ValueError(
            'version_policy must be one of {"latest": {"num_versions": n}}, {"all": {}}, '
            '{"specific": {"versions": [...]}}'
        )
    (kind, body), = data.items()  # fmt: skip
    if kind == "all" and body == {}:
        return "all", ()
    if kind == "latest" and isinstance(body, dict) and set(body) <= {"num_versions"}:
        count = _number({"num_versions": body.get("num_versions", 1)}, "num_versions", 1, 1000)
        return "latest", (count or 1,)
    if kind == "specific" and isinstance(body, dict) and set(body) == {"versions"}:
        versions = body["versions"]
        if (
            isinstance(versions, list)
            and versions
            and all(_number({"v": v}, "v", 1, 2**31) for v in versions)
        ):
            return "specific", tuple(sorted({int(v) for v in versions}))
    raise ValueError(f"version_policy {data!r} is not one of latest, all or specific")


def _instances(groups: Any) -> int | None:
    """The total `count` of the instance groups (Triton's `kind` is accepted, not used)."""
    if groups is None:
        return None
    if not isinstance(groups, list) or not groups:
        raise ValueError("instance_group must be a non-empty list of objects")
    total = 0
    for group in groups:
        _check_keys(group, ("name", "count", "kind", "gpus"), "an instance_group entry")
        total += _number(group, "count", 1, 64) or 1
    return min(total, 64)
