"""compressed-tensors export: repacking against the library's own decompressor, per-expert names,
config groups, from_pretrained through transformers' integration, refusals."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
from safetensors import safe_open

import moecompress  # noqa: F401
from moecompress.errors import MoeCompressError
from moecompress.export.compressed_tensors import convert_native_to_compressed_tensors, repack_projection
from moecompress.api.quantize import quantize_job
from moecompress.model.tiny import save_tiny_model
from moecompress.passes.quantize import QuantizeConfig
from moecompress.quant import format as fmt


def _decompress(tensors: dict[str, torch.Tensor], bits: int, group: int, symmetric: bool) -> torch.Tensor:
    """The library's own pack-quantized decompressor -> dense weight [N, K]."""
    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, group_size=group, strategy="group")
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="pack-quantized")
    return PackedQuantizationCompressor.decompress(dict(tensors), scheme)["weight"]


@pytest.mark.parametrize("bits", fmt.SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_repack_equals_our_dequantization(bits, symmetric):
    gen = torch.Generator().manual_seed(bits)
    k, n, g = 64, 48, 32
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)  # [K, N]
    scales = (torch.rand(k // g, n, generator=gen) * 0.1 + 1e-3).to(torch.float16)
    zeros = None if symmetric else torch.randint(0, 2**bits, (k // g, n), generator=gen).to(torch.uint8)
    qweight = fmt.pack(codes, bits)
    ours = fmt.dequantize(qweight, scales, zeros, bits, g)  # [N, K]
    ct = repack_projection(qweight, scales, zeros, bits)
    assert ct["weight_packed"].dtype == torch.int32 and ct["weight_shape"].tolist() == [n, k]
    assert ("weight_zero_point" in ct) == (not symmetric)
    assert torch.equal(_decompress(ct, bits, g, symmetric).float(), ours)
    rows = slice(16, 40)  # a row slice (e.g. the up half of a fused gate_up)
    assert torch.equal(_decompress(repack_projection(qweight, scales, zeros, bits, rows), bits, g, symmetric).float(), ours[rows])


def _native(tmp_path, family, expert_bits=None, symmetric=True, attention_bits=None, bits=4):
    model = tmp_path / f"{family}_model"
    if not model.exists():
        save_tiny_model(family, model)
    out = tmp_path / f"{family}_native_{bits}_{symmetric}_{attention_bits}_{bool(expert_bits)}"
    cfg = QuantizeConfig(bits=bits, group_size=32, method="rtn", symmetric=symmetric, attention_bits=attention_bits, expert_bits=expert_bits)
    quantize_job(model, out, cfg, None, {"source": "none"})
    return model, out


def _tensors(folder) -> dict[str, torch.Tensor]:
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    out = {}
    for shard in sorted(set(index.values())):
        with safe_open(str(folder / shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def _scheme_of(qc: QuantizationConfig, module: str):
    import re

    hits = [s for s in qc.config_groups.values() if any(re.match(t[3:], module) for t in s.targets if t.startswith("re:"))]
    assert len(hits) == 1, (module, hits)
    return hits[0]


@pytest.mark.parametrize("symmetric", [True, False])
def test_mixed_width_export_decompresses_to_our_weights(tmp_path, symmetric):
    widths = {0: [2, 3, 4, 8], 1: [4, 4, 4, 4], 2: [3, 3, 2, 2]}
    _model, native = _native(tmp_path, "qwen3_moe", widths, symmetric)
    out = convert_native_to_compressed_tensors(native, tmp_path / "ct", allow_mixed_layers=True)
    config = json.loads((out / "config.json").read_text())
    qc = QuantizationConfig.model_validate(config["quantization_config"])
    assert qc.format == "pack-quantized" and len(qc.config_groups) == 4
    assert {f"model.layers.{i}.mlp.gate" for i in range(3)} | {"lm_head"} <= set(qc.ignore)
    ours, theirs = _tensors(native), _tensors(out)
    assert not any("w4_gate_up_qweight" in k for k in theirs)
    for layer, row in widths.items():
        path = f"model.layers.{layer}.mlp.experts"
        for bits in set(row):
            ids = ours[f"{path}.w{bits}_expert_ids"].tolist()
            zeros = (lambda p: None) if symmetric else (lambda p: ours[f"{path}.w{bits}_{p}_zeros"])
            gate_up = fmt.dequantize(ours[f"{path}.w{bits}_gate_up_qweight"], ours[f"{path}.w{bits}_gate_up_scales"], zeros("gate_up"), bits, 32)
            down = fmt.dequantize(ours[f"{path}.w{bits}_down_qweight"], ours[f"{path}.w{bits}_down_scales"], zeros("down"), bits, 32)
            for slot, e in enumerate(ids):
                expected = {"gate_proj": gate_up[slot, :64], "up_proj": gate_up[slot, 64:], "down_proj": down[slot]}
                for proj, weight in expected.items():
                    name = f"{path}.{e}.{proj}"
                    scheme = _scheme_of(qc, name)
                    assert scheme.weights.num_bits == bits and scheme.weights.symmetric == symmetric
                    state = {k.rsplit(".", 1)[1]: v for k, v in theirs.items() if k.startswith(name + ".")}
                    got = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
                    assert torch.equal(got.float(), weight), name


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_uniform_export_loads_with_plain_from_pretrained(tmp_path, family):
    from transformers import AutoModelForCausalLM

    _model, native = _native(tmp_path, family, attention_bits=8)
    out = convert_native_to_compressed_tensors(native, tmp_path / "ct")
    names = set(_tensors(out))
    proj = {"qwen3_moe": ("mlp", "gate_proj"), "mixtral": ("block_sparse_moe", "w1")}[family]
    assert f"model.layers.0.{proj[0]}.experts.3.{proj[1]}.weight_packed" in names
    assert "model.layers.0.self_attn.q_proj.weight_packed" in names
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(str(native), dtype=torch.float32).eval()(ids).logits
        ct = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        assert ct.config.quantization_config.quant_method == "compressed-tensors"
        theirs = ct(ids).logits
    assert ours.abs().max() > 0
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_export_refuses_what_vllm_cannot_load(tmp_path):
    _m, mixed = _native(tmp_path, "qwen3_moe", {0: [2, 4, 4, 4], 1: [4] * 4, 2: [4] * 4})
    with pytest.raises(MoeCompressError, match="one width per MoE layer"):
        convert_native_to_compressed_tensors(mixed, tmp_path / "a")
    _m, kept = _native(tmp_path, "qwen3_moe", {0: [16, 4, 4, 4], 1: [4] * 4, 2: [4] * 4}, symmetric=False)
    with pytest.raises(MoeCompressError, match="unquantized"):
        convert_native_to_compressed_tensors(kept, tmp_path / "b")
    with pytest.raises(MoeCompressError, match="not a native moecompress checkpoint"):
        convert_native_to_compressed_tensors(tmp_path / "qwen3_moe_model", tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------------------------------
# Any K: our padding rows are dropped, compressed-tensors packs the true K densely; partial groups refused
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", fmt.SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k, g", [(48, 16), (72, 24), (100, 20)])
def test_repack_odd_k_equals_our_dequantization(bits, symmetric, k, g):
    gen = torch.Generator().manual_seed(bits + k)
    n = 40
    codes = torch.randint(0, 2**bits, (k, n), generator=gen)  # [K, N]
    scales = (torch.rand(k // g, n, generator=gen) * 0.1 + 1e-3).to(torch.float16)
    zeros = None if symmetric else torch.randint(0, 2**bits, (k // g, n), generator=gen).to(torch.uint8)
    qweight = fmt.pack(codes, bits)  # Kp = ceil(K / 32) * 32 rows of codes
    ours = fmt.dequantize(qweight, scales, zeros, bits, g, k=k)  # [N, K]
    ct = repack_projection(qweight, scales, zeros, bits, k=k)
    assert ct["weight_shape"].tolist() == [n, k]  # the true shape, not the padded one
    assert tuple(ct["weight_packed"].shape) == (n, -(-k * bits // 32))  # pack_to_int32's dense packing of K codes
    assert torch.equal(_decompress(ct, bits, g, symmetric).float(), ours)
    rows = slice(8, 30)
    assert torch.equal(_decompress(repack_projection(qweight, scales, zeros, bits, rows, k=k), bits, g, symmetric).float(), ours[rows])


def _odd_native(tmp_path, group_size, name):
    """qwen3_moe with H = I = 48 (attention: q/k/v K = 48, o_proj K = 64), RTN 4-bit, attention 8-bit."""
    model = tmp_path / "odd_model"
    if not model.exists():
        save_tiny_model("qwen3_moe", model, hidden_size=48, moe_intermediate_size=48, intermediate_size=96)
    out = tmp_path / name
    quantize_job(model, out, QuantizeConfig(bits=4, group_size=group_size, method="rtn", attention_bits=8), None, {"source": "none"})
    return out


def test_odd_k_export_loads_with_plain_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    native = _odd_native(tmp_path, 16, "native16")  # 16 divides 48 and 64: whole groups everywhere
    out = convert_native_to_compressed_tensors(native, tmp_path / "ct")
    tensors = _tensors(out)
    assert tensors["model.layers.0.mlp.experts.1.down_proj.weight_shape"].tolist() == [48, 48]
    assert tensors["model.layers.0.self_attn.q_proj.weight_shape"].tolist() == [64, 48]
    from moecompress.export.lint import lint_checkpoint

    report = lint_checkpoint(out)
    assert report.clean_for("vllm") and not {"CT103", "CT106"} & report.rules_hit()  # whole groups, shapes of the true K
    assert report.rules_hit("vllm") <= {"VL303"}  # hidden 48, group 16: loads in vLLM, not on Marlin (a warning)
    ids = torch.randint(3, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = AutoModelForCausalLM.from_pretrained(str(native), dtype=torch.float32).eval()(ids).logits
        theirs = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()(ids).logits
    assert ours.abs().max() > 0
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)


def test_partial_last_group_is_refused_before_anything_is_written(tmp_path):
    native = _odd_native(tmp_path, 32, "native32")  # kpack-v2 takes G = 32 on K = 48 (a partial last group)
    with pytest.raises(MoeCompressError, match=r"does not divide the input dimension 48 \(the compressed-tensors format needs whole groups\); use 16 or 48"):
        convert_native_to_compressed_tensors(native, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()
