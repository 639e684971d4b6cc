"""Every pass config refuses out-of-range, NaN/Inf and wrongly typed values in ``validate()`` with one line
``--option-name must be ..., got X``, and the passes call it before any work (nothing runs)."""

from __future__ import annotations

import math

import pytest

from moecompress.errors import MoeCompressError
from moecompress.passes.compressed_experts import CompressExpertsConfig
from moecompress.passes.merge import MergeConfig, MergePass
from moecompress.passes.mixed_precision import MixedPrecisionConfig
from moecompress.passes.prune import PruneConfig, PrunePass
from moecompress.passes.quantize import QuantizeConfig, QuantizePass
from moecompress.passes.refit import RefitConfig

NAN, INF = math.nan, math.inf


def refused(cfg, message: str) -> str:
    """validate() raises one line that contains ``message``; returns it."""
    with pytest.raises(MoeCompressError) as info:
        cfg.validate()
    text = str(info.value)
    assert message in text, text
    assert "\n" not in text
    return text


# ----------------------------------------------------------------------------- quantize


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, "--bits must be one of 2, 3, 4, 8, got 5"),
        ({"bits": 4.0}, "--bits must be one of 2, 3, 4, 8, got 4.0"),
        ({"bits": True}, "--bits must be one of 2, 3, 4, 8, got True"),
        ({"group_size": 32.0}, "--group-size must be a positive group length or -1 (per-channel), got 32.0"),
        ({"group_size": -2}, "group_size must be a positive group length or -1"),
        ({"damp": NAN}, "--damp must be a number in (0, 1]"),
        ({"damp": INF}, "got inf"),
        ({"damp": 0.0}, "--damp must be a number in (0, 1] (GPTQ damping, a fraction of the mean Hessian diagonal), got 0.0"),
        ({"damp": 1.5}, "--damp must be a number in (0, 1]"),
        ({"min_tokens_fraction": NAN}, "--min-tokens-fraction must be a number in [0, 1], got nan"),
        ({"min_tokens_fraction": -0.1}, "--min-tokens-fraction must be a number in [0, 1], got -0.1"),
        ({"min_tokens_fraction": 1.5}, "--min-tokens-fraction must be a number in [0, 1], got 1.5"),
        ({"attention_bits": 6}, "--attention-bits must be one of 2, 3, 4, 8 (or 16: kept dense), got 6"),
        ({"shared_expert_bits": 0}, "--shared-expert-bits must be one of 2, 3, 4, 8 (or 16: kept dense), got 0"),
        ({"expert_bits": {1: [4, 5]}}, "the width of an expert of layer 1 must be one of 2, 3, 4, 8, 16, got 5"),
    ],
)
def test_quantize_config_ranges(kwargs, message):
    cfg = QuantizeConfig(**kwargs)
    refused(cfg, message)
    with pytest.raises(MoeCompressError):
        QuantizePass(cfg, model_config=None)  # the pass validates before it holds anything


def test_quantize_config_accepts_the_edges():
    for kwargs in ({"damp": 1.0}, {"min_tokens_fraction": 0.0}, {"min_tokens_fraction": 1.0}, {"group_size": -1},
                   {"attention_bits": 16, "shared_expert_bits": 16}, {"expert_bits": {0: [2, 16]}}):
        QuantizeConfig(**kwargs).validate()


