"""summarize(): MoE structure and parameter counts read from a meta-device skeleton."""

from __future__ import annotations

import pytest

from moecompress.model.inspect import SIZE_BITS, summarize
from moecompress.model.tiny import TINY_CONFIGS, save_tiny_model, tiny_config

FAMILIES = list(TINY_CONFIGS)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """family -> (folder, in-memory model), each written once per module."""
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            folder = tmp_path_factory.mktemp(f"insp_{family}")
            cache[family] = (folder, save_tiny_model(family, folder, seed=0))
        return cache[family]

    return get


def mixtral_counts(cfg) -> dict[str, int]:
    """Parameter counts of a Mixtral model computed from its config alone."""
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    layers, vocab = cfg.num_hidden_layers, cfg.vocab_size
    head_dim = h // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * head_dim
    attention = h * h + 2 * h * kv + h * h  # q, k, v, o (no biases)
    per_expert = 3 * h * i  # gate, up, down
    per_layer = attention + 2 * h + e * h + e * per_expert  # + two norms + router
    total = 2 * vocab * h + h + layers * per_layer  # untied embeddings and head + final norm
    routed = layers * e * per_expert
    return {"total": total, "routed": routed, "active": total - layers * (e - k) * per_expert}


def test_tiny_mixtral_summary_matches_counts_from_the_config(saved):
    folder, _ = saved("mixtral")
    cfg = tiny_config("mixtral")
    assert not cfg.tie_word_embeddings
    want = mixtral_counts(cfg)
    s = summarize(folder)
    assert s.model_type == "mixtral"
    assert s.generic_path is False
    assert s.num_layers == 3
    assert s.moe_layers == [0, 1, 2]
    assert (s.num_experts, s.top_k) == (4, 2)
    assert s.router_kind == "softmax"
    assert s.has_shared_experts is False
    assert s.expert_layout == "concatenated, out-in"
    assert (s.expert_hidden_size, s.expert_intermediate_size) == (64, 64)
    assert s.params_total == want["total"]
    assert s.params_routed_experts == want["routed"]
    assert s.params_active == want["active"]
    assert s.checkpoint_bytes == (folder / "model.safetensors").stat().st_size


@pytest.mark.parametrize("family", FAMILIES)
def test_summary_counts_agree_with_the_materialised_model(saved, family):
    folder, model = saved(family)
    s = summarize(folder)
    total = sum(p.numel() for p in model.parameters())
    moe_blocks = [m for name, m in model.named_modules() if name.endswith(".experts")]  # not shared_experts
    routed = sum(p.numel() for m in moe_blocks for p in m.parameters())
    assert s.params_total == total
    assert s.params_routed_experts == routed
    inactive_share = (s.num_experts - s.top_k) / s.num_experts
    assert s.params_active == total - round(routed * inactive_share)
    assert s.params_active < s.params_total
    assert set(s.estimated_bytes) == {f"{b}bit" for b in SIZE_BITS}
    assert s.estimated_bytes["16bit"] == total * 2
    assert s.estimated_bytes["4bit"] == int(((total - routed) * 16 + routed * (4 + 16 / 128)) / 8)
    sizes = [s.estimated_bytes[f"{b}bit"] for b in SIZE_BITS]
    assert sizes == sorted(sizes, reverse=True)


@pytest.mark.parametrize(
    "family, moe_layers, shared, router, layout",
    [
        ("qwen2_moe", [0, 1, 2], True, "softmax", "concatenated, out-in"),
        ("deepseek_v3", [1, 2], True, "sigmoid", "concatenated, out-in"),
        ("glm4_moe", [1, 2], True, "sigmoid", "concatenated, out-in"),
        ("gpt_oss", [0, 1, 2], False, "topk_softmax", "interleaved, transposed, bias"),
        ("phimoe", [0, 1, 2], False, "sparsemixer", "concatenated, out-in"),
    ],
)
def test_summary_structure(saved, family, moe_layers, shared, router, layout):
    s = summarize(saved(family)[0])
    assert s.moe_layers == moe_layers
    assert s.has_shared_experts is shared
    assert s.router_kind == router
    assert s.expert_layout == layout


def test_group_size_changes_only_the_quantized_estimates(saved):
    folder, _ = saved("olmoe")
    a, b = summarize(folder, group_size=128), summarize(folder, group_size=32)
    assert a.estimated_bytes["16bit"] == b.estimated_bytes["16bit"]
    assert b.estimated_bytes["4bit"] > a.estimated_bytes["4bit"]  # more scales per weight
