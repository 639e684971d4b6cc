"""Compressed-experts block: identity at ces = 1 / n_ce = 0, the formula, fitting, save -> load (dense and quantized).

Shape legend: T tokens, E experts, H hidden size, I expert intermediate size, k top-k.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import moecompress  # noqa: F401  (registers the quantizer)
from moecompress.errors import MoeCompressError
from moecompress.api.quantize import quantize_job
from moecompress.model.tiny import TINY_CONFIGS, build_tiny_model, save_tiny_model
from moecompress.model.view import describe_model
from moecompress.modules.compressed_experts import (
    CompressedExpertsBlock,
    aux_scaling,
    expert_output,
    expert_source,
    intermediate_scale,
    wrap_block,
    wrap_model,
)
from moecompress.api.compress_experts import compress_experts_job
from moecompress.passes.compressed_experts import CompressExpertsConfig
from moecompress.algorithms.dynamic_skip import sort_by_weight
from moecompress.passes.quantize import QuantizeConfig
from moecompress.modules.packed import PackedExperts

FAMILIES = list(TINY_CONFIGS)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The CI machine is shared: one intra-op thread avoids OpenMP spin contention on tiny ops."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _ids(n: int = 2, length: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


# -- identity and formula ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ones_and_no_compressed_experts_equal_original(family):
    model = build_tiny_model(family, seed=0)
    ids = _ids()
    ref = _logits(model, ids)
    wrapped = copy.deepcopy(model)
    blocks = wrap_model(wrapped, n_ce=0)
    assert blocks and all(isinstance(b, CompressedExpertsBlock) for b in blocks.values())
    torch.testing.assert_close(_logits(wrapped, ids), ref, rtol=1e-5, atol=1e-5)
    # Checkpoint names are unchanged apart from the added `ces`.
    before = set(model.state_dict())
    after = set(wrapped.state_dict())
    assert after - before == {f"{p}.ces" for p in blocks} and before <= after


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "deepseek_v3"])
def test_one_compressed_expert_at_ones_is_top1_with_original_weight(family):
    """n_ce = 1 of k = 2 with ces = 1: only the top expert is computed, with its original routing weight."""
    model = build_tiny_model(family, seed=0)
    view = describe_model(model)
    block_view = view.blocks[max(view.blocks)]
    x = torch.randn(7, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, w, idx = block_view.router.route(x)
        w_s, i_s = sort_by_weight(w, idx)
        expected = block_view.experts.module(x, i_s[:, :1], w_s[:, :1])
        if block_view.shared is not None:
            shared = block_view.shared(x)
            if block_view.shared_gate is not None:
                shared = torch.sigmoid(block_view.shared_gate(x)) * shared
            expected = expected + shared
        ce = wrap_block(block_view, n_ce=1)
        out = ce(x[None])
        out = out[0] if isinstance(out, tuple) else out  # GPT-OSS returns (hidden, router scores)
        original = block_view.block(x[None])
        original = original[0] if isinstance(original, tuple) else original
    torch.testing.assert_close(out[0], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, original, atol=1e-6)  # the second expert really is gone


def test_aux_scaling_is_weight_normalised_mix_of_ces():
    gen = torch.Generator().manual_seed(0)
    ces = torch.rand(5, 3, 8, generator=gen)  # [E, 3, H]
    w = torch.tensor([[0.2, 0.1], [0.0, 0.0]])  # second token: zero weights -> uniform mix
    idx = torch.tensor([[1, 4], [0, 2]])
    e_bar = aux_scaling(w, idx, ces)  # [T, 3, H]
    torch.testing.assert_close(e_bar[0], (2 / 3) * ces[1] + (1 / 3) * ces[4])
    torch.testing.assert_close(e_bar[1], 0.5 * ces[0] + 0.5 * ces[2])


def test_intermediate_scale_slices_or_pads_with_ones():
    e2 = torch.arange(1.0, 5.0)[None]  # [1, H=4]
    assert intermediate_scale(e2, 3).tolist() == [[1.0, 2.0, 3.0]]
    assert intermediate_scale(e2, 6).tolist() == [[1.0, 2.0, 3.0, 4.0, 1.0, 1.0]]


def test_main_expert_formula_dense():
    """y = down(act(gate(x * e1)) * up(x * e3) * e2[:I]) for a qwen3_moe expert (silu, I = H)."""
    model = build_tiny_model("qwen3_moe", seed=0)
    experts = describe_model(model).blocks[0].experts
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, experts.hidden_size, generator=gen)
    e_bar = 0.5 + torch.rand(4, 3, experts.hidden_size, generator=gen)
    g, u, d = experts.get(2, "gate"), experts.get(2, "up"), experts.get(2, "down")
    i = experts.intermediate_size
    expected = (F.silu((x * e_bar[:, 0]) @ g.t()) * ((x * e_bar[:, 2]) @ u.t()) * e_bar[:, 1, :i]) @ d.t()
    got = expert_output(expert_source(experts.module), 2, x, e_bar, torch.float32)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_block_rejects_n_ce_not_below_top_k():
    model = build_tiny_model("qwen3_moe", seed=0)
    view = describe_model(model).blocks[0]
    with pytest.raises(MoeCompressError, match="n_ce"):
        wrap_block(view, n_ce=2)
    with pytest.raises(MoeCompressError, match="n-ce"):
        CompressExpertsConfig(n_ce=-1).validate()
    with pytest.raises(MoeCompressError, match="fit-steps"):
        CompressExpertsConfig(fit_steps=-1).validate()


# -- fitting, export, loading -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    cache: dict = {}

    def get(family: str, quantized: bool = False):
        key = (family, quantized)
        if key not in cache:
            root = tmp_path_factory.mktemp(f"ce_{family}")
            save_tiny_model(family, root / "src", seed=0)
            folder = root / "src"
            if quantized:
                quantize_job(folder, root / "q", QuantizeConfig(method="rtn", bits=4, group_size=32), None, {"source": "none"})
                folder = root / "q"
            cache[key] = folder
        return cache[key]

    return get


CALIB = torch.randint(3, 256, (8, 32), generator=torch.Generator().manual_seed(7))


def _in_memory_reference(source_folder, out_folder, n_ce: int):
    """The source model loaded as usual, wrapped in memory with the written ces / beta: what OUT must equal."""
    model = AutoModelForCausalLM.from_pretrained(str(source_folder), dtype=torch.float32).eval()
    blocks = wrap_model(model, n_ce)
    state = {}
    for f in out_folder.glob("*.safetensors"):
        state.update(load_file(str(f)))
    modules = json.loads((out_folder / "config.json").read_text())["quantization_config"]["modules"]
    for path, block in blocks.items():
        block.ces.data.copy_(state[f"{path}.ces"])
        block.skip_beta = modules[path]["beta"]
        block.protect_threshold = modules[path]["protect_threshold"]
    return model


def _fit(folder, tmp_path):
    calib = torch.randint(3, 256, (32, 48), generator=torch.Generator().manual_seed(8))
    cfg = CompressExpertsConfig(n_ce=1, fit_steps=40, lr=1e-2, holdout_fraction=0.2)
    _, cpass = compress_experts_job(folder, tmp_path / "out", cfg, calib, {"source": "test"}, batch_size=16)
    assert len(cpass.records) == 3
    for r in cpass.records:
        assert r.heldout_tokens == round(0.2 * calib.numel())
        assert r.mse_heldout_before > 0
    return cpass


def test_fitting_lowers_heldout_block_error(folders, tmp_path):
    cpass = _fit(folders("qwen3_moe"), tmp_path)
    for r in cpass.records:
        assert r.mse_fit_after < r.mse_fit_before
        assert r.mse_heldout_after < r.mse_heldout_before
    assert cpass.active_params(after=True) < cpass.active_params(after=False)


def test_fitting_recovers_an_expressible_dropped_expert(tmp_path):
    """All experts identical: the dropped expert's output is a rescaled main expert, which e_bar_2 can express."""
    model = build_tiny_model("qwen3_moe", seed=0)
    for block in describe_model(model).blocks.values():
        for e in range(1, block.num_experts):
            for proj in ("gate", "up", "down"):
                block.experts.set(e, proj, block.experts.get(0, proj))
    model.save_pretrained(str(tmp_path / "src"))
    cpass = _fit(tmp_path / "src", tmp_path)
    for r in cpass.records:
        assert r.mse_heldout_after < 0.5 * r.mse_heldout_before


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])
def test_save_load_identical_logits(folders, tmp_path, family):
    src = folders(family)
    out = tmp_path / "out"
    cfg = CompressExpertsConfig(n_ce=1, fit_steps=10, lr=2e-2)
    compress_experts_job(src, out, cfg, CALIB, {"source": "test"})
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ces_blocks = [m for m in loaded.modules() if isinstance(m, CompressedExpertsBlock)]
    assert len(ces_blocks) == 3
    assert all(not torch.equal(b.ces, torch.ones_like(b.ces)) for b in ces_blocks)  # fitted, and loaded
    reference = _in_memory_reference(src, out, n_ce=1)
    ids = _ids(seed=5)
    torch.testing.assert_close(_logits(loaded, ids), _logits(reference, ids), rtol=0, atol=1e-6)


