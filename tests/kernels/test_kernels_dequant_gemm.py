"""dequant_gemm (Triton, run by the interpreter here) vs the pure-torch reference on dequantized weights.

Every path is swept: GEMV (BLOCK_M=1, tl.sum), split-K with tl.dot (BLOCK_M=16) and the tiled GEMM,
over bits {2,3,4,8} x groups {32,64,128} x zeros {with, without} x M {1,5,33}.
"""

import pytest
import torch

from moecompress.errors import MoeCompressError
from moecompress.kernels.dequant_gemm import dequant_gemm, dequant_gemm_reference, dequant_gemm_with_config
from moecompress.kernels.synthetic import random_packed
from moecompress.quant import format as fmt

K, N = 128, 80  # N deliberately not a multiple of BLOCK_N

GEMV = {"kernel": "splitk", "BLOCK_M": 1, "BLOCK_N": 64, "BLOCK_K": 128, "SPLIT_K": 3}
SPLITK = {"kernel": "splitk", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2}
TILED = {"kernel": "tiled", "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 2}


def _close(out: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-5) -> None:
    """Kernel error only: relative to the output scale (both sides use identical dequantized weights)."""
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert ref.abs().max() > 0  # guard against a vacuous all-zero comparison
    err = (out.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < rtol, f"relative error {err:.3g}"


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("with_zeros", [False, True])
def test_every_path_matches_reference(bits, group_size, with_zeros):
    generator = torch.Generator().manual_seed(bits * 1000 + group_size + with_zeros)
    w = random_packed((N, K), bits, group_size, with_zeros, generator)
    bias = torch.randn(N, generator=generator)
    for m in (1, 5, 33):
        x = torch.randn(m, K, generator=generator)
        ref = dequant_gemm_reference(x, w.qweight, w.scales, w.zeros, bits, group_size, bias)
        # The reference really is x @ W^T with W from format.dequantize.
        dense = fmt.dequantize(w.qweight, w.scales, w.zeros, bits, group_size)
        torch.testing.assert_close(ref, x @ dense.t() + bias, rtol=1e-5, atol=1e-5)
        small_m = GEMV if m == 1 else SPLITK
        for config in (small_m, TILED):
            out = dequant_gemm_with_config(x, w.qweight, w.scales, w.zeros, bits, group_size, bias, config=config)
            _close(out, ref)


@pytest.mark.parametrize("m", [1, 5, 33])
def test_table_config_fp16_leading_dims_and_no_bias(m):
    """The public entry (config from the JSON table) on fp16 input with leading batch dims."""
    generator = torch.Generator().manual_seed(m)
    w = random_packed((N, K), 4, 64, True, generator)
    x = torch.randn(1, m, K, generator=generator).half()
    out = dequant_gemm(x, w.qweight, w.scales, w.zeros, 4, 64)
    ref = dequant_gemm_reference(x, w.qweight, w.scales, w.zeros, 4, 64)
    assert out.shape == (1, m, N)
    _close(out, ref, rtol=2e-3)  # fp16 output rounding


def test_single_split_and_gemv_block_k_clipped_to_group():
    """SPLIT_K=1 stores straight into x.dtype; BLOCK_K larger than the group is clipped to it; K=96
    is not a multiple of the requested BLOCK_K."""
    generator = torch.Generator().manual_seed(7)
    w = random_packed((48, 96), 3, 32, False, generator)
    x = torch.randn(2, 96, generator=generator)
    ref = dequant_gemm_reference(x, w.qweight, w.scales, w.zeros, 3, 32)
    for config in (
        {"kernel": "splitk", "BLOCK_M": 1, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 1},
        {"kernel": "splitk", "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 8},
    ):
        _close(dequant_gemm_with_config(x, w.qweight, w.scales, w.zeros, 3, 32, config=config), ref)


def test_empty_batch_and_bad_inputs():
    generator = torch.Generator().manual_seed(1)
    w = random_packed((32, 64), 4, 32, False, generator)
    out = dequant_gemm(torch.zeros(0, 64), w.qweight, w.scales, w.zeros, 4, 32)
    assert out.shape == (0, 32)
    with pytest.raises(MoeCompressError, match="input features"):
        dequant_gemm(torch.zeros(2, 32), w.qweight, w.scales, w.zeros, 4, 32)
    with pytest.raises(MoeCompressError, match="scales shape"):
        dequant_gemm(torch.zeros(2, 64), w.qweight, w.scales, w.zeros, 4, 64)
    with pytest.raises(MoeCompressError, match="unknown dequant_gemm kernel"):
        dequant_gemm_with_config(torch.zeros(2, 64), w.qweight, w.scales, None, 4, 32, config={"kernel": "x", "BLOCK_K": 32})


# ----------------------------------------------------------------------------------------------------------------
# Any K (kpack-v2): K padded to a multiple of 32 in qweight, a partial last group; the kernels mask k >= K
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k, group_size", [(48, 32), (72, 16), (100, 64), (100, 100)])
def test_odd_k_every_path_matches_reference(bits, k, group_size):
    """K = 48, 72, 100 (not multiples of 32) with groups that do not divide K (and per-channel G = K):
    the reference is x @ W^T with W from format.dequantize(k=K); every Triton path matches it."""
    n = 40
    generator = torch.Generator().manual_seed(bits * 100 + k)
    w = random_packed((n, k), bits, group_size, bits % 2 == 0, generator)
    assert w.qweight.shape == (fmt.padded_k(k) * bits // 32, n) and w.scales.shape == (-(-k // group_size), n)
    bias = torch.randn(n, generator=generator)
    dense = fmt.dequantize(w.qweight, w.scales, w.zeros, bits, group_size, k=k)
    assert dense.shape == (n, k)
    for m in (1, 5, 33):
        x = torch.randn(m, k, generator=generator)
        ref = dequant_gemm_reference(x, w.qweight, w.scales, w.zeros, bits, group_size, bias)
        torch.testing.assert_close(ref, x @ dense.t() + bias, rtol=1e-5, atol=1e-5)
        small_m = {**GEMV, "BLOCK_K": 64} if m == 1 else {**SPLITK, "BLOCK_K": 32}
        for config in (small_m, TILED):
            out = dequant_gemm_with_config(x, w.qweight, w.scales, w.zeros, bits, group_size, bias, config=config)
            _close(out, ref)


def test_odd_k_x_width_must_fit_the_packed_rows():
    w = random_packed((16, 48), 4, 32, False, torch.Generator().manual_seed(0))  # Kp = 64: K in 33..64
    for bad in (32, 65):
        with pytest.raises(MoeCompressError, match="input features"):
            dequant_gemm_reference(torch.zeros(1, bad), w.qweight, w.scales, w.zeros, 4, 32)
    with pytest.raises(MoeCompressError, match="scales shape"):  # K = 48 in groups of 16 needs 3 scale rows, not 2
        dequant_gemm(torch.zeros(1, 48), w.qweight, w.scales, w.zeros, 4, 16)