# ----------------------------------------------------------------------------- mixed precision


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"budget": NAN}, "--bits-budget must be a finite number > 0 (average stored bits per routed-expert weight, e.g. 2.5), got nan"),
        ({"budget": INF}, "--bits-budget must be a finite number > 0"),
        ({"budget": 0}, "--bits-budget must be a finite number > 0"),
        ({"budget": -1.0}, "got -1.0"),
        ({"budget": 3, "alpha": NAN}, "--alpha must be a finite number >= 0, got nan"),
        ({"budget": 3, "alpha": -INF}, "--alpha must be a finite number >= 0, got -inf"),
        ({"budget": 3, "beta": INF}, "--beta must be a finite number >= 0, got inf"),
        ({"budget": 3, "beta": -0.5}, "--beta must be a finite number >= 0, got -0.5"),
        ({"budget": 3, "bit_choices": ()}, "--bit-choices must be a non-empty comma-separated list of widths from 2, 3, 4, 8, got ()"),
        ({"budget": 3, "bit_choices": (2, 5)}, "--bit-choices must be widths from 2, 3, 4, 8, got 5"),
        ({"budget": 3, "bit_choices": (4, 4)}, "--bit-choices must be a list of distinct widths (each width once), got '4,4'"),
        ({"budget": 3, "min_bits": 5}, "--min-bits must be one of 2, 3, 4, 8, got 5"),
        ({"budget": 3, "max_bits": 3.5}, "--max-bits must be one of 2, 3, 4, 8, got 3.5"),
        ({"budget": 3, "min_bits": 8, "max_bits": 4}, "--min-bits must be <= --max-bits (4), got 8"),
        ({"budget": 3, "bit_choices": (2, 3), "min_bits": 4}, "--bit-choices must be a list with at least one width within --min-bits 4"),
        ({"budget": 3, "allocation": "local"}, "--allocation must be one of global, layer, got 'local'"),
        ({"budget": 3, "granularity": "row"}, "--granularity must be one of expert, layer, got 'row'"),
    ],
)
def test_mixed_precision_config_ranges(kwargs, message):
    refused(MixedPrecisionConfig(**kwargs), message)


def test_allocation_config_refuses_non_finite_exponents():
    from moecompress.quant.allocate import AllocationConfig

    for alpha, beta in ((NAN, 1.0), (1.0, INF)):
        with pytest.raises(MoeCompressError, match="alpha and beta must be finite numbers >= 0"):
            AllocationConfig(budget=3.0, alpha=alpha, beta=beta)


# ----------------------------------------------------------------------------- prune / merge / refit


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(keep_ratio=NAN), "--keep-ratio nan is outside (0, 1]"),
        (dict(keep_ratio=INF), "--keep-ratio inf is outside (0, 1]"),
        (dict(keep_ratio="0.5"), "--keep-ratio '0.5' is outside (0, 1]"),
        (dict(num_experts=0), "--num-experts must be at least 1 (an integer: experts kept per layer), got 0"),
        (dict(num_experts=2.5), "--num-experts must be at least 1 (an integer: experts kept per layer), got 2.5"),
        (dict(method="dern", keep_ratio=0.5, similarity_threshold=NAN), "--similarity-threshold nan is a cosine"),
        (dict(keep_ratio=0.5, kmeans_iters=0), "k-means iterations (kmeans_iters) must be an integer >= 1, got 0"),
    ],
)
def test_prune_config_ranges(kwargs, message):
    cfg = PruneConfig(**kwargs)
    refused(cfg, message)
    with pytest.raises(MoeCompressError):
        PrunePass(cfg, {})


@pytest.mark.parametrize("num", [0, -3, 2.0, None])
def test_merge_config_expert_count(num):
    cfg = MergeConfig(num_experts=num)
    refused(cfg, f"--num-experts must be at least 1 (an integer: merged experts per layer), got {num!r}")
    with pytest.raises(MoeCompressError):
        MergePass(cfg, {}, {})


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(damp=NAN), "--refit-damp must be positive and finite (ridge strength relative to the mean Gram diagonal, e.g. 0.1), got nan"),
        (dict(damp=INF), "--refit-damp must be positive and finite"),
        (dict(damp=0.0), "--refit-damp must be positive"),
        (dict(sweeps=0), "--refit-sweeps must be at least 1 (an integer), got 0"),
        (dict(sweeps=1.5), "--refit-sweeps must be at least 1 (an integer), got 1.5"),
    ],
)
def test_refit_config_ranges(kwargs, message):
    refused(RefitConfig(**kwargs), message)