def test_compress_on_top_of_quantized_checkpoint(folders, tmp_path):
    src = folders("qwen2_moe", quantized=True)
    out = tmp_path / "out"
    cfg = CompressExpertsConfig(n_ce=1, fit_steps=10, lr=2e-2, dynamic_skip=True, protect_tokens=0.1)
    _, cpass = compress_experts_job(src, out, cfg, CALIB, {"source": "test"})
    modules = json.loads((out / "config.json").read_text())["quantization_config"]["modules"]
    source_modules = json.loads((src / "config.json").read_text())["quantization_config"]["modules"]
    assert set(source_modules) <= set(modules)  # the packed modules are kept
    assert {k for k, v in modules.items() if v["type"] == "compressed_experts_block"} == {f"model.layers.{i}.mlp" for i in range(3)}
    assert all(r.beta is not None and r.protect_threshold is not None for r in cpass.records)
    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert isinstance(loaded.model.layers[0].mlp, CompressedExpertsBlock)
    assert isinstance(loaded.model.layers[0].mlp.experts, PackedExperts)
    reference = _in_memory_reference(src, out, n_ce=1)
    assert isinstance(reference.model.layers[0].mlp.experts, PackedExperts)
    ids = _ids(seed=6)
    torch.testing.assert_close(_logits(loaded, ids), _logits(reference, ids), rtol=0, atol=1e-6)
    with pytest.raises(MoeCompressError, match="already has compressed experts"):
        compress_experts_job(out, tmp_path / "again", cfg, CALIB, {"source": "test"})


def test_packed_block_at_ones_equals_quantized_model(folders):
    quantized = AutoModelForCausalLM.from_pretrained(str(folders("qwen2_moe", quantized=True)), dtype=torch.float32).eval()
    ids = _ids(seed=2)
    ref = _logits(quantized, ids)
    wrap_model(quantized, n_ce=0)
    torch.testing.assert_close(_logits(quantized, ids), ref, rtol=1e-5, atol=1e-5)
