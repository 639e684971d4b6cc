"""The export matrix (issue 17): every tiny family x target {native, vllm, hf} x scheme {uniform 4,
uniform 8, mixed per layer, mixed per expert}. Each cell either

(a) is accepted by ``quantize --target`` validation and its export loads and matches the fake-quantized
    model's logits (native: ``from_pretrained`` after ``import moecompress``; hf: plain
    ``AutoModelForCausalLM.from_pretrained`` of the compressed-tensors export; vllm: no vLLM on CPU, so
    ``lint --target vllm`` has no error AND the independent checker of vLLM's loading rules
    (``vllm_rules.py``) finds nothing, and the dense model vLLM computes with -- every module decompressed
    with its own scheme -- matches; where transformers can load the same checkpoint, it matches too), or
(b) is refused by the public ``quantize`` API before any work (no output folder) with one line naming
    the rule.

The fake-quantized model is the source model with every weight the pass quantizes replaced by
``grid.rtn(W, spec).dequantized()`` -- the quantizer's own arithmetic on the dense weights, sharing no
code with packing, export or loading. RTN and tiny models keep the matrix fast; four families run at odd
dimensions (H = 48, I = 40: not multiples of 32) with G = 8 so compressed-tensors' whole groups fit.
``test_matrix_counts`` prints the counts: loads exactly / refused with reason / fails (must be 0).
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tokenizer_util import save_tiny_tokenizer
from transformers import AutoModelForCausalLM
from vllm_rules import dequantize_like_vllm, vllm_problems

import moecompress  # noqa: F401  (registers quant_method "moecompress" for the native cells)
from moecompress.api.quantize import QuantizeJob, QuantizeOptions, quantize, quantize_job
from moecompress.errors import MoeCompressError
from moecompress.export.compressed_tensors import convert_native_to_compressed_tensors
from moecompress.export.lint import lint_checkpoint
from moecompress.model.tiny import TINY_CONFIGS, save_tiny_model
from moecompress.model.view import describe_model
from moecompress.passes.quantize import QuantizeConfig, linears_to_quantize
from moecompress.quant.grid import rtn

FAMILIES = list(TINY_CONFIGS)
ODD = {"qwen2_moe", "qwen3_moe", "deepseek_v3", "glm4_moe"}  # H = 48, I = 40
TARGETS = ("native", "vllm", "hf")
SCHEMES = ("uniform4", "uniform8", "mixed_layer", "mixed_expert")
ATOL = 1e-4  # measured: 0.0 on every loading cell; float32 throughout
RULE = re.compile(r"lint rule (CT|HF|VL)\d{3}|compressed-tensors")
OUTCOMES: dict[str, list[str]] = {"loads exactly": [], "refused with reason": [], "fails": []}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def group_size(family: str) -> int:
    return 8 if family in ODD else 32


def overrides(family: str) -> dict:
    if family not in ODD:
        return {}
    keys = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size")
    return {"hidden_size": 48, **{k: 40 for k in keys if k in TINY_CONFIGS[family]}}


def options(target: str, scheme: str, family: str) -> QuantizeOptions:
    """What a user asks ``quantize`` for this cell (mixed: a budget the allocator meets with 4/8 bits)."""
    common = dict(method="rtn", group_size=group_size(family), target=target, nsamples=2, seqlen=8)
    if scheme.startswith("uniform"):
        return QuantizeOptions(bits=int(scheme[-1]), **common)
    granularity = "layer" if scheme == "mixed_layer" else "expert"
    return QuantizeOptions(bits_budget=6.0, bit_choices="4,8", granularity=granularity, **common)


def expert_bits(scheme: str, moe_layers: list[int], num_experts: int) -> dict[int, list[int]]:
    """The widths the cell's checkpoint holds: layer A 4-bit / layer B 8-bit, or 4/8 alternating by expert."""
    if scheme.startswith("uniform"):
        return {i: [int(scheme[-1])] * num_experts for i in moe_layers}
    if scheme == "mixed_layer":
        return {i: [(4, 8)[n % 2]] * num_experts for n, i in enumerate(moe_layers)}
    return {i: [(4, 8)[e % 2] for e in range(num_experts)] for i in moe_layers}


