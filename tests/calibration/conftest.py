"""Fixtures of the calibration tests: router statistics of tiny models, collected once per session."""

from __future__ import annotations

import pytest

from moecompress.calibration.collect import collect_stats
from moecompress.model.tiny import save_tiny_model
from stats_util import FAMILIES, calib_set


@pytest.fixture(scope="session")
def tiny_stats(tmp_path_factory):
    """(family -> (model, stats)) for the families with distinct routers and expert layouts."""
    out = {}
    for family in FAMILIES:
        folder = tmp_path_factory.mktemp(family)
        model = save_tiny_model(family, folder)
        out[family] = (model, collect_stats(folder, calib_set(), batch_size=2))
    return out
