"""The quantization grid: specs, qparams, codes, RTN, and agreement with the packed format."""

import pytest
import torch

from moecompress.errors import MoeCompressError
from moecompress.quant import format as fmt
from moecompress.quant.grid import (
    SCALE_MIN,
    QuantResult,
    QuantSpec,
    compute_qparams,
    dequantize_codes,
    quantize_to_codes,
    rtn,
)

BITS = [2, 3, 4, 8]
GROUPS = [32, 64, 128, -1]


def _weight(n=48, k=256, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02
    w[3, 17] = 0.5  # an outlier, as real checkpoints have
    return w.to(dtype)


# ---- QuantSpec ---------------------------------------------------------------------------------


def test_spec_rejects_unsupported_bits():
    with pytest.raises(MoeCompressError, match="bits"):
        QuantSpec(bits=5)


def test_spec_rejects_group_longer_than_k_and_accepts_a_partial_last_group():
    spec = QuantSpec(bits=4, group_size=48)
    spec.validate(128)  # groups [0,48) [48,96) [96,128): the last one partial
    assert spec.groups(128) == 3
    with pytest.raises(MoeCompressError, match="longer than the input dimension 32"):
        spec.validate(32)
    with pytest.raises(MoeCompressError):
        compute_qparams(torch.zeros(4, 32), spec)


def test_spec_rejects_nonpositive_group():
    with pytest.raises(MoeCompressError, match="group_size"):
        QuantSpec(bits=4, group_size=0)


def test_any_k_packs():
    spec = QuantSpec(bits=4, group_size=-1)
    spec.validate(48, packable=True)  # kpack-v2 pads K to a multiple of 32
    packed = rtn(torch.randn(4, 48), spec).packed()
    assert packed.qweight.shape == (64 * 4 // 32, 4) and packed.shape == (4, 48) and packed.group_size == 48


def test_spec_groups():
    assert QuantSpec(4, 128).groups(512) == 4
    assert QuantSpec(4, -1).groups(512) == 1
    assert QuantSpec(4, -1).resolved_group(512) == 512
    assert QuantSpec(4, 64).resolved_group(512) == 64


# ---- qparams -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_shapes_and_representability(bits, group, symmetric):
    w = _weight()
    spec = QuantSpec(bits, group, symmetric)
    scales, zeros = compute_qparams(w, spec)
    n, k = w.shape
    assert scales.shape == (n, spec.groups(k)) and scales.dtype == torch.float32
    assert torch.equal(scales, scales.to(torch.float16).to(torch.float32))  # float16-exact
    assert (scales >= SCALE_MIN).all() and torch.isfinite(scales).all()
    if symmetric:
        assert zeros is None
    else:
        assert zeros.shape == scales.shape and zeros.dtype == torch.float32
        assert torch.equal(zeros, zeros.round())
        assert zeros.min() >= 0 and zeros.max() <= 2**bits - 1


def test_symmetric_convention_is_gptq_style():
    # s = 2 max|w| / maxq and z = 2**(bits-1): the most negative weight lands on code 0.
    w = torch.tensor([[-1.0, 0.25, 0.5, 0.0] * 8])
    spec = QuantSpec(4, -1)
    scales, _ = compute_qparams(w, spec)
    assert scales.item() == pytest.approx(2.0 / 15, rel=1e-3)
    codes = quantize_to_codes(w, scales, None, spec)
    assert codes[0, 0].item() == 0
    assert codes[0, 3].item() == 8


def test_asymmetric_range_includes_zero():
    w = torch.full((2, 32), 3.0)  # all-positive group: zero must still be on the grid
    w[0, 0] = 1.0
    r = rtn(w, QuantSpec(4, 32, symmetric=False))
    assert r.zeros.eq(0).all()
    assert torch.allclose(r.dequantized(), w, atol=0.11)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("clip", [False, True])
def test_all_zero_rows_are_finite(symmetric, clip):
    w = _weight(n=8, k=64)
    w[2] = 0.0
    w[5, :32] = 0.0
    r = rtn(w, QuantSpec(3, 32, symmetric, clip_search=clip))
    assert torch.isfinite(r.scales).all() and (r.scales > 0).all()
    deq = r.dequantized()
    assert torch.isfinite(deq).all()
    assert deq[2].eq(0).all() and deq[5, :32].eq(0).all()


def test_tiny_and_huge_weights_keep_scales_finite():
    w = torch.tensor([[1e-9] * 32, [1e6] * 32])
    r = rtn(w, QuantSpec(8, 32))
    assert torch.isfinite(r.scales).all() and (r.scales >= SCALE_MIN).all()
    assert torch.isfinite(r.packed().dequantize()).all()


def test_nonfinite_weight_is_rejected():
    w = _weight(n=4, k=32)
    w[1, 1] = float("nan")
    with pytest.raises(MoeCompressError, match="NaN"):
        rtn(w, QuantSpec(4, 32))


# ---- codes / dequantization --------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_packed_dequantize_equals_in_memory_bit_exact(bits, group, symmetric):
    w = _weight(seed=bits + 10 * max(group, 0), dtype=torch.bfloat16)
    r = rtn(w, QuantSpec(bits, group, symmetric))
    assert r.codes.dtype == torch.int64 and r.codes.min() >= 0 and r.codes.max() <= 2**bits - 1
    packed = r.packed()
    assert packed.symmetric == symmetric
    assert packed.group_size == QuantSpec(bits, group).resolved_group(w.shape[1])
    assert torch.equal(fmt.dequantize(packed.qweight, packed.scales, packed.zeros, bits, packed.group_size),
                       r.dequantized())
    assert torch.equal(packed.dequantize(torch.bfloat16), r.dequantized(torch.bfloat16))
    assert torch.equal(fmt.unpack(packed.qweight, bits).t(), r.codes)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_clip_search_packs_bit_exact_and_does_not_hurt(bits, symmetric):
    w = _weight(seed=5)
    plain = rtn(w, QuantSpec(bits, 64, symmetric))
    clipped = rtn(w, QuantSpec(bits, 64, symmetric, clip_search=True))
    assert torch.equal(clipped.packed().dequantize(), clipped.dequantized())
    # Shrink 1.0 is a candidate, so the searched grid is never worse in its own (p=2.4) norm; check MSE loosely.
    err_plain = (plain.dequantized() - w).pow(2).sum()
    err_clip = (clipped.dequantized() - w).pow(2).sum()
    assert err_clip <= err_plain * 1.05
    if bits <= 3:
        assert err_clip < err_plain  # an outlier-heavy group gains from clipping at low widths


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group", [32, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_requantizing_dequantized_weight_is_idempotent(bits, group, symmetric):
    w = _weight(seed=11)
    spec = QuantSpec(bits, group, symmetric)
    r = rtn(w, spec)
    deq = r.dequantized()
    assert torch.equal(quantize_to_codes(deq, r.scales, r.zeros, spec), r.codes)
    assert torch.equal(dequantize_codes(r.codes, r.scales, r.zeros, spec), deq)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k", [48, 72, 100])
@pytest.mark.parametrize("symmetric, clip", [(True, False), (False, False), (False, True)])
def test_partial_last_group_is_that_group_alone_and_packs_bit_exact(bits, k, symmetric, clip):
    """G = 32 on K = 48, 72, 100: groups [0,32) [32,64) and a partial [64, K) (or [96, 100))."""
    w = torch.randn(6, k, generator=torch.Generator().manual_seed(k + bits))
    spec = QuantSpec(bits, 32, symmetric, clip)
    r = rtn(w, spec)
    ng = -(-k // 32)
    assert r.scales.shape == (6, ng) and r.codes.shape == (6, k)
    start = (ng - 1) * 32
    last = rtn(w[:, start:], QuantSpec(bits, -1, symmetric, clip))  # the partial group on its own
    assert torch.equal(r.scales[:, -1:], last.scales) and torch.equal(r.codes[:, start:], last.codes)
    if not symmetric:
        assert torch.equal(r.zeros[:, -1:], last.zeros)
    packed = r.packed()
    assert packed.qweight.shape == (fmt.packed_rows(k, bits), 6) and packed.scales.shape == (ng, 6)
    assert torch.equal(packed.dequantize(), r.dequantized())
    assert torch.equal(fmt.unpack(packed.qweight, bits, k).t(), r.codes)
    assert torch.equal(quantize_to_codes(r.dequantized(), r.scales, r.zeros, spec), r.codes)


def test_rtn_error_shrinks_with_bits():
    w = _weight(seed=2)
    errs = [(rtn(w, QuantSpec(b, 64)).dequantized() - w).pow(2).mean().item() for b in BITS]
    assert errs == sorted(errs, reverse=True)
    assert errs[-1] < errs[0] / 100


def test_rtn_accepts_leading_expert_dim():
    experts = torch.stack([_weight(n=16, k=64, seed=s) for s in range(3)])  # [E, N, K]
    spec = QuantSpec(4, 32, symmetric=False)
    stacked = rtn(experts, spec)
    assert stacked.scales.shape == (3, 16, 2)
    for e in range(3):
        alone = rtn(experts[e], spec)
        assert torch.equal(stacked.codes[e], alone.codes)
        assert torch.equal(stacked.scales[e], alone.scales)
    packed = stacked.packed()
    assert packed.qweight.shape == (3, 64 * 4 // 32, 16)
    assert torch.equal(packed.dequantize(), stacked.dequantized())


def test_quant_result_dtype_cast_happens_once():
    w = _weight(seed=4)
    r = rtn(w, QuantSpec(4, 128))
    assert torch.equal(r.dequantized(torch.float16), r.dequantized().to(torch.float16))
    assert isinstance(r, QuantResult)


def test_rtn_is_deterministic():
    w = _weight(seed=9)
    spec = QuantSpec(3, 32, False, clip_search=True)
    a, b = rtn(w, spec), rtn(w, spec)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros)
