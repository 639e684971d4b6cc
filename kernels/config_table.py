"""Kernel launch configs per M bucket, read from JSON (nothing here needs a GPU or triton).

The packaged table ``configs/default.json`` has this structure::

    {"version": 1,
     "default": {"dequant_gemm": {BUCKET: CONFIG, ...}, "moe": {BUCKET: CONFIG, ...}},
     "devices": {DEVICE_NAME: {"dequant_gemm": {...}, "moe": {...}}, ...}}

BUCKET is an upper bound on M as a string ("1", "16", "64") or "max"; the first bucket whose bound is
>= M wins. DEVICE_NAME is ``torch.cuda.get_device_name()``. A tuned device entry wins over the
default; a user table named by ``$MOECOMPRESS_KERNEL_CONFIGS`` (same structure) wins over both.
:func:`moecompress.kernels.tuning.tune` writes device entries.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path

import torch

from moecompress.errors import MoeCompressError

PACKAGED_TABLE = Path(__file__).resolve().parent / "configs" / "default.json"
USER_TABLE_ENV = "MOECOMPRESS_KERNEL_CONFIGS"
KINDS = ("dequant_gemm", "moe")


@functools.lru_cache(maxsize=8)
def load_table(path: str) -> dict:
    """Parsed JSON table at ``path`` (cached; :func:`clear_cache` after writing one)."""
    try:
        with open(path, encoding="utf-8") as handle:
            table = json.load(handle)
    except (OSError, json.JSONDecodeError) as error:
        raise MoeCompressError(f"cannot read kernel config table {path}: {error}; fix or remove the file") from error
    if not isinstance(table, dict) or "default" not in table and "devices" not in table:
        raise MoeCompressError(f"kernel config table {path} has neither 'default' nor 'devices'; see {PACKAGED_TABLE}")
    return table


def clear_cache() -> None:
    load_table.cache_clear()


def device_name(device: torch.device | str | None) -> str:
    """The key tuned entries are stored under: the CUDA device name, or "cpu"."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type != "cuda" or not torch.cuda.is_available():
        return "cpu"
    return torch.cuda.get_device_name(device)


def pick_bucket(buckets: dict[str, dict], m: int) -> dict:
    """The config of the smallest bucket bound >= m ("max" is unbounded)."""
    bounds = sorted((float("inf") if key == "max" else int(key), key) for key in buckets)
    if not bounds:
        raise MoeCompressError("kernel config table has an empty bucket list; add at least a 'max' bucket")
    for bound, key in bounds:
        if m <= bound:
            return buckets[key]
    return buckets[bounds[-1][1]]


def _tables() -> list[dict]:
    paths = [os.environ.get(USER_TABLE_ENV), str(PACKAGED_TABLE)]
    return [load_table(path) for path in paths if path]


def select_config(kind: str, m: int, device: torch.device | str | None) -> dict:
    """Launch config for ``kind`` ("dequant_gemm" or "moe") at M rows on ``device`` (a fresh copy)."""
    if kind not in KINDS:
        raise MoeCompressError(f"unknown kernel kind {kind!r}; expected one of {KINDS}")
    name = device_name(device)
    tables = _tables()
    for table in tables:
        tuned = table.get("devices", {}).get(name, {}).get(kind)
        if tuned:
            return copy.deepcopy(pick_bucket(tuned, m))
    for table in tables:
        default = table.get("default", {}).get(kind)
        if default:
            return copy.deepcopy(pick_bucket(default, m))
    raise MoeCompressError(f"no '{kind}' configs in the kernel config tables; restore {PACKAGED_TABLE}")
