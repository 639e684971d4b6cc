"""quant_method "moecompress": quantize -> save -> from_pretrained equals the in-memory quantized model.

For every supported family: the checkpoint written by ``quantize_job`` loads with plain
``AutoModelForCausalLM.from_pretrained``, its experts are :class:`PackedExperts` holding exactly the
packed bytes (never a dense copy), and its logits are bit-identical to the model the layer-by-layer
driver built in memory from the same calibration ids.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import moecompress  # noqa: F401  (registers quant_method "moecompress")
from moecompress.evaluate import model_memory_bytes
from moecompress.api.quantize import quantize_job
from moecompress.model.driver import run_layerwise
from moecompress.model.loading import LayerwiseModel
from moecompress.model.tiny import TINY_CONFIGS, save_tiny_model
from moecompress.model.view import describe_model
from moecompress.passes.quantize import QuantizeConfig, QuantizePass
from moecompress.modules.hf_quantizer import build_packed_module
from moecompress.quant.hf_integration import QUANT_METHOD, MoeCompressConfig
from moecompress.modules.packed import UNQUANTIZED, ExpertsSpec, PackedExperts, PackedLinear

FAMILIES = list(TINY_CONFIGS)
CFG = QuantizeConfig(bits=4, group_size=32)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def calibration_ids(n: int = 4, length: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def quantize_and_reference(tmp_path, family: str, cfg: QuantizeConfig):
    """(source folder, OUT, ids, in-memory logits [n, L, V], the job's pass) for one family and config."""
    src, out = tmp_path / "src", tmp_path / "out"
    save_tiny_model(family, src, seed=0)
    ids = calibration_ids()
    _, job_pass = quantize_job(src, out, cfg, ids, {"source": "random ids"})
    lm = LayerwiseModel(src)
    in_memory = run_layerwise(lm, ids, [QuantizePass(cfg, lm.config, dtype=torch.float32)], compute_logits=True)
    return src, out, ids, torch.cat(in_memory.logits), job_pass


def load(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def packed_experts_of(model: torch.nn.Module) -> dict[str, PackedExperts]:
    return {name: m for name, m in model.named_modules() if isinstance(m, PackedExperts)}


def expected_packed_bytes(spec: ExpertsSpec, dtype_bytes: int = 4) -> int:
    """Bytes of one PackedExperts from the format's shapes (format.py), independent of the module code."""
    h, i = spec.hidden_size, spec.intermediate_size
    n_in = 2 * i if spec.has_gate else i
    total = 0
    for bits in set(spec.bits):
        e_b = spec.bits.count(bits)
        total += e_b * 4  # expert_ids int32
        if bits == UNQUANTIZED:
            total += e_b * (n_in * h + h * i) * dtype_bytes
            continue
        for n, k in ((n_in, h), (h, i)):  # gate_up [2I, H], down [H, I]
            rows, groups = -(-k // 32) * bits, -(-k // spec.group_for(k))  # K padded to 32; ceil(K / G) groups
            total += e_b * rows * n * 4  # qweight int32
            total += e_b * groups * n * 2  # scales float16
            if not spec.symmetric:
                total += e_b * groups * n  # zeros uint8
    if spec.has_bias:
        total += spec.num_experts * (n_in + h) * dtype_bytes
    return total


def expected_linear_bytes(m: PackedLinear) -> int:
    k, n, g = m.in_features, m.out_features, m.group_size
    rows, groups = -(-k // 32) * m.bits, -(-k // g)  # K padded to 32; ceil(K / G) groups
    zeros = 0 if m.symmetric else groups * n
    bias = 0 if m.bias is None else n * m.bias.element_size()
    return rows * n * 4 + groups * n * 2 + zeros + bias


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_checkpoint_loads_packed_and_equals_the_in_memory_model(tmp_path, family):
    src, out, ids, in_memory_logits, job_pass = quantize_and_reference(tmp_path, family, CFG)
    model = load(out)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, in_memory_logits)

    dense = load(src)
    dense_view = describe_model(dense)
    expert_paths = {f"{dense_view.layers_name}.{i}.{b.experts_name}" for i, b in dense_view.blocks.items()}
    shared_paths = {
        f"{dense_view.layers_name}.{i}.{b.block_name}.{b.shared_name}.{name}"
        for i, b in dense_view.blocks.items() if b.shared is not None
        for name, m in b.shared.named_modules() if isinstance(m, torch.nn.Linear)
    }
    assert set(job_pass.modules) == expert_paths | shared_paths  # attention stays dense by default
    packed = packed_experts_of(model)
    assert set(packed) == expert_paths
    assert all(not list(m.parameters()) for m in packed.values()), "packed experts hold buffers only"
    assert all(isinstance(model.get_submodule(p), PackedLinear) for p in shared_paths)

    # Memory: each packed module replaces its dense twin byte for byte; nothing else changes.
    dense_bytes = replaced_bytes = 0
    for path in job_pass.modules:
        dense_bytes += sum(p.numel() * p.element_size() for p in dense.get_submodule(path).parameters())
        module = model.get_submodule(path)
        buffer_bytes = sum(b.numel() * b.element_size() for b in module.buffers())
        if isinstance(module, PackedExperts):
            assert buffer_bytes == module.packed_nbytes() == expected_packed_bytes(module.spec)
        else:
            assert buffer_bytes == expected_linear_bytes(module)
        replaced_bytes += buffer_bytes
    assert model_memory_bytes(model) == model_memory_bytes(dense) - dense_bytes + replaced_bytes
    assert replaced_bytes < 0.2 * dense_bytes  # 4-bit codes + one fp16 scale per 32 weights vs fp32

    generated = model.generate(ids[:1, :6], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, 10)
    assert torch.equal(generated[:, :6], ids[:1, :6])


def test_mixed_widths_per_expert_load_and_match_with_a_kept_expert_dense(tmp_path):
    widths = [4, 3, 2, UNQUANTIZED]
    cfg = QuantizeConfig(bits=4, group_size=32, expert_bits={i: widths for i in range(3)})
    src, out, ids, in_memory_logits, job_pass = quantize_and_reference(tmp_path, "qwen3_moe", cfg)
    model = load(out)
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(logits, in_memory_logits)

    dense_view = describe_model(load(src))
    packed = packed_experts_of(model)
    assert len(packed) == 3
    for i, block in dense_view.blocks.items():
        module = packed[f"{dense_view.layers_name}.{i}.{block.experts_name}"]
        assert isinstance(module, PackedExperts) and list(module.spec.bits) == widths
        for bits in (2, 3, 4):
            assert getattr(module, f"w{bits}_expert_ids").tolist() == [widths.index(bits)]
            assert getattr(module, f"w{bits}_gate_up_qweight").dtype == torch.int32
        # The kept expert is stored dense and bit-identical to the source (gate rows, then up rows).
        source = block.experts
        kept = widths.index(UNQUANTIZED)
        assert getattr(module, f"w{UNQUANTIZED}_expert_ids").tolist() == [kept]
        gate_up = torch.cat([source.get(kept, "gate"), source.get(kept, "up")])
        assert torch.equal(getattr(module, f"w{UNQUANTIZED}_gate_up")[0], gate_up)
        assert torch.equal(getattr(module, f"w{UNQUANTIZED}_down")[0], source.get(kept, "down"))
        assert module.packed_nbytes() == expected_packed_bytes(module.spec)
    kept_rows = [r for r in job_pass.report.experts if r.expert == widths.index(UNQUANTIZED)]
    assert [r.method for r in kept_rows] == ["kept"] * 3
    assert [r.bits for r in job_pass.report.experts if r.layer == 0] == widths


def test_quantization_config_is_written_and_reads_back(tmp_path):
    src = tmp_path / "src"
    save_tiny_model("qwen2_moe", src)
    out = tmp_path / "out"
    cfg = QuantizeConfig(bits=4, group_size=32, attention_bits=8)
    quantize_job(src, out, cfg, calibration_ids(), {"source": "random ids", "nsamples": 4})
    written = json.loads((out / "config.json").read_text())["quantization_config"]
    assert written["quant_method"] == QUANT_METHOD
    assert written["group_size"] == 32 and written["symmetric"] is True
    assert written["provenance"]["method"] == "gptq" and written["provenance"]["calibration"]["nsamples"] == 4
    experts = {k: v for k, v in written["modules"].items() if v["type"] == "experts"}
    linears = {k: v for k, v in written["modules"].items() if v["type"] == "linear"}
    assert sorted(experts) == [f"model.layers.{i}.mlp.experts" for i in range(3)]
    assert all(v["bits"] == [4, 4, 4, 4] for v in experts.values())
    assert {v["bits"] for k, v in linears.items() if ".self_attn." in k} == {8}
    assert {v["bits"] for k, v in linears.items() if ".shared_expert." in k} == {4}
    assert not any(k.endswith(("gate", "shared_expert_gate")) for k in written["modules"]), "routers stay dense"

    restored = MoeCompressConfig.from_dict(written)
    assert restored.to_dict() == written
    assert restored.expert_bits() == {k: v["bits"] for k, v in experts.items()}
    model = load(out)
    assert all(isinstance(model.get_submodule(k), PackedLinear) for k in linears)


def test_build_packed_module_from_descriptions():
    spec = ExpertsSpec(num_experts=2, hidden_size=64, intermediate_size=32, bits=(4, 8), group_size=32, symmetric=False)
    experts = build_packed_module({"type": "experts", **spec.as_json()}, torch.float32)
    assert isinstance(experts, PackedExperts) and experts.spec == spec
    assert ExpertsSpec.from_json(spec.as_json()) == spec
    linear = build_packed_module(
        {"type": "linear", "in_features": 64, "out_features": 16, "bits": 3, "group_size": 32, "symmetric": True, "bias": True},
        torch.float32,
    )
    assert isinstance(linear, PackedLinear) and linear.qweight.shape == (64 * 3 // 32, 16) and linear.bias.shape == (16,)
    with pytest.raises(ValueError, match="unknown packed module type"):
        build_packed_module({"type": "conv"}, torch.float32)