def load(folder) -> torch.nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


@torch.no_grad()
def logits(model, ids) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def fake_quantized(src: Path, cfg: QuantizeConfig) -> torch.nn.Module:
    """The source model with every weight the pass quantizes replaced by RTN's dequantized weight."""
    model = load(src)
    view = describe_model(model)
    for index, layer in enumerate(model.get_submodule(view.layers_name)):
        block = view.blocks.get(index)
        for module, bits in linears_to_quantize(cfg, layer, block).values():
            module.weight.copy_(rtn(module.weight.float(), cfg.spec(bits)).dequantized())
        if block is None:
            continue
        experts = block.experts
        projections = ("gate", "up", "down") if experts.has_gate else ("up", "down")
        for e, bits in enumerate(cfg.widths_for(index, experts.num_experts)):
            for proj in projections:
                experts.set(e, proj, rtn(experts.get(e, proj).float(), cfg.spec(bits)).dequantized())
    return model


@dataclass
class Built:
    """One (family, scheme): its source and native checkpoint, the fake-quantized logits, and (made on
    first use) its compressed-tensors export, shared by the targets."""

    src: Path
    native: Path
    reference: torch.Tensor
    _compressed: Path | None = None
    export_error: str | None = None

    def compressed(self) -> Path | None:
        if self._compressed is None and self.export_error is None:
            folder = self.native.parent / f"{self.native.name}-ct"
            try:
                self._compressed = convert_native_to_compressed_tensors(self.native, folder, allow_mixed_layers=True)
            except MoeCompressError as exc:
                self.export_error = str(exc)
        return self._compressed


IDS = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))
_SOURCES: dict[str, Path] = {}
_BUILT: dict[tuple[str, str], Built] = {}


def source(family: str, root: Path) -> Path:
    if family not in _SOURCES:
        folder = root / family / "src"
        save_tiny_model(family, folder, **overrides(family))
        save_tiny_tokenizer(folder)  # mixed cells ask for a budget, which profiles on calibration text
        _SOURCES[family] = folder
    return _SOURCES[family]


def build(family: str, scheme: str, root: Path) -> Built:
    key = (family, scheme)
    if key in _BUILT:
        return _BUILT[key]
    src = source(family, root)
    skeleton = describe_model(load(src))
    num_experts = next(iter(skeleton.blocks.values())).num_experts
    # --bits also sets the shared experts' width (4 in the mixed cells, as QuantizeOptions' default)
    bits = int(scheme[-1]) if scheme.startswith("uniform") else 4
    cfg = QuantizeConfig(bits=bits, group_size=group_size(family), method="rtn",
                         expert_bits=expert_bits(scheme, skeleton.moe_layers, num_experts))
    native = root / family / f"{scheme}-native"
    quantize_job(src, native, cfg, None, {"source": "none"})
    _BUILT[key] = Built(src, native, logits(fake_quantized(src, cfg), IDS))
    return _BUILT[key]


def refusal(src: Path, opts: QuantizeOptions, out: Path) -> str | None:
    """The one-line refusal of ``quantize`` before any work, or None when it would run."""
    try:
        QuantizeJob(src, opts).validate()
        return None
    except MoeCompressError as exc:
        message = str(exc)
    # the public entry point refuses the same way and writes nothing
    with pytest.raises(MoeCompressError) as again:
        quantize(src, out, opts)
    assert str(again.value) == message and not out.exists()
    return message


def check_loads(target: str, built: Built, tmp: Path) -> None:
    if target == "native":
        torch.testing.assert_close(logits(load(built.native), IDS), built.reference, rtol=0, atol=ATOL)
        return
    folder = built.compressed()
    assert folder is not None, f"accepted by validation but the export fails: {built.export_error}"
    report = lint_checkpoint(folder, target)
    assert report.clean_for(target), [f.message for f in report.errors]
    if target == "vllm":
        assert vllm_problems(folder) == []
        as_vllm = dequantize_like_vllm(folder, tmp / "as-vllm")
        torch.testing.assert_close(logits(load(as_vllm), IDS), built.reference, rtol=0, atol=ATOL)
        if not lint_checkpoint(folder, "hf").clean_for("hf"):
            return  # transformers cannot load this one (e.g. per-layer widths: HF201); vLLM's numerics above
    torch.testing.assert_close(logits(load(folder), IDS), built.reference, rtol=0, atol=ATOL)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("family", FAMILIES)