# ----------------------------------------------------------------------------- compressed experts / dynamic skip


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_ce=-1), "--n-ce must be >= 0 (an integer below the model's top-k), got -1"),
        (dict(n_ce=1.0), "--n-ce must be >= 0"),
        (dict(fit_steps=-3), "--fit-steps must be >= 0 (an integer), got -3"),
        (dict(lr=NAN), "--lr must be > 0 and finite, got nan"),
        (dict(lr=INF), "--lr must be > 0 and finite, got inf"),
        (dict(lr=0.0), "--lr must be > 0 and finite, got 0.0"),
        (dict(fit_batch_tokens=0), "--fit-batch-tokens must be >= 1 (an integer), got 0"),
        (dict(holdout_fraction=NAN), "the held-back fraction (holdout_fraction) must be a number in [0, 1), got nan"),
        (dict(holdout_fraction=1.0), "the held-back fraction (holdout_fraction) must be a number in [0, 1), got 1.0"),
        (dict(dynamic_skip=True, protect_tokens=NAN), "--protect-tokens must be a number in [0, 1), got nan"),
        (dict(dynamic_skip=True, protect_tokens=-0.1), "--protect-tokens must be a number in [0, 1), got -0.1"),
        (dict(seed=1.5), "--seed must be an integer, got 1.5"),
        (dict(distill_steps=-1), "--distill-steps must be >= 0 (an integer), got -1"),
        (dict(distill_steps=1, distill_lr=INF), "--distill-lr must be > 0 and finite, got inf"),
        (dict(distill_steps=1, distill_lr=NAN), "--distill-lr must be > 0 and finite, got nan"),
        (dict(distill_batch_size=0), "--distill-batch-size must be >= 1 (an integer), got 0"),
        (dict(distill_top_k=0), "--distill-top-k must be >= 1 (an integer), got 0"),
    ],
)
def test_compress_experts_config_ranges(kwargs, message):
    refused(CompressExpertsConfig(**kwargs), message)


# ----------------------------------------------------------------------------- stats options


def test_super_expert_options_refuse_nan():
    from moecompress.analysis.super_experts import check_threshold_options

    check_threshold_options(99.5, 0.1)
    for percentile, ratio, message in (
        (NAN, 0.1, "--super-percentile must be a number in [0, 100], got nan"),
        (101.0, 0.1, "--super-percentile must be a number in [0, 100], got 101.0"),
        (99.5, NAN, "--super-ratio must be a finite number >= 0, got nan"),
        (99.5, -0.1, "--super-ratio must be a finite number >= 0, got -0.1"),
    ):
        with pytest.raises(MoeCompressError) as info:
            check_threshold_options(percentile, ratio)
        assert str(info.value) == message


# ----------------------------------------------------------------------------- the jobs call validate() first


def test_library_jobs_refuse_non_finite_options_before_any_work(tmp_path):
    """Through the public API (what the CLI and the YAML pipeline call): one line, OUT never created."""
    import moecompress
    from moecompress.model.tiny import save_tiny_model

    src = tmp_path / "src"
    save_tiny_model("qwen3_moe", src, seed=0)
    cases = [
        (moecompress.quantize, moecompress.QuantizeOptions(method="rtn", group_size=32, damp=NAN), "damp"),
        (moecompress.quantize, moecompress.QuantizeOptions(method="rtn", group_size=32, bits_budget=3.0, alpha=NAN), "--alpha"),
        (moecompress.quantize, moecompress.QuantizeOptions(method="rtn", group_size=32, min_tokens_fraction=INF), "min-tokens-fraction"),
        (moecompress.prune, moecompress.PruneOptions(keep_ratio=NAN), "--keep-ratio"),
        (moecompress.prune, moecompress.PruneOptions(keep_ratio=0.5, refit_damp=INF), "--refit-damp"),
        (moecompress.merge, moecompress.MergeOptions(num_experts=2, refit_sweeps=0), "--refit-sweeps"),
        (moecompress.compress_experts, moecompress.CompressExpertsOptions(lr=INF), "--lr"),
    ]
    for i, (job, options, option) in enumerate(cases):
        out = tmp_path / f"out{i}"
        with pytest.raises(MoeCompressError, match=option) as info:
            job(src, out, options)
        assert "\n" not in str(info.value)
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
