"""Statistics collector (moecompress/calibration/collect.py): counts against the model's own routing,
REAP / output max against the experts module itself, the shared expert, batching, bad arguments, and
reading the routing of an experts-module call."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moecompress.calibration.collect import collect_stats, routing_call_args
from moecompress.calibration.types import CalibrationSet
from moecompress.errors import MoeCompressError
from moecompress.model.tiny import save_tiny_model
from moecompress.calibration.stats_types import STATS_JSON
from stats_util import FAMILIES, N_ROWS, SEQLEN, calib_set, full_forward_routing


@pytest.mark.parametrize("family", FAMILIES)
def test_counts_match_a_full_forward(tiny_stats, family):
    model, stats = tiny_stats[family]
    view, routed, _ = full_forward_routing(model, calib_set().input_ids)
    assert stats.moe_layers == view.moe_layers
    for i in view.moe_layers:
        s = stats.layer(i)
        logits, weights, index = routed[i]                                   # [T, E], [T, k], [T, k]
        E = s.num_experts
        assert s.tokens == N_ROWS * SEQLEN
        assert int(s.expert_counts.sum()) == s.tokens * s.top_k
        assert torch.equal(s.expert_counts, torch.bincount(index.reshape(-1), minlength=E))
        expected_w = torch.zeros(E, dtype=torch.float64).index_add_(0, index.reshape(-1), weights.reshape(-1).double())
        torch.testing.assert_close(s.weight_sums, expected_w)
        probs = logits.float().sigmoid() if view.blocks[i].router.scoring == "sigmoid" else logits.float().softmax(-1)
        torch.testing.assert_close(s.mean_probs, probs.double().mean(0), rtol=1e-5, atol=1e-7)
        # co-activation: symmetric, diagonal = counts, each token adds k*(k-1) off-diagonal pairs
        assert torch.equal(s.coactivation, s.coactivation.t())
        assert torch.equal(s.coactivation.diagonal(), s.expert_counts)
        assert int(s.coactivation.sum() - s.coactivation.trace()) == s.tokens * s.top_k * (s.top_k - 1)
        # router-logit similarity: cosine of logit columns computed directly
        direct = F.cosine_similarity(logits.double().t()[:, None, :], logits.double().t()[None, :, :], dim=-1)
        torch.testing.assert_close(s.router_similarity, direct, rtol=1e-5, atol=1e-6)
        # domain rows follow the calibration rows: prose rows 0 and 2
        assert stats.domain_names == ["code", "math", "prose"]
        assert torch.equal(s.domain_counts.sum(0), s.expert_counts)
        prose_tokens = torch.cat([index[0:SEQLEN], index[2 * SEQLEN : 3 * SEQLEN]])
        assert torch.equal(s.domain_counts[2], torch.bincount(prose_tokens.reshape(-1), minlength=E))


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3"])
def test_reap_and_output_max_match_the_experts_module(tiny_stats, family):
    """f_e(t) recomputed by the model's own experts module with a one-expert routing (weight 1)."""
    model, stats = tiny_stats[family]
    view, _, experts_in = full_forward_routing(model, calib_set().input_ids)
    for i in view.moe_layers:
        ((hidden, index, weights),) = experts_in[i]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        s = stats.layer(i)
        module = view.blocks[i].experts.module
        for e in range(s.num_experts):
            token, slot = (index == e).nonzero(as_tuple=True)
            if token.numel() == 0:
                assert s.reap_scores[e] == 0 and s.output_max_where[e, 0] == -1
                continue
            ones = torch.ones(token.numel(), 1, dtype=weights.dtype)
            with torch.no_grad():
                f = module(hidden[token], torch.full((token.numel(), 1), e), ones)    # [Te, H]
            g = weights[token, slot].double()
            expected_reap = (g * f.double().norm(dim=-1)).mean()
            torch.testing.assert_close(s.reap_scores[e], expected_reap, rtol=1e-4, atol=1e-8)
            torch.testing.assert_close(s.output_max[e], f.abs().max().double(), rtol=1e-4, atol=1e-8)
            row, pos, channel = s.output_max_where[e].tolist()
            at = (token == row * SEQLEN + pos).nonzero()
            assert at.numel() == 1, "the recorded position must be a token routed to the expert"
            torch.testing.assert_close(f[at[0, 0], channel].abs().double(), s.output_max[e], rtol=1e-4, atol=1e-8)


def test_shared_expert_max_is_recorded(tiny_stats):
    model, stats = tiny_stats["qwen2_moe"]
    view, _, experts_in = full_forward_routing(model, calib_set().input_ids)
    for i in view.moe_layers:
        hidden = experts_in[i][0][0]
        with torch.no_grad():
            expected = view.blocks[i].shared(hidden).abs().max()
        assert stats.layer(i).shared_output_max == pytest.approx(float(expected), rel=1e-5)
    assert stats.layer(0).shared_output_max is not None
    assert tiny_stats["qwen3_moe"][1].layer(0).shared_output_max is None


def test_batch_size_does_not_change_the_statistics(tmp_path):
    save_tiny_model("mixtral", tmp_path)
    a = collect_stats(tmp_path, calib_set(), batch_size=1)
    b = collect_stats(tmp_path, calib_set(), batch_size=N_ROWS)
    for i in a.moe_layers:
        for name in ("expert_counts", "coactivation", "domain_counts", "output_max_where"):
            assert torch.equal(getattr(a.layer(i), name), getattr(b.layer(i), name)), name
        torch.testing.assert_close(a.layer(i).reap_sum, b.layer(i).reap_sum)
    a.save(tmp_path / "a")
    a2 = collect_stats(tmp_path, calib_set(), batch_size=1)
    a2.save(tmp_path / "a2")
    assert (tmp_path / "a" / STATS_JSON).read_text() == (tmp_path / "a2" / STATS_JSON).read_text()


def test_bad_arguments(tmp_path):
    save_tiny_model("olmoe", tmp_path)
    with pytest.raises(MoeCompressError, match="batch size"):
        collect_stats(tmp_path, calib_set(), batch_size=0)
    bad = CalibrationSet(torch.full((2, 8), 300), None, "synthetic")
    with pytest.raises(MoeCompressError, match="vocabulary"):
        collect_stats(tmp_path, bad)


def test_routing_call_args_positional_or_keyword():
    class Experts(torch.nn.Module):
        def forward(self, hidden_states, router_indices=None, routing_weights=None):
            return hidden_states

    h, i, w = torch.zeros(2, 3), torch.zeros(2, 1), torch.ones(2, 1)
    for args, kwargs in (((h, i, w), {}), ((h,), {"router_indices": i, "routing_weights": w}), ((), {"hidden_states": h, "router_indices": i, "routing_weights": w})):
        got = routing_call_args(Experts(), args, kwargs)
        assert got[0] is h and got[1] is i and got[2] is w
