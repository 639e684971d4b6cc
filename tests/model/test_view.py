"""ExpertsView / RouterView / describe_model against every family's own modules.

Shape legend: T tokens, E experts, H hidden size, I expert intermediate size, k top-k.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from moecompress.errors import UnsupportedModelError
from moecompress.model.tiny import TINY_CONFIGS, build_tiny_model
from moecompress.model.view import PROJECTIONS, ExpertsView, describe_model

FAMILIES = list(TINY_CONFIGS)

# family -> (MoE layers, router scoring, shared-experts attribute, shared-gate attribute, layout)
EXPECTED = {
    "mixtral": ([0, 1, 2], "softmax", None, None, "concatenated, out-in"),
    "qwen2_moe": ([0, 1, 2], "softmax", "shared_expert", "shared_expert_gate", "concatenated, out-in"),
    "qwen3_moe": ([0, 1, 2], "softmax", None, None, "concatenated, out-in"),
    "olmoe": ([0, 1, 2], "softmax", None, None, "concatenated, out-in"),
    "deepseek_v3": ([1, 2], "sigmoid", "shared_experts", None, "concatenated, out-in"),
    "phimoe": ([0, 1, 2], "sparsemixer", None, None, "concatenated, out-in"),
    "gpt_oss": ([0, 1, 2], "topk_softmax", None, None, "interleaved, transposed, bias"),
    "granitemoe": ([0, 1, 2], "topk_softmax", None, None, "concatenated, out-in"),
    "glm4_moe": ([1, 2], "sigmoid", "shared_experts", None, "concatenated, out-in"),
}


def _num_experts(family: str) -> int:
    cfg = TINY_CONFIGS[family]
    return cfg.get("num_local_experts") or cfg.get("num_experts") or cfg["n_routed_experts"]


def _expert_intermediate(family: str) -> int:
    cfg = TINY_CONFIGS[family]
    return cfg.get("moe_intermediate_size") or cfg["intermediate_size"]


@pytest.fixture(scope="module")
def tiny():
    """family -> tiny model, built once per module; tests that write deep-copy it first."""
    cache: dict[str, torch.nn.Module] = {}

    def get(family: str) -> torch.nn.Module:
        if family not in cache:
            cache[family] = build_tiny_model(family, seed=0)
        return cache[family]

    return get


def _ids(n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _fused_params(view: ExpertsView) -> dict[str, torch.Tensor]:
    """The experts module's fused parameters by name (gate_up_proj [E, ...], down_proj [E, ...], biases)."""
    return dict(view.module.named_parameters())


@contextmanager
def _experts_impl(module: torch.nn.Module, impl: str | None):
    """Run an experts module with another transformers experts implementation (None: as configured)."""
    if impl is None:
        yield
        return
    old = module.config._experts_implementation
    module.config._experts_implementation = impl
    try:
        yield
    finally:
        module.config._experts_implementation = old


