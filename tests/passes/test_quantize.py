"""The quantize pass: calibration tokens per expert, AGQ weights, fallbacks, what stays full precision.

Runs on tiny models (moecompress.model.tiny) through the real driver and job; nothing downloaded.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moecompress  # noqa: F401  (registers quant_method "moecompress")
from moecompress.errors import MoeCompressError
from moecompress.api.quantize import quantize_job
from moecompress.model.driver import run_layerwise
from moecompress.model.loading import LayerwiseModel
from moecompress.model.tiny import build_tiny_model, save_tiny_model
from moecompress.model.view import describe_model
from moecompress.passes.quantize import (
    LinearInputHessians,
    QuantizeConfig,
    QuantizePass,
    _ExpertInputs,
    expert_method,
    expert_tokens,
)
from moecompress.quant.gptq import accumulate_hessian, make_empty_hessian
from moecompress.modules.packed import PackedExperts, PackedLinear


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def random_ids(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def load(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def checkpoint_tensors(folder) -> dict[str, torch.Tensor]:
    state = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    return state


# --------------------------------------------------------------------------------------------------
# Plain functions: which tokens feed an expert, with which weight; which method it gets
# --------------------------------------------------------------------------------------------------


def _store() -> _ExpertInputs:
    """4 tokens, E=3, k=2: expert 0 gets tokens 0, 1; expert 1 tokens 0, 2, 3; expert 2 tokens 1, 2, 3."""
    store = _ExpertInputs()
    store.x.append(torch.arange(8, dtype=torch.float32).reshape(4, 2))  # [T=4, H=2]
    store.index.append(torch.tensor([[0, 1], [0, 2], [1, 2], [2, 1]]))  # [T, k]
    store.weights.append(torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.9, 0.1], [0.8, 0.2]]))
    store.probs.append(torch.tensor([[0.5, 0.2, 0.3], [0.4, 0.1, 0.5], [0.05, 0.6, 0.35], [0.1, 0.2, 0.7]]))
    return store


def test_expert_tokens_routed_only_use_the_applied_routing_weights():
    x, c, routed = expert_tokens(_store(), 2, all_tokens=False, agq=True)
    assert routed == 3
    assert torch.equal(x, torch.tensor([[2.0, 3.0], [4.0, 5.0], [6.0, 7.0]]))
    assert torch.allclose(c, torch.tensor([0.4, 0.1, 0.8]))
    _, c_plain, _ = expert_tokens(_store(), 2, all_tokens=False, agq=False)
    assert torch.equal(c_plain, torch.ones(3))


def test_expert_tokens_calibrate_all_weights_unrouted_tokens_by_router_probability():
    x, c, routed = expert_tokens(_store(), 0, all_tokens=True, agq=True)
    assert routed == 2 and x.shape == (4, 2)
    assert torch.allclose(c, torch.tensor([0.7, 0.6, 0.05, 0.1]))  # routed: applied weight; others: p[:, e]
    _, c_plain, _ = expert_tokens(_store(), 0, all_tokens=True, agq=False)
    assert torch.equal(c_plain, torch.ones(4))


def test_linears_fed_the_same_tensor_share_one_hessian_built_as_the_batches_pass():
    """q, k and v take the same normed hidden states: one Hessian for the three, equal to the Hessian
    of all their inputs; o_proj gets its own. The inputs themselves are not kept."""
    g = torch.Generator().manual_seed(0)
    acc = LinearInputHessians(torch.device("cpu"))
    hooks = {name: acc.hook(name, 8) for name in ("q", "k", "v", "o")}
    shared, own = [torch.randn(3, 700, 8, generator=g) for _ in range(2)], [torch.randn(3, 700, 8, generator=g) for _ in range(2)]
    for x, y in zip(shared, own):
        for name in ("q", "k", "v"):
            hooks[name](None, (x,))
        hooks["o"](None, (y,))
    acc.check(2)
    assert acc.by_name["q"] is acc.by_name["k"] is acc.by_name["v"] is not acc.by_name["o"]
    for name, inputs in (("q", shared), ("o", own)):
        expected, n = accumulate_hessian(make_empty_hessian(8), torch.cat([x.reshape(-1, 8) for x in inputs]), 0)
        got = acc.by_name[name]
        assert got.tokens == n == 4200 and got.batches == 2
        assert torch.allclose(got.h, expected, rtol=1e-5, atol=1e-6)


def test_a_linear_that_missed_a_batch_is_an_error_not_a_wrong_hessian():
    acc = LinearInputHessians(torch.device("cpu"))
    hook = acc.hook("q", 4)
    hook(None, (torch.randn(5, 4),))
    with pytest.raises(MoeCompressError, match="saw 1 of 2 calibration batches"):
        acc.check(2)


def test_expert_method_falls_back_below_the_token_threshold():
    gptq = QuantizeConfig(min_tokens_fraction=0.01, damp=0.02)
    assert expert_method(gptq, routed=10, total_tokens=1000) == ("gptq", 0.02)
    assert expert_method(gptq, routed=9, total_tokens=1000) == ("fallback:rtn", 0.02)
    assert expert_method(gptq, routed=0, total_tokens=0) == ("fallback:rtn", 0.02)
    damped = QuantizeConfig(min_tokens_fraction=0.01, damp=0.02, fallback="damped-gptq")
    assert expert_method(damped, routed=0, total_tokens=1000) == ("fallback:damped-gptq", pytest.approx(0.2))
    # damped GPTQ needs the calibrate-all Hessian: without it there is nothing to solve on.
    no_cae = QuantizeConfig(min_tokens_fraction=0.01, fallback="damped-gptq", calibrate_all_experts=False)
    assert expert_method(no_cae, routed=0, total_tokens=1000)[0] == "fallback:rtn"
    assert expert_method(QuantizeConfig(method="rtn"), routed=0, total_tokens=1000)[0] == "rtn"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, "bits must be one of"),
        ({"method": "awq"}, "unknown method"),
        ({"fallback": "skip"}, "unknown fallback"),
        ({"attention_bits": 6}, "bits must be one of"),
        ({"group_size": 0}, "group_size"),
    ],
)
def test_config_validation_is_one_clear_error(kwargs, message):
    with pytest.raises(MoeCompressError, match=message):
        QuantizeConfig(**kwargs).validate()


def test_widths_for_requires_every_moe_layer():
    cfg = QuantizeConfig(expert_bits={0: [4, 3]})
    assert cfg.widths_for(0, 2) == [4, 3]
    assert QuantizeConfig(bits=3).widths_for(7, 2) == [3, 3]
    with pytest.raises(MoeCompressError, match="layer 1"):
        cfg.widths_for(1, 2)


# --------------------------------------------------------------------------------------------------
# Starved experts
# --------------------------------------------------------------------------------------------------

STARVED = 1  # the expert that never receives a token


def save_with_starved_expert(folder, family: str) -> None:
    """A tiny model whose router can never select expert STARVED (every MoE layer)."""
    model = build_tiny_model(family, seed=0)
    for block in describe_model(model).blocks.values():
        with torch.no_grad():
            if block.router.e_score_correction_bias is not None:  # sigmoid routers: the selection bias
                block.router.e_score_correction_bias[STARVED] = -1e4
            else:  # softmax routers with a bias (gpt-oss)
                block.router.bias[STARVED] = -1e4
    model.save_pretrained(str(folder))


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_an_expert_without_tokens_is_quantized_finite_and_named_as_fallback(tmp_path, family):
    src = tmp_path / "src"
    save_with_starved_expert(src, family)
    ids = random_ids()
    for cfg, method in (
        (QuantizeConfig(bits=4, group_size=32, calibrate_all_experts=False), "fallback:rtn"),
        (QuantizeConfig(bits=4, group_size=32, fallback="damped-gptq"), "fallback:damped-gptq"),
    ):
        out = tmp_path / f"out_{method.split(':')[1]}"
        _, qpass = quantize_job(src, out, cfg, ids, {"source": "random ids"})
        starved = [r for r in qpass.report.experts if r.expert == STARVED]
        assert starved and all(r.tokens == 0 for r in starved)
        assert all(r.method == method for r in starved)
        assert {(r.layer, r.expert) for r in qpass.report.fallbacks()} >= {(r.layer, r.expert) for r in starved}
        for layer in {r.layer for r in starved}:  # every routing decision went to the other experts
            assert sum(r.tokens for r in qpass.report.experts if r.layer == layer) == ids.numel() * 2
        assert all(torch.isfinite(torch.tensor(r.rel_error)) for r in qpass.report.experts)

        model = load(out)
        for name, module in model.named_modules():
            if isinstance(module, PackedExperts):
                for bits_group in module.packed_groups():
                    slot = bits_group.expert_ids.tolist().index(STARVED)
                    for proj in (bits_group.gate_up, bits_group.down):
                        scales = proj.scales[slot].float()
                        assert torch.isfinite(scales).all() and (scales > 0).all(), name
                        dense = proj.dequantize(bits_group.bits, bits_group.group_size)[slot]
                        assert torch.isfinite(dense).all() and dense.abs().sum() > 0, name
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=ids, use_cache=False).logits).all()


# --------------------------------------------------------------------------------------------------
# What is quantized and what is not
# --------------------------------------------------------------------------------------------------


def test_routers_shared_gate_norms_embeddings_and_head_stay_bit_identical(tmp_path):
    src = tmp_path / "src"
    save_tiny_model("qwen2_moe", src, seed=0)
    before = checkpoint_tensors(src)
    out = tmp_path / "out"
    quantize_job(src, out, QuantizeConfig(bits=4, group_size=32, attention_bits=8), random_ids(), {"source": "random ids"})
    after = checkpoint_tensors(out)
    kept = [k for k in before if k.endswith(("mlp.gate.weight", "shared_expert_gate.weight", "norm.weight"))]
    kept += ["model.embed_tokens.weight", "lm_head.weight"]
    assert len([k for k in kept if "shared_expert_gate" in k]) == 3
    for key in kept:
        assert torch.equal(after[key], before[key]), key
    model = load(out)
    for i in range(3):
        mlp = model.model.layers[i].mlp
        assert type(mlp.gate).__name__ == "Qwen2MoeTopKRouter"  # not a packed module
        assert isinstance(mlp.shared_expert_gate, torch.nn.Linear)
        assert all(isinstance(getattr(mlp.shared_expert, p), PackedLinear) and getattr(mlp.shared_expert, p).bits == 4
                   for p in ("gate_proj", "up_proj", "down_proj"))
        attn = model.model.layers[i].self_attn
        assert all(isinstance(getattr(attn, p), PackedLinear) and getattr(attn, p).bits == 8
                   for p in ("q_proj", "k_proj", "v_proj", "o_proj"))


def test_attention_stays_dense_without_attention_bits_and_shared_experts_can_be_kept(tmp_path):
    src = tmp_path / "src"
    save_tiny_model("qwen2_moe", src, seed=0)
    before = checkpoint_tensors(src)
    out = tmp_path / "out"
    cfg = QuantizeConfig(bits=4, group_size=32, shared_expert_bits=16)
    _, qpass = quantize_job(src, out, cfg, random_ids(), {"source": "random ids"})
    assert all(m["type"] == "experts" for m in qpass.modules.values())
    after = checkpoint_tensors(out)
    dense = [k for k in before if ".self_attn." in k or ".shared_expert." in k]
    assert len(dense) > 20
    for key in dense:
        assert torch.equal(after[key], before[key]), key


def _logits_error(folder, reference: torch.Tensor, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = load(folder)(input_ids=ids, use_cache=False).logits
    return float((logits - reference).norm() / reference.norm())


def test_gptq_beats_rtn_at_3_bits(tmp_path):
    """On the calibration tokens, which GPTQ minimises over (a random model has no held-out structure)."""
    src = tmp_path / "src"
    fp = save_tiny_model("qwen3_moe", src, seed=0)
    calib = random_ids(8, 32, seed=0)
    with torch.no_grad():
        reference = fp(input_ids=calib, use_cache=False).logits
    errors, reports = {}, {}
    for method in ("rtn", "gptq"):
        out = tmp_path / method
        _, qpass = quantize_job(src, out, QuantizeConfig(bits=3, group_size=32, method=method), calib, {"source": "random ids"})
        reports[method] = qpass.report.experts
        errors[method] = _logits_error(out, reference, calib)
    # Per expert: relative output error of gate_up and down on the expert's Hessian tokens.
    assert [(r.layer, r.expert) for r in reports["rtn"]] == [(r.layer, r.expert) for r in reports["gptq"]]
    gptq_err = torch.tensor([r.rel_error for r in reports["gptq"]])
    rtn_err = torch.tensor([r.rel_error for r in reports["rtn"]])
    assert (gptq_err < rtn_err).all(), (gptq_err, rtn_err)
    assert gptq_err.mean() < 0.9 * rtn_err.mean()  # ~0.18 vs ~0.20 on this random model
    # End to end: final logits against the full-precision model.
    assert errors["gptq"] < errors["rtn"], errors


def test_rtn_needs_no_calibration_and_is_deterministic(tmp_path):
    src = tmp_path / "src"
    save_tiny_model("mixtral", src, seed=0)
    cfg = QuantizeConfig(bits=4, group_size=32, method="rtn")
    first, _ = quantize_job(src, tmp_path / "a", cfg, None, {"source": "none"})
    second, qpass = quantize_job(src, tmp_path / "b", cfg, None, {"source": "none"})
    a, b = checkpoint_tensors(first.out), checkpoint_tensors(second.out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {r.method for r in qpass.report.experts} == {"rtn"}
    with pytest.raises(MoeCompressError, match="calibration"):
        quantize_job(src, tmp_path / "c", QuantizeConfig(bits=4, group_size=32), None, {})
    assert not (tmp_path / "c").exists()


def test_group_size_must_fit_the_expert_dimensions(tmp_path):
    """G = 48 on H = I = 64 is fine (a partial last group, kpack-v2); G = 128 is longer than a row: refused
    up front, with sizes that suit every dimension; with whole groups (a compressed-tensors export) 48 is refused."""
    from moecompress.model.loading import LayerwiseModel
    from moecompress.passes.quantize import check_group_size_fits

    src = tmp_path / "src"
    save_tiny_model("mixtral", src, seed=0)  # H = I = 64
    with pytest.raises(MoeCompressError, match=r"group size 128 is longer than the input dimension 64 .*use 16, 32 or 64"):
        quantize_job(src, tmp_path / "out", QuantizeConfig(bits=4, group_size=128, method="rtn"), None, {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"], "no OUT and no staging folder"
    lm = LayerwiseModel(src)
    check_group_size_fits(QuantizeConfig(bits=4, group_size=48, method="rtn"), lm.layers, lm.view.blocks)
    with pytest.raises(MoeCompressError, match=r"group size 48 does not divide the input dimension 64 .*\(layer 0 experts\)"):
        check_group_size_fits(QuantizeConfig(bits=4, group_size=48, method="rtn"), lm.layers, lm.view.blocks, whole_groups=True)


def test_per_channel_quantization_when_hidden_and_intermediate_sizes_differ(tmp_path):
    """group_size -1 (per-channel) is offered by every group-size error; the deepseek_v3 tiny model has H=64, I=32.

    Either it works (the loaded model equals the in-memory one) or it is refused up front with an
    error that says per-channel is the problem, leaving nothing behind.
    """
    src = tmp_path / "src"
    save_tiny_model("deepseek_v3", src, seed=0)
    ids = random_ids()
    cfg = QuantizeConfig(bits=4, group_size=-1)
    try:
        result, _ = quantize_job(src, tmp_path / "out", cfg, ids, {"source": "random ids"})
    except MoeCompressError as exc:
        assert "per-channel" in str(exc) or "-1" in str(exc), f"misleading error for per-channel: {exc}"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
        return
    lm = LayerwiseModel(src)
    in_memory = run_layerwise(lm, ids, [QuantizePass(cfg, lm.config, dtype=torch.float32)], compute_logits=True)
    with torch.no_grad():
        logits = load(result.out)(input_ids=ids, use_cache=False).logits
    assert torch.equal(logits, torch.cat(in_memory.logits))


# --------------------------------------------------------------------------------------------------
# Batched expert solving equals the per-expert reference (checkpoint bytes)
# --------------------------------------------------------------------------------------------------


class _CompareWithReference:
    """Runs the (batched) QuantizePass and, on a copy of each MoE layer's experts taken before it, the
    per-expert reference; records every packed tensor that differs."""

    def __init__(self, cfg: QuantizeConfig, model_config):
        self.qpass = QuantizePass(cfg, model_config)
        self.compared: list[tuple[int, int]] = []
        self.mismatches: list[str] = []

    def attach(self, ctx):
        return self.qpass.attach(ctx)

    def process(self, ctx) -> bool:
        if ctx.block is None:
            return self.qpass.process(ctx)
        import copy

        from moecompress.model.view import ExpertsView
        from moecompress.passes.quantize import quantize_expert_reference
        from moecompress.modules.packed import UNQUANTIZED

        cfg, store = self.qpass.cfg, self.qpass._experts_store
        experts = ExpertsView(copy.deepcopy(ctx.block.experts.module))
        widths = cfg.widths_for(ctx.index, experts.num_experts)
        total = sum(x.shape[0] for x in store.x)
        refs = {e: quantize_expert_reference(experts, e, store, cfg, widths[e], total)
                for e in range(experts.num_experts) if widths[e] != UNQUANTIZED}
        changed = self.qpass.process(ctx)
        packed = ctx.layer.get_submodule(ctx.block.experts_name)
        records = {r.expert: r for r in self.qpass.report.experts if r.layer == ctx.index}
        for e, (q_gu, q_down, method) in refs.items():
            bits = widths[e]
            slot = [i for i in range(e) if widths[i] == bits].__len__()
            if records[e].method != method:
                self.mismatches.append(f"layer {ctx.index} expert {e}: method {records[e].method} != {method}")
            for proj, result in (("gate_up", q_gu), ("down", q_down)):
                ref = result.packed()
                for part in ("qweight", "scales", "zeros"):
                    want = getattr(ref, part)
                    if want is None:
                        continue
                    got = getattr(packed, f"w{bits}_{proj}_{part}")[slot]
                    if not torch.equal(got, want):
                        self.mismatches.append(f"layer {ctx.index} expert {e} {proj} {part}")
            self.compared.append((ctx.index, e))
        return changed


@pytest.mark.parametrize(
    "family,starved,cfg",
    [
        ("qwen3_moe", False, QuantizeConfig(bits=4, group_size=32)),  # calibrate-all + AGQ (the default)
        ("qwen3_moe", False, QuantizeConfig(bits=3, group_size=32, calibrate_all_experts=False, agq=False)),
        ("mixtral", False, QuantizeConfig(bits=4, group_size=48, symmetric=False, clip_search=True, act_order=True, solve_memory_mb=1)),
        ("gpt_oss", True, QuantizeConfig(bits=4, group_size=32, calibrate_all_experts=False)),
        ("deepseek_v3", True, QuantizeConfig(bits=4, group_size=-1, fallback="damped-gptq", solve_memory_mb=1)),
        ("deepseek_v3", True, QuantizeConfig(bits=4, group_size=32, expert_bits={1: [2, 3, 4, 8, 16, 4, 3, 4], 2: [4, 16, 8, 3, 4, 4, 2, 4]})),
    ],
)
def test_batched_pass_writes_the_per_expert_reference_bytes(tmp_path, family, starved, cfg):
    """Every expert's packed codes, scales and zeros and its method equal the per-expert reference's,
    for every option the batching must respect: calibrate-all or routed tokens, AGQ or not, a starved
    expert (RTN and damped-GPTQ fallbacks), act_order, asymmetric with clip search, partial groups
    (G = 48 on 64), per-channel, mixed widths with a kept expert, chunks of a few experts (1 MiB)."""
    src = tmp_path / "src"
    if starved:
        save_with_starved_expert(src, family)
    else:
        save_tiny_model(family, src, seed=0)
    lm = LayerwiseModel(src)
    compare = _CompareWithReference(cfg, lm.config)
    run_layerwise(lm, random_ids(4, 32, seed=1), [compare], batch_size=2)
    assert compare.compared, "no MoE layer was compared"
    assert not compare.mismatches, compare.mismatches[:10]
    if starved:
        assert STARVED in {r.expert for r in compare.qpass.report.fallbacks()}
    phases = compare.qpass.report.phase_seconds()
    assert {"load", "forward", "hessian", "solve", "pack"} <= set(phases) and all(v >= 0 for v in phases.values())


def test_the_solver_device_is_the_cpu_without_cuda_and_named_devices_must_exist():
    from moecompress.passes.quantize import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(None) == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(MoeCompressError, match="not a torch device"):
        QuantizeConfig(device="tpu:x").validate()
    if not torch.cuda.is_available():
        with pytest.raises(MoeCompressError, match="no CUDA device"):
            QuantizeConfig(device="cuda").validate()
    with pytest.raises(MoeCompressError, match="--solve-memory-mb"):
        QuantizeConfig(solve_memory_mb=0).validate()


class _FullObservationOfSharedExpert:
    """Reference: the shared expert's linears' Hessians from a full forward (no observation_end)."""

    def __init__(self):
        self.hessians = None
        self.by_layer: dict[int, dict[str, torch.Tensor]] = {}

    def attach(self, ctx):
        self.hessians = LinearInputHessians(torch.device("cpu"))
        if ctx.block is None or ctx.block.shared is None:
            return []
        prefix = f"{ctx.block.block_name}.{ctx.block.shared_name}."
        return [m.register_forward_pre_hook(self.hessians.hook(n, m.in_features))
                for n, m in ctx.layer.named_modules() if n.startswith(prefix) and isinstance(m, torch.nn.Linear)]

    def process(self, ctx) -> bool:
        self.by_layer[ctx.index] = {n: acc.h.clone() for n, acc in self.hessians.by_name.items()}
        return False


@pytest.mark.parametrize("family", ["deepseek_v3", "qwen2_moe", "glm4_moe"])
def test_shared_expert_hessians_from_the_recorded_expert_inputs_equal_a_full_observation(tmp_path, family):
    """The shared expert (called after the routed ones in DeepSeek and GLM4) is observed in process,
    from the routed experts' recorded inputs, so the observation can stop before the routed experts."""
    folder = tmp_path / family
    save_tiny_model(family, folder)
    lm = LayerwiseModel(folder)
    qpass = QuantizePass(QuantizeConfig(bits=4, group_size=32), lm.config)
    block = next(iter(lm.view.blocks.values()))
    assert block.shared is not None
    seen: dict[tuple[int, str], torch.Tensor] = {}
    quantize_linear = qpass._quantize_linear

    def spy(ctx, name, module, bits, prefix):
        seen[ctx.index, name] = qpass._linear_inputs.by_name[name].h.clone()
        return quantize_linear(ctx, name, module, bits, prefix)

    qpass._quantize_linear = spy
    reference = _FullObservationOfSharedExpert()
    run_layerwise(lm, random_ids(), [reference, qpass], batch_size=2)
    compared = 0
    for layer, hessians in reference.by_layer.items():
        for name, h in hessians.items():
            assert torch.allclose(seen[layer, name], h, rtol=1e-5, atol=1e-6), (layer, name)
            compared += 1
    assert compared >= 2 * len(lm.view.blocks)  # gate/up (one shared Hessian) and down per MoE layer


def test_the_observation_stops_at_the_routed_experts_even_with_the_shared_expert_quantized(tmp_path):
    from moecompress.model.driver import LayerContext, observation_stop

    folder = tmp_path / "ds"
    save_tiny_model("deepseek_v3", folder)
    lm = LayerwiseModel(folder)
    index, block = next(iter(lm.view.blocks.items()))
    qpass = QuantizePass(QuantizeConfig(bits=4, group_size=32), lm.config)
    ctx = LayerContext(index, lm.layers[index], block, [], [], model=lm)
    assert any(block.shared_name in name for name in qpass._linears_to_quantize(ctx))
    assert observation_stop([qpass], ctx) is block.experts.module
