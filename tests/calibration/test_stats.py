"""Statistics collector: counts against the model's own routing, REAP / output max against the experts
module itself, planted super expert, coverage, save/load."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from moecompress.calibration.types import CalibrationSet
from moecompress.calibration.stats import (
    STATS_JSON,
    STATS_TENSORS,
    RouterStats,
    collect_stats,
    cosine_from_gram,
    routing_call_args,
    selection_matrix,
    starved_mask,
    write_stats_report,
)
from moecompress.errors import MoeCompressError
from moecompress.model.tiny import build_tiny_model, save_tiny_model
from moecompress.model.view import describe_model

N_ROWS, SEQLEN = 5, 16


def _calib(seed: int = 0, domains=("prose", "code", "prose", "math", "code")) -> CalibrationSet:
    ids = torch.randint(3, 256, (N_ROWS, SEQLEN), generator=torch.Generator().manual_seed(seed))
    return CalibrationSet(ids, list(domains) if domains else None, "synthetic")


def _full_forward_routing(model, input_ids):
    """Router outputs and experts-module inputs of a plain full forward, per MoE layer."""
    view = describe_model(model)
    routed, experts_in, handles = {}, {}, []
    for i, block in view.blocks.items():
        def router_hook(_m, _a, out, i=i):
            routed.setdefault(i, []).append(tuple(t.detach().reshape(-1, t.shape[-1]) for t in out[:3]))

        def experts_hook(m, args, kwargs, i=i):
            experts_in.setdefault(i, []).append(tuple(t.detach() for t in routing_call_args(m, args, kwargs)))

        handles.append(block.router.module.register_forward_hook(router_hook))
        handles.append(block.experts.module.register_forward_pre_hook(experts_hook, with_kwargs=True))
    with torch.no_grad():
        model(input_ids=input_ids, use_cache=False)
    for h in handles:
        h.remove()
    return view, {i: [torch.cat(parts) for parts in zip(*v)] for i, v in routed.items()}, experts_in


@pytest.fixture(scope="module")
def tiny_stats(tmp_path_factory):
    """(family -> (model, stats)) for the families with distinct routers and expert layouts."""
    out = {}
    for family in ("qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe"):
        folder = tmp_path_factory.mktemp(family)
        model = save_tiny_model(family, folder)
        out[family] = (model, collect_stats(folder, _calib(), batch_size=2))
    return out


@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_moe"])
def test_counts_match_a_full_forward(tiny_stats, family):
    model, stats = tiny_stats[family]
    view, routed, _ = _full_forward_routing(model, _calib().input_ids)
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
    view, _, experts_in = _full_forward_routing(model, _calib().input_ids)
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
    view, _, experts_in = _full_forward_routing(model, _calib().input_ids)
    for i in view.moe_layers:
        hidden = experts_in[i][0][0]
        with torch.no_grad():
            expected = view.blocks[i].shared(hidden).abs().max()
        assert stats.layer(i).shared_output_max == pytest.approx(float(expected), rel=1e-5)
    assert stats.layer(0).shared_output_max is not None
    assert tiny_stats["qwen3_moe"][1].layer(0).shared_output_max is None


def test_batch_size_does_not_change_the_statistics(tmp_path):
    save_tiny_model("mixtral", tmp_path)
    a = collect_stats(tmp_path, _calib(), batch_size=1)
    b = collect_stats(tmp_path, _calib(), batch_size=N_ROWS)
    for i in a.moe_layers:
        for name in ("expert_counts", "coactivation", "domain_counts", "output_max_where"):
            assert torch.equal(getattr(a.layer(i), name), getattr(b.layer(i), name)), name
        torch.testing.assert_close(a.layer(i).reap_sum, b.layer(i).reap_sum)
    a.save(tmp_path / "a")
    a2 = collect_stats(tmp_path, _calib(), batch_size=1)
    a2.save(tmp_path / "a2")
    assert (tmp_path / "a" / STATS_JSON).read_text() == (tmp_path / "a2" / STATS_JSON).read_text()


def test_planted_super_expert_is_found_and_nothing_else(tmp_path):
    model = build_tiny_model("qwen3_moe", num_hidden_layers=4)
    experts = describe_model(model).blocks[1].experts
    experts.set(2, "down", experts.get(2, "down") * 1000.0)
    model.save_pretrained(str(tmp_path))
    stats = collect_stats(tmp_path, _calib(domains=None), batch_size=8)
    assert stats.layer(1).expert_counts[2] > 0, "the planted expert must receive tokens"
    found = [(s.layer, s.expert) for s in stats.super_experts]
    assert found == [(1, 2)]
    assert stats.is_super_expert(1, 2) and not stats.is_super_expert(1, 1)
    assert stats.super_expert_criterion["layer_cutoff"] == 3
    others = torch.cat([stats.layer(i).output_max for i in stats.moe_layers])
    assert stats.super_experts[0].max_abs == pytest.approx(float(others.max()))
    assert stats.domain_names is None and stats.layer(1).domain_counts is None


def test_coverage_flags_experts_below_the_threshold(tiny_stats):
    counts = torch.tensor([0, 4, 20, 100])                    # uniform share: 62 tokens * 2 / 4 = 31
    assert starved_mask(counts, 62, 2, 0.2).tolist() == [True, True, False, False]   # below 6.2
    assert starved_mask(counts, 62, 2, 0.0).tolist() == [False] * 4
    _, stats = tiny_stats["qwen3_moe"]
    layer = stats.moe_layers[0]
    s = stats.layer(layer)
    # a threshold just above the least-used expert's ratio flags exactly that expert (and equals)
    ratio = s.load_ratio
    cov = stats.compute_coverage(float(ratio.min()) + 1e-9)
    flagged = {(x["layer"], x["expert"]) for x in cov["starved"]}
    assert (layer, int(ratio.argmin())) in flagged
    assert all(stats.layer(l).load_ratio[e] <= ratio.min() + 1e-9 for l, e in flagged)
    assert stats.compute_coverage(0.0)["num_starved"] == 0
    with pytest.raises(MoeCompressError):
        stats.compute_coverage(-1.0)
    stats.compute_coverage(0.1)


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


def test_report_writes_markdown_and_figures(tiny_stats, tmp_path):
    _, stats = tiny_stats["qwen2_moe"]
    path = write_stats_report(stats, tmp_path, layer=1)
    text = path.read_text()
    for figure in ("expert_load.png", "coactivation_layer1.png", "super_experts.png", "coverage_layer1.png", "domains_layer1.png"):
        assert (tmp_path / figure).stat().st_size > 1000
        assert f"]({figure})" in text
    with pytest.raises(MoeCompressError):
        write_stats_report(stats, tmp_path, layer=7)


def test_bad_arguments(tmp_path):
    save_tiny_model("olmoe", tmp_path)
    with pytest.raises(MoeCompressError, match="batch size"):
        collect_stats(tmp_path, _calib(), batch_size=0)
    bad = CalibrationSet(torch.full((2, 8), 300), None, "synthetic")
    with pytest.raises(MoeCompressError, match="vocabulary"):
        collect_stats(tmp_path, bad)


def test_tensor_helpers():
    index = torch.tensor([[0, 2], [1, 2], [3, -1]])            # -1: an expert-parallel sentinel
    assert selection_matrix(index, 3).tolist() == [[1, 0, 1], [0, 1, 1], [0, 0, 0]]
    cols = torch.randn(50, 4, dtype=torch.float64)
    cols[:, 3] = 0
    cos = cosine_from_gram(cols.t() @ cols)
    expected = F.cosine_similarity(cols.t()[:, None], cols.t()[None], dim=-1)
    torch.testing.assert_close(cos[:3, :3], expected[:3, :3])
    assert torch.equal(cos[3], torch.zeros(4)) and not cos.isnan().any()

    class Experts(torch.nn.Module):
        def forward(self, hidden_states, router_indices=None, routing_weights=None):
            return hidden_states

    h, i, w = torch.zeros(2, 3), torch.zeros(2, 1), torch.ones(2, 1)
    for args, kwargs in (((h, i, w), {}), ((h,), {"router_indices": i, "routing_weights": w}), ((), {"hidden_states": h, "router_indices": i, "routing_weights": w})):
        got = routing_call_args(Experts(), args, kwargs)
        assert got[0] is h and got[1] is i and got[2] is w
