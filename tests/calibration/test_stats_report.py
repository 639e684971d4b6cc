"""Router-statistics report (moecompress/calibration/stats_report.py): markdown and figures."""

from __future__ import annotations

import pytest

from moecompress.calibration.stats_report import write_stats_report
from moecompress.errors import MoeCompressError


def test_report_writes_markdown_and_figures(tiny_stats, tmp_path):
    _, stats = tiny_stats["qwen2_moe"]
    path = write_stats_report(stats, tmp_path, layer=1)
    text = path.read_text()
    for figure in ("expert_load.png", "coactivation_layer1.png", "super_experts.png", "coverage_layer1.png", "domains_layer1.png"):
        assert (tmp_path / figure).stat().st_size > 1000
        assert f"]({figure})" in text
    with pytest.raises(MoeCompressError):
        write_stats_report(stats, tmp_path, layer=7)
