"""Statistics files (moecompress/calibration/stats_types.py): save/load round trip, one-line load errors."""

from __future__ import annotations

import json

import pytest
import torch

from moecompress.calibration.stats_types import STATS_JSON, STATS_TENSORS, RouterStats
from moecompress.errors import MoeCompressError


def test_save_load_round_trip(tiny_stats, tmp_path):
    _, stats = tiny_stats["qwen2_moe"]
    stats.save(tmp_path)
    meta = json.loads((tmp_path / STATS_JSON).read_text())
    assert {"version", "model", "calibration", "layers", "super_experts", "coverage"} <= set(meta)
    assert meta["version"] == 1
    for entry in meta["layers"]:
        assert {"layer", "tokens", "top_k", "expert_counts", "reap_scores", "weight_sums", "output_max"} <= set(entry)
    loaded = RouterStats.load(tmp_path)
    assert loaded.moe_layers == stats.moe_layers and loaded.num_layers == stats.num_layers
    assert loaded.domain_names == stats.domain_names and loaded.coverage == stats.coverage
    assert [(s.layer, s.expert, s.max_abs) for s in loaded.super_experts] == [
        (s.layer, s.expert, s.max_abs) for s in stats.super_experts
    ]
    for i in stats.moe_layers:
        a, b = stats.layer(i), loaded.layer(i)
        for name, tensor in a.tensors().items():
            assert torch.equal(tensor, b.tensors()[name]), name
        assert (a.tokens, a.top_k, a.shared_output_max) == (b.tokens, b.top_k, b.shared_output_max)
    with pytest.raises(MoeCompressError, match="no MoE statistics"):
        loaded.layer(99)


def test_load_errors_are_one_clear_line(tiny_stats, tmp_path):
    with pytest.raises(MoeCompressError, match="not found"):
        RouterStats.load(tmp_path / "missing")
    _, stats = tiny_stats["qwen3_moe"]
    stats.save(tmp_path)
    meta = json.loads((tmp_path / STATS_JSON).read_text())
    (tmp_path / STATS_JSON).write_text(json.dumps({**meta, "version": 2}))
    with pytest.raises(MoeCompressError, match="version 2"):
        RouterStats.load(tmp_path)
    (tmp_path / STATS_JSON).write_text("{not json")
    with pytest.raises(MoeCompressError, match="not valid JSON"):
        RouterStats.load(tmp_path)
    (tmp_path / STATS_JSON).write_text(json.dumps(meta))
    (tmp_path / STATS_TENSORS).write_bytes(b"garbage")
    with pytest.raises(MoeCompressError, match="cannot read"):
        RouterStats.load(tmp_path)
    (tmp_path / STATS_TENSORS).unlink()
    with pytest.raises(MoeCompressError, match="not found"):
        RouterStats.load(tmp_path)