def test_cell(family, target, scheme, tmp_path_factory, tmp_path):
    root = tmp_path_factory.getbasetemp() / "matrix"
    cell = f"{family}/{target}/{scheme}"
    try:
        src = source(family, root)
        message = refusal(src, options(target, scheme, family), tmp_path / "out")
        if message is not None:
            assert "\n" not in message and RULE.search(message), message
            OUTCOMES["refused with reason"].append(f"{cell}: {message}")
            return
        check_loads(target, build(family, scheme, root), tmp_path)
        OUTCOMES["loads exactly"].append(cell)
    except BaseException:
        OUTCOMES["fails"].append(cell)
        raise


@pytest.fixture(scope="module")
def shared_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf525") / "qwen2_moe"
    save_tiny_model("qwen2_moe", folder, **overrides("qwen2_moe"))
    return folder


def test_hf_525_attention_and_shared_experts_at_their_own_width_load_exactly(shared_model, tmp_path):
    """transformers 5.25 (installed): experts 4-bit, attention and shared experts 8-bit, one plain load."""
    out = tmp_path / "q"
    opts = QuantizeOptions(bits=4, group_size=8, method="rtn", target="hf", transformers_version="5.25",
                           quantize_attention=True, attention_bits=8, shared_expert_bits=8)
    quantize(shared_model, out, opts)
    assert lint_checkpoint(out, "hf", transformers_version="5.25").findings == []
    assert lint_checkpoint(out, "hf").rules_hit() == {"HF203"}, "5.24 would dequantize them with the experts' scheme"
    cfg = QuantizeConfig(bits=4, group_size=8, method="rtn", attention_bits=8, shared_expert_bits=8)
    expected = logits(fake_quantized(shared_model, cfg), IDS)
    torch.testing.assert_close(logits(load(out), IDS), expected, rtol=0, atol=ATOL)


def test_hf_525_two_dense_widths_are_refused_before_work(shared_model, tmp_path):
    """Attention 8-bit while the shared experts follow --bits 4: two dense schemes, which transformers
    5.25 with dequantize=True decompresses with one (measured wrong); refused knowing the model has them."""
    opts = QuantizeOptions(bits=4, group_size=8, method="rtn", target="hf", transformers_version="5.25",
                           quantize_attention=True, attention_bits=8)
    with pytest.raises(MoeCompressError, match=r"lint rule HF203.*--shared-expert-bits defaults to --bits") as refused:
        quantize(shared_model, tmp_path / "q", opts)
    assert "\n" not in str(refused.value) and not (tmp_path / "q").exists()


def test_matrix_counts(capsys):
    """Runs after the cells (file order): the counts for the closing note; a failed cell fails above."""
    counts = {k: len(v) for k, v in OUTCOMES.items()}
    with capsys.disabled():
        print("\nexport matrix:", json.dumps(counts))
        for line in OUTCOMES["refused with reason"]:
            print("  refused", line)
    ran = sum(counts.values())
    if ran < len(FAMILIES) * len(TARGETS) * len(SCHEMES):
        pytest.skip(f"only {ran} cells ran (a -k selection): no counts to check")
    assert counts["fails"] == 0
    # what must hold whatever the families: native runs everything, hf refuses every mixed export
    assert all(f"{f}/native/{s}" in OUTCOMES["loads exactly"] for f in FAMILIES for s in SCHEMES)
    assert not any(c.split("/")[1:] in (["hf", "mixed_layer"], ["hf", "mixed_expert"], ["vllm", "mixed_expert"])
                   for c in OUTCOMES["loads exactly"])
