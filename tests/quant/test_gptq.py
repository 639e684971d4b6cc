"""GPTQ solver: Hessian accumulation, quality against RTN, starvation, packing agreement."""

import pytest
import torch

from moecompress.errors import MoeCompressError
from moecompress.quant.gptq import (
    TOKEN_BLOCK,
    accumulate_hessian,
    activation_hessian,
    gptq_quantize,
    layer_output_error,
    make_empty_hessian,
    relative_output_error,
)
from moecompress.quant.grid import QuantSpec, quantize_to_codes, rtn

K, N, T = 128, 48, 768


def _correlated_inputs(t=T, k=K, rank=12, seed=0):
    """x = z @ A + noise: low-rank correlated features with uneven scales, like LLM activations."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, k, generator=gen) * torch.linspace(0.2, 3.0, k)
    z = torch.randn(t, rank, generator=gen)
    return z @ a + 0.05 * torch.randn(t, k, generator=gen)


def _weight(n=N, k=K, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * 0.05


def _hessian(x, batch=100):
    h, seen = make_empty_hessian(x.shape[1]), 0
    for start in range(0, x.shape[0], batch):
        h, seen = accumulate_hessian(h, x[start : start + batch], seen)
    return h, seen


# ---- Hessian -----------------------------------------------------------------------------------


def test_hessian_is_running_average_of_2xtx():
    x = _correlated_inputs()
    h, seen = _hessian(x, batch=97)  # uneven batches
    assert seen == T
    expected = 2.0 / T * x.double().t() @ x.double()
    assert torch.allclose(h.double(), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    assert h.dtype == torch.float32 and h.shape == (K, K)


def test_unit_weights_equal_unweighted_hessian():
    x = _correlated_inputs()
    h_plain, n_plain = accumulate_hessian(make_empty_hessian(K), x, 0)
    h_unit, n_unit = accumulate_hessian(make_empty_hessian(K), x, 0, weights=torch.ones(T))
    assert n_plain == n_unit == T
    assert torch.equal(h_plain, h_unit)


def test_weighted_hessian_matches_agq_definition():
    x = _correlated_inputs(t=64)
    c = torch.rand(64, generator=torch.Generator().manual_seed(3))
    h, seen = accumulate_hessian(make_empty_hessian(K), x[:30], 0, weights=c[:30])
    h, seen = accumulate_hessian(h, x[30:], seen, weights=c[30:])
    expected = 2.0 / 64 * (x.double() * c.double()[:, None]).t() @ x.double()  # (2/N) sum c x x^T
    assert torch.allclose(h.double(), expected, rtol=1e-4, atol=1e-5)
    # A zero-weight token contributes nothing but still counts toward N.
    h0, n0 = accumulate_hessian(make_empty_hessian(K), x[:1], 0, weights=torch.zeros(1))
    assert n0 == 1 and h0.eq(0).all()


def test_a_batch_longer_than_a_token_block_is_folded_in_block_by_block_to_the_same_hessian():
    t = 2 * TOKEN_BLOCK + 77  # two whole blocks and a partial one
    g = torch.Generator().manual_seed(4)
    x = torch.randn(t, K, generator=g)
    c = torch.rand(t, generator=g)
    h, seen = accumulate_hessian(make_empty_hessian(K), x, 0, weights=c)
    expected = 2.0 / t * (x.double() * c.double()[:, None]).t() @ x.double()
    assert seen == t
    assert torch.allclose(h.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


def test_activation_hessian_is_the_hessian_of_the_activations():
    t = TOKEN_BLOCK + 300
    g = torch.Generator().manual_seed(5)
    x, w = torch.randn(t, K, generator=g), torch.randn(2 * K, K, generator=g) / K**0.5
    c = torch.rand(t, generator=g)

    def act(rows):  # rows are mapped independently, as an expert's gate/up and activation are
        return torch.nn.functional.silu(rows @ w.t())

    h = activation_hessian(make_empty_hessian(2 * K), act, x, 0, c)
    expected, _ = accumulate_hessian(make_empty_hessian(2 * K), act(x), 0, c)
    assert torch.allclose(h, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_relative_output_error_from_the_hessian_equals_the_one_from_the_tokens():
    g = torch.Generator().manual_seed(6)
    x, c = torch.randn(300, K, generator=g), torch.rand(300, generator=g)
    w = torch.randn(5, K, generator=g)
    w_hat = w + 0.1 * torch.randn(5, K, generator=g)
    h, _ = accumulate_hessian(make_empty_hessian(K), x, 0, weights=c)
    xs = x.double() * c.double().sqrt()[:, None]
    direct = (xs @ (w - w_hat).double().t()).norm() / (xs @ w.double().t()).norm()
    assert relative_output_error(w, w_hat, h) == pytest.approx(float(direct), rel=1e-4)
    # no tokens: the weight-space error
    assert relative_output_error(w, w_hat, make_empty_hessian(K)) == pytest.approx(float((w - w_hat).norm() / w.norm()), rel=1e-6)


def test_empty_batch_and_bad_weights():
    h = make_empty_hessian(K)
    h2, seen = accumulate_hessian(h, torch.zeros(0, K), 5)
    assert seen == 5 and h2 is h
    with pytest.raises(MoeCompressError, match="non-negative"):
        accumulate_hessian(h, torch.ones(2, K), 0, weights=torch.tensor([1.0, -1.0]))
    with pytest.raises(MoeCompressError, match="one weight per token"):
        accumulate_hessian(h, torch.ones(2, K), 0, weights=torch.ones(3))


# ---- quality -----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [32, -1])
def test_gptq_beats_rtn_on_layer_output(bits, act_order, group):
    x, w = _correlated_inputs(), _weight()
    h, _ = _hessian(x)
    spec = QuantSpec(bits, group)
    result, loss = gptq_quantize(w, h, spec, act_order=act_order, block_size=32)
    err_gptq = layer_output_error(w, result.dequantized(), x)
    err_rtn = layer_output_error(w, rtn(w, spec).dequantized(), x)
    assert err_gptq < 0.5 * err_rtn, (err_gptq, err_rtn)
    assert loss > 0 and torch.isfinite(torch.tensor(loss))


def test_gptq_beats_rtn_asymmetric_with_clip_and_dynamic_groups():
    x, w = _correlated_inputs(seed=4), _weight(seed=5)
    h, _ = _hessian(x)
    spec = QuantSpec(3, 32, symmetric=False, clip_search=True)
    result, _ = gptq_quantize(w, h, spec, static_groups=False)
    err_rtn = layer_output_error(w, rtn(w, spec).dequantized(), x)
    assert layer_output_error(w, result.dequantized(), x) < 0.5 * err_rtn


def test_gptq_on_held_out_tokens_still_beats_rtn():
    x = _correlated_inputs(t=2 * T)
    w = _weight()
    h, _ = _hessian(x[:T])
    spec = QuantSpec(4, 32)
    result, _ = gptq_quantize(w, h, spec)
    held_out = x[T:]
    assert layer_output_error(w, result.dequantized(), held_out) < layer_output_error(
        w, rtn(w, spec).dequantized(), held_out
    )


# ---- layout, packing, determinism ----------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_result_packs_bit_exact(bits, symmetric, act_order):
    x, w = _correlated_inputs(), _weight()
    h, _ = _hessian(x)
    spec = QuantSpec(bits, 64, symmetric)
    result, _ = gptq_quantize(w.to(torch.bfloat16), h, spec, act_order=act_order)
    assert result.codes.shape == (N, K) and result.scales.shape == (N, K // 64)
    assert (result.zeros is None) == symmetric
    assert torch.equal(result.packed().dequantize(), result.dequantized())


@pytest.mark.parametrize("k", [48, 72, 100])
@pytest.mark.parametrize("bits, symmetric, act_order, static_groups", [
    (2, True, False, True), (3, False, True, True), (4, True, False, False), (8, False, False, False), (4, False, True, True),
])
def test_gptq_on_odd_k_with_a_partial_last_group(k, bits, symmetric, act_order, static_groups):
    """K not a multiple of 32 and G = 32 not dividing it: ceil(K / 32) groups, the last one partial,
    whose scale is the one its own columns give (static: RTN's grid; dynamic: fitted on entry); packs bit-exact
    (padded to a multiple of 32) and still beats RTN on the layer output."""
    x, w = _correlated_inputs(t=400, k=k, seed=k), _weight(n=24, k=k, seed=k + 1)
    h, _ = _hessian(x)
    spec = QuantSpec(bits, 32, symmetric)
    result, loss = gptq_quantize(w, h, spec, act_order=act_order, static_groups=static_groups, block_size=40)
    ng = -(-k // 32)
    assert result.codes.shape == (24, k) and result.scales.shape == (24, ng) and torch.isfinite(torch.tensor(loss))
    if static_groups:
        assert torch.equal(result.scales, rtn(w, spec).scales)
    assert torch.equal(quantize_to_codes(result.dequantized(), result.scales, result.zeros, spec), result.codes)
    packed = result.packed()
    assert packed.shape == (24, k) and packed.qweight.shape[0] == -(-k // 32) * bits
    assert torch.equal(packed.dequantize(), result.dequantized())
    err_rtn = layer_output_error(w, rtn(w, spec).dequantized(), x)
    assert layer_output_error(w, result.dequantized(), x) < err_rtn


def test_act_order_keeps_groups_in_original_column_order():
    """With static groups, act_order codes must sit on the grid of the ORIGINAL column's group."""
    x, w = _correlated_inputs(), _weight()
    h, _ = _hessian(x)
    spec = QuantSpec(4, 32)
    result, _ = gptq_quantize(w, h, spec, act_order=True)
    static = rtn(w, spec)
    assert torch.equal(result.scales, static.scales)  # static groups come from the original weight
    # Re-rounding the dequantized weight against the stored groups reproduces the codes.
    assert torch.equal(quantize_to_codes(result.dequantized(), result.scales, None, spec), result.codes)


def test_act_order_without_static_groups_is_refused():
    with pytest.raises(MoeCompressError, match="static_groups"):
        gptq_quantize(_weight(), torch.eye(K), QuantSpec(4, 32), act_order=True, static_groups=False)


def test_dynamic_groups_do_not_depend_on_block_size():
    x, w = _correlated_inputs(), _weight()
    h, _ = _hessian(x)
    spec = QuantSpec(4, 32, symmetric=False)
    ref, _ = gptq_quantize(w, h, spec, block_size=K, static_groups=False)
    for block in (24, 50):  # blocks that cut through groups
        other, _ = gptq_quantize(w, h, spec, block_size=block, static_groups=False)
        assert (other.codes == ref.codes).float().mean() > 0.999
        assert torch.allclose(other.scales, ref.scales, rtol=2e-3)


def test_gptq_is_deterministic_and_leaves_inputs_alone():
    x, w = _correlated_inputs(), _weight()
    h, _ = _hessian(x)
    w_before, h_before = w.clone(), h.clone()
    spec = QuantSpec(3, 32)
    a, la = gptq_quantize(w, h, spec, act_order=True)
    b, lb = gptq_quantize(w, h, spec, act_order=True)
    assert torch.equal(a.codes, b.codes) and la == lb
    assert torch.equal(w, w_before) and torch.equal(h, h_before)


# ---- starvation and ill-conditioning -------------------------------------------------------------


@pytest.mark.parametrize("static_groups", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_hessian_falls_back_to_rtn(static_groups, symmetric):
    w = _weight()
    spec = QuantSpec(4, 32, symmetric)
    result, loss = gptq_quantize(w, make_empty_hessian(K), spec, static_groups=static_groups)
    reference = rtn(w, spec)
    assert torch.equal(result.codes, reference.codes)
    assert torch.equal(result.scales, reference.scales)
    assert torch.isfinite(result.dequantized()).all() and loss >= 0.0


def test_dead_input_columns_keep_their_weights():
    x = _correlated_inputs()
    x[:, :16] = 0.0  # features never active in calibration
    w = _weight()
    h, _ = _hessian(x)
    result, _ = gptq_quantize(w, h, QuantSpec(4, 32), act_order=True)
    deq = result.dequantized()
    assert torch.isfinite(deq).all()
    assert torch.equal(result.codes[:, :16], rtn(w, QuantSpec(4, 32)).codes[:, :16])
    assert deq[:, :16].abs().sum() > 0


def test_singular_hessian_from_few_tokens_is_finite():
    x = _correlated_inputs(t=3)  # rank 3 Hessian: damping alone makes it invertible
    w = _weight()
    h, _ = _hessian(x)
    result, loss = gptq_quantize(w, h, QuantSpec(2, 32), damp=1e-6)
    assert torch.isfinite(result.dequantized()).all() and loss >= 0


def test_bad_inputs_are_refused():
    w = _weight()
    with pytest.raises(MoeCompressError, match="does not match"):
        gptq_quantize(w, torch.eye(K + 1), QuantSpec(4, 32))
    h = torch.eye(K)
    h[0, 1] = float("nan")
    with pytest.raises(MoeCompressError, match="NaN"):
        gptq_quantize(w, h, QuantSpec(4, 32))
    with pytest.raises(MoeCompressError, match="one"):
        gptq_quantize(w[None], torch.eye(K), QuantSpec(4, 32))
    with pytest.raises(MoeCompressError, match="not positive definite"):
        gptq_quantize(w, -torch.eye(K), QuantSpec(4, 32))


def test_layer_output_error_definition():
    x = torch.ones(4, 2)
    w = torch.zeros(3, 2)
    w_hat = torch.full((3, 2), 0.5)
    assert layer_output_error(w, w_hat, x) == pytest.approx(3.0)  # each output off by 1, 3 outputs
    assert layer_output_error(w, w, x) == 0.0
