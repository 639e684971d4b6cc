"""Tiny random MoE models of every supported family, built from configs (nothing downloaded).

Used by the tests (one model per family) and by ``moecompress inspect --tiny`` / the demo. Sizes are
multiples of 32 and every forward takes milliseconds; any other size packs too (kpack-v2 pads K:
``tests/quant/test_any_input_dim.py`` builds every family at H = 48, I = 40 through ``**overrides``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

_COMMON = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

TINY_CONFIGS: dict[str, dict] = {
    "mixtral": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=64,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    ),
    "qwen3_moe": dict(
        intermediate_size=128, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=2, head_dim=16, mlp_only_layers=[]
    ),
    "olmoe": dict(intermediate_size=64, num_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        num_key_value_heads=4,
        kv_lora_rank=32,
        q_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
    "phimoe": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "gpt_oss": dict(
        intermediate_size=64,
        num_local_experts=4,
        num_experts_per_tok=2,
        head_dim=16,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
    ),
    "granitemoe": dict(intermediate_size=64, num_local_experts=4, num_experts_per_tok=2),
    "glm4_moe": dict(
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        head_dim=16,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
    ),
}


def tiny_config(family: str, **overrides):
    if family not in TINY_CONFIGS:
        raise KeyError(f"no tiny config for {family!r}; known: {', '.join(TINY_CONFIGS)}")
    kwargs = {**_COMMON, **TINY_CONFIGS[family], **overrides}
    return AutoConfig.for_model(family, **kwargs)


@torch.no_grad()
def build_tiny_model(family: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A randomly initialised tiny model of ``family`` (deterministic for a seed)."""
    config = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # Routers and correction biases start at zero in some families: give them signal so routing is
    # non-trivial and tests can see experts differ.
    gen = torch.Generator().manual_seed(seed + 1)
    for name, p in model.named_parameters():
        if p.abs().sum() == 0 and p.dim() >= 1 and "norm" not in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(torch.randn(b.shape, generator=gen) * 0.01)
    model.eval()
    return model


def save_tiny_model(family: str, folder: str | Path, seed: int = 0, max_shard_size: str | None = None, **overrides):
    """Build and ``save_pretrained`` a tiny model (per-expert checkpoint names, as real checkpoints have)."""
    model = build_tiny_model(family, seed=seed, **overrides)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    return model