def _module_single_expert(module: torch.nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    """What the family's experts module computes for tokens x [T, H] routed only to e with weight 1."""
    t = x.shape[0]
    index = torch.full((t, 1), e, dtype=torch.long)  # [T, 1]
    weights = torch.ones(t, 1, dtype=x.dtype)  # [T, 1]
    return module(x, index, weights)


def _reference_expert(view: ExpertsView, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e from the view's per-projection weights (get / get_bias) and the family's activation.

    Independent of ``gate_up_raw`` / ``activation``: if get() mixed up gate and up rows (interleaving,
    transposition) this disagrees with the experts module.
    """
    g = x @ view.get(e, "gate").t()  # [T, I]
    u = x @ view.get(e, "up").t()  # [T, I]
    if view.has_bias:
        g = g + view.get_bias(e, "gate")
        u = u + view.get_bias(e, "up")
    m = view.module
    if hasattr(m, "alpha") and hasattr(m, "limit"):  # GPT-OSS clamped SwiGLU with (up + 1)
        g = g.clamp(max=m.limit)
        u = u.clamp(min=-m.limit, max=m.limit)
        a = (u + 1) * (g * torch.sigmoid(g * m.alpha))
    else:
        a = m.act_fn(g) * u
    y = a @ view.get(e, "down").t()  # [T, H]
    if view.has_bias:
        y = y + view.get_bias(e, "down")
    return y


def _block_output(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = block(x)
    return out[0] if isinstance(out, tuple) else out


def _routed_index(view, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block output [1, T, H], top_k_index [T, k]) as the block really routes x [1, T, H]."""
    seen = {}

    def grab(module, args):
        seen["index"] = args[1].clone()

    handle = view.experts.module.register_forward_pre_hook(grab)
    try:
        out = _block_output(view.block, x)
    finally:
        handle.remove()
    return out, seen["index"]


# ---- describe_model ------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_describe_model_finds_layers_router_shared_and_layout(tiny, family):
    model = tiny(family)
    moe_layers, scoring, shared_name, shared_gate_name, layout = EXPECTED[family]
    view = describe_model(model)
    assert view.family == family
    assert not view.generic
    assert view.num_layers == 3
    assert view.moe_layers == moe_layers
    for i, block in view.blocks.items():
        assert block.layer_index == i
        assert block.num_experts == _num_experts(family)
        assert block.top_k == TINY_CONFIGS[family]["num_experts_per_tok"]
        assert block.router.scoring == scoring
        assert block.router.module is getattr(block.block, block.router_name)
        assert block.experts.module is block.block.get_submodule(block.experts_name.rsplit(".", 1)[-1])
        assert block.shared_name == shared_name
        assert (block.shared is not None) == (shared_name is not None)
        assert block.shared_gate_name == shared_gate_name
        assert (block.shared_gate is not None) == (shared_gate_name is not None)
        ex = block.experts
        assert ex.layout == layout
        assert ex.hidden_size == 64
        assert ex.intermediate_size == _expert_intermediate(family)
        routed = sum(p.numel() for p in ex.module.parameters())
        assert ex.params_per_expert() * ex.num_experts == routed


@pytest.mark.parametrize("family", ["deepseek_v3", "glm4_moe"])
def test_describe_model_group_routing_fields(tiny, family):
    router = describe_model(tiny(family)).blocks[1].router
    cfg = TINY_CONFIGS[family]
    assert (router.n_group, router.topk_group) == (cfg["n_group"], cfg["topk_group"])
    assert router.routed_scaling_factor == cfg["routed_scaling_factor"]
    assert router.norm_topk_prob is True
    assert router.e_score_correction_bias is not None


def test_describe_model_rejects_a_dense_model():
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match="no mixture-of-experts layers"):
        describe_model(model)


# ---- RouterView --------------------------------------------------------------------------------


def _reference_weights(router, logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Top-k weights [T, k] for the chosen experts, from the RouterView's description alone."""
    logits = logits.float()
    if router.scoring == "softmax":
        w = logits.softmax(-1).gather(1, index)
    elif router.scoring == "topk_softmax":
        w = logits.gather(1, index).softmax(-1)
    elif router.scoring == "sigmoid":
        w = logits.sigmoid().gather(1, index)
    else:
        raise AssertionError(router.scoring)
    if router.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    if router.routed_scaling_factor is not None:
        w = w * router.routed_scaling_factor
    return w


@pytest.mark.parametrize("family", [f for f in FAMILIES if EXPECTED[f][1] != "sparsemixer"])
def test_router_view_describes_how_the_router_weighs(tiny, family):
    view = describe_model(tiny(family))
    block = view.blocks[view.moe_layers[-1]]
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(3))  # [T, H]
    logits, weights, index = block.router.route(x)
    assert logits.shape == (40, block.num_experts)
    assert index.shape == weights.shape == (40, block.top_k)
    torch.testing.assert_close(weights.float(), _reference_weights(block.router, logits, index), atol=1e-5, rtol=1e-5)
    probs = block.router.probabilities(logits)
    assert probs.shape == (40, block.num_experts)
    if block.router.scoring != "sigmoid":
        torch.testing.assert_close(probs.sum(-1), torch.ones(40))
        # without group limits the chosen experts are the k most probable ones
        top = probs.topk(block.top_k, dim=-1).indices.sort(-1).values
        assert torch.equal(index.sort(-1).values, top)


# ---- ExpertsView: reading and writing --------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_read_then_write_back_every_expert_is_bit_identical(tiny, family):
    model = copy.deepcopy(tiny(family))
    ids = _ids()
    with torch.no_grad():
        before = model(input_ids=ids).logits
    view = describe_model(model)
    originals = {i: {n: p.detach().clone() for n, p in _fused_params(b.experts).items()} for i, b in view.blocks.items()}
    saved = {}
    for i, block in view.blocks.items():
        ex = block.experts
        for e in range(ex.num_experts):
            for p in PROJECTIONS:
                saved[i, e, p] = ex.get(e, p).clone()
                b = ex.get_bias(e, p)
                assert (b is not None) == ex.has_bias
                if b is not None:
                    saved[i, e, p, "bias"] = b.clone()
    # Poison every fused tensor: only a write-back that covers every element restores the model.
    with torch.no_grad():
        for block in view.blocks.values():
            for p in block.experts.module.parameters():
                p.fill_(float("nan"))
    for (i, e, p, *bias), w in saved.items():
        ex = view.blocks[i].experts
        (ex.set_bias if bias else ex.set)(e, p, w)
    for i, block in view.blocks.items():
        for name, p in _fused_params(block.experts).items():
            assert torch.equal(p, originals[i][name]), f"layer {i} {name} not restored"
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_changing_one_expert_changes_exactly_that_expert(tiny, family):
    model = copy.deepcopy(tiny(family))
    view = describe_model(model)
    block = view.blocks[view.moe_layers[0]]
    ex = block.experts
    x = torch.randn(1, 48, 64, generator=torch.Generator().manual_seed(1))  # [1, T, H]
    with torch.no_grad():
        out_before, index = _routed_index(block, x)
    counts = torch.bincount(index.flatten(), minlength=ex.num_experts)
    e = int(torch.where(counts > 0, counts, counts.max() + 1).argmin())  # least-used expert that has tokens
    routed = (index == e).any(-1)  # [T]
    assert 0 < int(routed.sum()) < 48
    before = {n: p.detach().clone() for n, p in _fused_params(ex).items()}
    gen = torch.Generator().manual_seed(2)
    for p in PROJECTIONS:
        untouched = {q: ex.get(e, q).clone() for q in PROJECTIONS if q != p}
        ex.set(e, p, torch.randn(ex.get(e, p).shape, generator=gen) * 0.1)
        for q, w in untouched.items():  # writing gate must not move up rows (interleaving), etc.
            assert torch.equal(ex.get(e, q), w), f"setting {p} changed {q}"
    for name, p in _fused_params(ex).items():
        old = before[name]
        for other in range(ex.num_experts):
            if other == e:
                continue
            assert torch.equal(p[other], old[other]), f"{name}: expert {other} changed"
        if "bias" not in name:
            assert not torch.equal(p[e], old[e]), f"{name}: expert {e} did not change"
    with torch.no_grad():
        out_after, index_after = _routed_index(block, x)
    assert torch.equal(index, index_after)  # routing does not depend on the experts
    diff = (out_after - out_before).reshape(48, -1).abs().amax(-1)  # [T]
    assert torch.equal(out_after.reshape(48, -1)[~routed], out_before.reshape(48, -1)[~routed])
    assert bool((diff[routed] > 0).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_writes_go_through_views_of_the_fused_parameter(tiny, family):
    model = copy.deepcopy(tiny(family))
    ex = describe_model(model).blocks[1].experts
    params = _fused_params(ex)
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    for p in PROJECTIONS:
        w = ex.get(1, p)
        assert any(w.untyped_storage().data_ptr() == q.untyped_storage().data_ptr() for q in params.values())
        b = ex.get_bias(1, p)
        if b is not None:
            assert any(b.untyped_storage().data_ptr() == q.untyped_storage().data_ptr() for q in params.values())
        ex.set(1, p, torch.zeros_like(w))
        assert torch.count_nonzero(ex.get(1, p)) == 0
        if b is not None:
            ex.set_bias(1, p, torch.ones_like(b))
            assert torch.equal(ex.get_bias(1, p), torch.ones_like(b))
    after = _fused_params(ex)
    assert set(after) == set(params)
    for n, p in after.items():
        assert p is params[n], f"{n} was replaced by a new parameter"
        assert p.data_ptr() == ptrs[n], f"{n} was re-allocated"


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_set_rejects_wrong_shapes_and_unknown_projections(tiny, family):
    ex = describe_model(tiny(family)).blocks[0].experts
    with pytest.raises(ValueError, match="expected shape"):
        ex.set(0, "down", torch.zeros(3, 3))
    with pytest.raises(KeyError):
        ex.get(0, "w1")
    if not ex.has_bias:
        with pytest.raises(KeyError):
            ex.set_bias(0, "down", torch.zeros(64))


# ---- ExpertsView: computing ------------------------------------------------------------------------


@pytest.mark.parametrize("impl", [None, "eager"], ids=["configured", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
def test_forward_expert_equals_the_family_experts_module(tiny, family, impl):
    view = describe_model(tiny(family))
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(4))  # [T, H]
    for block in view.blocks.values():
        ex = block.experts
        for e in range(ex.num_experts):
            with torch.no_grad(), _experts_impl(ex.module, impl):
                expected = _module_single_expert(ex.module, e, x)
                got = ex.forward_expert(e, x)
                by_projection = _reference_expert(ex, e, x)
            assert got.shape == (10, 64)
            assert expected.abs().max() > 1e-4  # not a vacuous all-zeros comparison
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(by_projection, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_intermediate_is_the_input_of_down(tiny, family):
    ex = describe_model(tiny(family)).blocks[1].experts
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a = ex.intermediate(2, x)  # [T, I]
        assert a.shape == (6, ex.intermediate_size)
        torch.testing.assert_close(ex.down(2, a), ex.forward_expert(2, x))
        stacked = ex.stacked("gate")
    assert stacked.shape == (ex.num_experts, ex.intermediate_size, 64)
    assert torch.equal(stacked[2], ex.get(2, "gate"))


@pytest.mark.parametrize("family", FAMILIES)
def test_a_loss_through_forward_expert_gives_the_expert_parameters_a_gradient(tiny, family):
    """Reads keep the autograd graph (``param[e]``, not the detached ``param.data[e]``): training the expert
    weights, or LoRA adapters put in their place, through ``forward_expert`` (the compressed-experts block's
    path) gets a gradient, for expert e's slices only. Writes (``set``) still work on parameters that require
    grad."""
    model = copy.deepcopy(tiny(family))
    ex = describe_model(model).blocks[1].experts
    params = _fused_params(ex)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(6))
    ex.forward_expert(2, x).pow(2).sum().backward()
    assert set(params) >= {"gate_up_proj" if ex.has_gate else "up_proj", "down_proj"}
    for name, p in params.items():
        assert p.grad is not None, f"{name}: no gradient"
        assert p.grad[2].abs().sum() > 0, f"{name}: zero gradient for the expert that computed"
        others = torch.cat([p.grad[:2].flatten(), p.grad[3:].flatten()])
        assert torch.count_nonzero(others) == 0, f"{name}: gradient reached other experts"
    # the same gradient as the expert computed from standalone copies of its weights (reference path)
    down = ex.get(2, "down").detach().clone().requires_grad_(True)
    y = ex.intermediate(2, x).detach() @ down.t()
    if ex.has_bias:
        y = y + ex.get_bias(2, "down").detach()
    y.pow(2).sum().backward()
    got = params["down_proj"].grad[2]
    torch.testing.assert_close(got.t() if ex.is_transposed else got, down.grad)
    ex.set(2, "down", torch.zeros_like(down))  # writes still go in place into a parameter that requires grad
    assert torch.count_nonzero(params["down_proj"][2]) == 0
