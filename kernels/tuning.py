"""Offline autotuning: benchmark candidate launch configs on this GPU and write the JSON table.

Run on the target card (e.g. an H100) once::

    python -c "from moecompress.kernels.tuning import tune; tune()"

For every M bucket of ``config_table`` it times each candidate config (``triton.testing.do_bench``,
median, L2 flushed) on representative shapes (the dense shapes of KERNELS.md and the expert layers of
Mixtral-8x7B, Qwen3-30B-A3B, OLMoE-1B-7B), keeps the config with the smallest geometric-mean time, and
stores the result under ``devices[torch.cuda.get_device_name()]`` of the table. Candidates that fail
to compile or launch (too much shared memory) are skipped. Nothing here runs at import.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch

from moecompress.errors import MoeCompressError
from moecompress.kernels import config_table
from moecompress.kernels.dequant_gemm import dequant_gemm_with_config
from moecompress.kernels.moe_gemm import moe_experts_forward_with_config
from moecompress.kernels.synthetic import random_expert_group, random_packed, random_routing

logger = logging.getLogger(__name__)

# (K, N) of single weights (KERNELS.md section 5) and (name, E, k, H, I) of MoE layers.
DENSE_SHAPES = ((4096, 28672), (14336, 4096), (2048, 1536), (768, 2048))
MOE_SHAPES = (
    ("mixtral-8x7b", 8, 2, 4096, 14336),
    ("qwen3-30b-a3b", 128, 8, 2048, 768),
    ("olmoe-1b-7b", 64, 8, 2048, 1024),
)
# Bucket key -> M used to time it.
BUCKET_M = {"1": 1, "16": 16, "64": 64, "max": 256}


def dense_candidates(bucket: str) -> list[dict]:
    """Candidate dequant_gemm configs for one M bucket."""
    grid = itertools.product
    if bucket == "1":
        return [
            {"kernel": "splitk", "BLOCK_M": 1, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": w, "num_stages": st}
            for bn, bk, sk, w, st in grid((32, 64, 128), (32, 64, 128), (1, 2, 4, 8), (2, 4), (2, 3))
        ]
    if bucket == "16":
        return [
            {"kernel": "splitk", "BLOCK_M": 16, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "num_warps": w, "num_stages": st}
            for bn, bk, sk, w, st in grid((32, 64, 128), (64, 128), (1, 2, 4, 8), (4,), (2, 3, 4))
        ]
    block_ms = (16, 32, 64) if bucket == "64" else (64, 128)
    tiled = [
        {"kernel": "tiled", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "num_warps": w, "num_stages": st}
        for bm, bn, bk, w, st in grid(block_ms, (64, 128), (32, 64, 128), (4, 8), (3, 4))
    ]
    splitk = [
        {"kernel": "splitk", "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 64, "SPLIT_K": sk, "num_warps": 4, "num_stages": 3}
        for bm, bn, sk in grid((32, 64), (64, 128), (2, 4))
    ]
    return tiled + (splitk if bucket == "64" else [])


def moe_projection_candidates(bucket: str, decode: bool) -> list[dict]:
    """Candidate per-projection configs (gate_up or down) of the MoE kernels."""
    grid = itertools.product
    if decode:
        return [
            {"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
            for bn, bk, w, st in grid((32, 64, 128), (64, 128), (2, 4), (2, 3))
        ]
    block_ms = {"1": (16,), "16": (16,), "64": (16, 32, 64)}.get(bucket, (32, 64, 128))
    return [
        {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": w, "num_stages": st}
        for bm, bn, bk, w, st in grid(block_ms, (32, 64, 128), (64, 128), (4, 8), (2, 3, 4))
    ]


def _median_ms(fn: Callable[[], object], rep_ms: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(rep_ms // 4, 5), rep=rep_ms, return_mode="median"))


def _score(fns: list[Callable[[], object]], rep_ms: int) -> float:
    """Geometric-mean median time over the shapes; inf if any launch fails."""
    try:
        times = [_median_ms(fn, rep_ms) for fn in fns]
    except Exception as error:  # noqa: BLE001 - a config that cannot run (e.g. out of shared memory) loses
        logger.debug("candidate failed: %s", error)
        return math.inf
    return math.exp(sum(math.log(t) for t in times) / len(times))


def _best(candidates: list[dict], make_fns: Callable[[dict], list[Callable[[], object]]], rep_ms: int, label: str) -> dict:
    best, best_time = None, math.inf
    for config in candidates:
        elapsed = _score(make_fns(config), rep_ms)
        if elapsed < best_time:
            best, best_time = config, elapsed
    if best is None:
        raise MoeCompressError(f"no candidate config ran for {label}; check the GPU and the triton install")
    logger.info("%s: best %.1f us with %s", label, best_time * 1e3, best)
    return best


def tune_dequant_gemm(bits: int, group_size: int, rep_ms: int, dense_shapes=DENSE_SHAPES) -> dict:
    """Best dequant_gemm config per M bucket -> ``{bucket: config}``."""
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    weights = [random_packed((n, k), bits, group_size, False, generator, device) for k, n in dense_shapes]
    table = {}
    for bucket, m in BUCKET_M.items():
        inputs = [torch.randn(m, w.shape[1], device=device, dtype=torch.bfloat16) for w in weights]

        def make_fns(config, inputs=inputs):
            return [
                (lambda x=x, w=w: dequant_gemm_with_config(x, w.qweight, w.scales, w.zeros, bits, group_size, config=config))
                for x, w in zip(inputs, weights)
            ]

        table[bucket] = _best(dense_candidates(bucket), make_fns, rep_ms, f"dequant_gemm M<={bucket}")
    return table


def tune_moe(bits: int, group_size: int, rep_ms: int, moe_shapes=MOE_SHAPES) -> dict:
    """Best MoE config per T bucket (decode vs sorted, then gate_up and down one after the other)."""
    device = torch.device("cuda")
    generator = torch.Generator().manual_seed(0)
    layers = [
        (experts, top_k, random_expert_group(list(range(experts)), hidden, inter, bits, group_size, generator, device))
        for _, experts, top_k, hidden, inter in moe_shapes
    ]
    default = config_table.load_table(str(config_table.PACKAGED_TABLE))["default"]["moe"]
    table = {}
    for bucket, tokens in BUCKET_M.items():
        calls = []
        for experts, top_k, group in layers:
            hidden = group.down.qweight.shape[-1]
            x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
            ids, weights = random_routing(tokens, experts, top_k, generator, device=device)
            calls.append((x, ids, weights.to(torch.bfloat16), [group], experts))

        def make_fns(config, calls=calls):
            return [(lambda c=c: moe_experts_forward_with_config(*c, config=config)) for c in calls]

        modes = (True, False) if bucket in ("1", "16") else (False,)
        best_overall, best_time = None, math.inf
        for decode in modes:
            config = {"decode": decode, **{p: dict(config_table.pick_bucket(default, tokens)[p]) for p in ("gate_up", "down")}}
            if decode:
                for p in ("gate_up", "down"):
                    config[p].pop("BLOCK_M", None)
            for projection in ("gate_up", "down"):
                candidates = [{**config, projection: c} for c in moe_projection_candidates(bucket, decode)]
                config = _best(candidates, make_fns, rep_ms, f"moe T<={bucket} decode={decode} {projection}")
            elapsed = _score(make_fns(config), rep_ms)
            if elapsed < best_time:
                best_overall, best_time = config, elapsed
        table[bucket] = best_overall
    return table


def tune(
    output: str | Path | None = None,
    bits: int = 4,
    group_size: int = 128,
    rep_ms: int = 50,
    kinds: tuple[str, ...] = ("dequant_gemm", "moe"),
) -> dict:
    """Tune the kernels on the current CUDA device and write the entry into the JSON table.

    ``output``: the table to update (default: the packaged ``configs/default.json``); other devices'
    entries and the defaults are kept. Returns the device entry that was written.
    """
    if not torch.cuda.is_available():
        raise MoeCompressError("tune() benchmarks kernels on a GPU and no CUDA device is available; run it on the target GPU")
    path = Path(output) if output is not None else config_table.PACKAGED_TABLE
    table = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {"version": 1, "devices": {}}
    name = config_table.device_name(torch.device("cuda"))
    entry = dict(table.get("devices", {}).get(name, {}))
    if "dequant_gemm" in kinds:
        entry["dequant_gemm"] = tune_dequant_gemm(bits, group_size, rep_ms)
    if "moe" in kinds:
        entry["moe"] = tune_moe(bits, group_size, rep_ms)
    entry["tuned_with"] = {"bits": bits, "group_size": group_size, "torch": torch.__version__}
    table.setdefault("devices", {})[name] = entry
    path.write_text(json.dumps(table, indent=2) + "\n", encoding="utf-8")
    config_table.clear_cache()
    return entry
