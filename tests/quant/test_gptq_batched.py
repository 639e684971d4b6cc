"""Batched expert solving (quant/batched.py) against the per-expert reference.

Tolerance: on CPU the batched path repeats the reference's floating-point operations in the same
order, so Hessians, codes, scales and zeros must be bit-identical (torch.equal); the loss estimate
(a float64 diagnostic summed over a [E, N, B] shape instead of [N, B]) may differ in the last bits,
so it is compared at 1e-9 relative. The padded-bmm Hessian changes the GEMM's summation order and is
compared at 1e-5 relative to the largest entry (float32 rounding of sums over a few hundred tokens).
"""

from __future__ import annotations

import pytest
import torch

from moecompress.errors import MoeCompressError
from moecompress.passes.quantize import _ExpertInputs, _hessian, expert_tokens
from moecompress.quant.batched import (
    damped_inverse_cholesky_batched,
    expert_hessians,
    expert_segments,
    experts_per_chunk,
    gather_routing,
    gptq_quantize_batched,
)
from moecompress.quant.gptq import _damped_inverse_cholesky, gptq_quantize
from moecompress.quant.grid import QuantSpec, rtn


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _routed_store(e_count=6, k_top=2, h=40, batches=(37, 50), seed=0, starve=(4, 5)) -> _ExpertInputs:
    """Calibration batches with skewed routing; experts in ``starve`` are never routed."""
    gen = torch.Generator().manual_seed(seed)
    store = _ExpertInputs()
    for t in batches:
        rank = torch.randn(t, 8, generator=gen) @ torch.randn(8, h, generator=gen)
        store.x.append(rank + 0.1 * torch.randn(t, h, generator=gen))
        logits = torch.randn(t, e_count, generator=gen) + torch.linspace(2.0, 0.0, e_count)  # skew
        logits[:, list(starve)] = -1e9
        probs = logits.softmax(-1)
        w, idx = probs.topk(k_top, dim=-1)
        store.index.append(idx)
        store.weights.append(w / w.sum(-1, keepdim=True))
        store.probs.append(torch.where(probs > 0, probs, torch.full_like(probs, 1e-4)))
    return store


def _routing(store, e_count):
    return gather_routing(store.x, store.index, store.weights, store.probs, e_count)


def _problem(e_count, n, k, seed=0, dead=None):
    """Random weights [E, N, K] and correlated Hessians [E, K, K]; ``dead``: experts with H == 0."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(e_count, n, k, generator=gen) * 0.05
    hs = []
    for e in range(e_count):
        t = 3 * k
        x = torch.randn(t, 6, generator=gen) @ (torch.randn(6, k, generator=gen) * torch.linspace(0.2, 3.0, k))
        x = x + 0.05 * torch.randn(t, k, generator=gen)
        x[:, e % k] = 0.0  # one dead input per expert
        h = 2.0 / t * x.t() @ x
        hs.append(torch.zeros(k, k) if dead and e in dead else h)
    return w, torch.stack(hs)


def _assert_same_as_reference(w, h, spec, damp=0.01, **kw):
    batched, losses = gptq_quantize_batched(w, h, spec, damp=damp, **kw)
    damps = [damp] * w.shape[0] if isinstance(damp, float) else damp
    for e in range(w.shape[0]):
        ref, loss = gptq_quantize(w[e], h[e], spec, damp=damps[e], **kw)
        assert torch.equal(batched.codes[e], ref.codes), f"expert {e}: codes differ"
        assert torch.equal(batched.scales[e], ref.scales), f"expert {e}: scales differ"
        if ref.zeros is None:
            assert batched.zeros is None
        else:
            assert torch.equal(batched.zeros[e], ref.zeros), f"expert {e}: zeros differ"
        assert losses[e] == pytest.approx(loss, rel=1e-9, abs=1e-12)
    return batched


# ---- routing gather and Hessians ----------------------------------------------------------------


@pytest.mark.parametrize("all_tokens", [False, True])
@pytest.mark.parametrize("agq", [False, True])
def test_segments_equal_the_per_expert_tokens(all_tokens, agq):
    store = _routed_store()
    routing = _routing(store, 6)
    segments = expert_segments(routing, range(6), all_tokens, agq)
    counts = routing.routed_counts()
    for e, (x, c) in enumerate(segments):
        x_ref, c_ref, routed = expert_tokens(store, e, all_tokens, agq)
        assert counts[e] == routed
        assert torch.equal(x, x_ref) and torch.equal(c, c_ref)
    assert counts[4] == counts[5] == 0 and counts[0] > counts[3]  # skewed, two starved


def test_gather_can_release_the_per_batch_inputs_as_it_copies_them():
    store = _routed_store()
    kept = _routing(store, 6)
    xs = list(store.x)
    released = gather_routing(xs, store.index, store.weights, store.probs, 6, release_inputs=True)
    assert xs == []  # emptied: the batches and the concatenation never both exist in full
    for a, b in zip((kept.x, kept.applied, kept.routed, kept.probs), (released.x, released.applied, released.routed, released.probs)):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory needs CUDA")
def test_pinned_gather_copies_to_the_gpu_unchanged():
    store = _routed_store()
    kept = _routing(store, 6)
    pinned = gather_routing(list(store.x), store.index, store.weights, store.probs, 6, release_inputs=True, pin=True)
    assert pinned.x.is_pinned()
    on_gpu = pinned.to("cuda")
    torch.cuda.synchronize()
    assert torch.equal(on_gpu.x.cpu(), kept.x) and torch.equal(on_gpu.applied.cpu(), kept.applied)


def test_segments_of_a_subset_keep_the_listed_order():
    store = _routed_store()
    routing = _routing(store, 6)
    sub = expert_segments(routing, [3, 0, 5], all_tokens=False, agq=True)
    for (x, c), e in zip(sub, [3, 0, 5]):
        x_ref, c_ref, _ = expert_tokens(store, e, False, True)
        assert torch.equal(x, x_ref) and torch.equal(c, c_ref)


@pytest.mark.parametrize("all_tokens", [False, True])
def test_segment_hessians_are_bit_identical_and_padded_within_float32_rounding(all_tokens):
    store = _routed_store()
    segments = expert_segments(_routing(store, 6), range(6), all_tokens, agq=True)
    seg = expert_hessians(segments, 40, "segment")
    pad = expert_hessians(segments, 40, "padded")
    for e in range(6):
        x_ref, c_ref, _ = expert_tokens(store, e, all_tokens, True)
        ref = _hessian(x_ref, c_ref, 40)
        assert torch.equal(seg[e], ref)
        assert torch.allclose(pad[e], ref, rtol=0, atol=1e-5 * max(ref.abs().max().item(), 1e-30))
    if not all_tokens:
        assert seg[4].eq(0).all() and pad[4].eq(0).all()  # starved: zero Hessian, no NaN


def test_hessians_reject_bad_affinities_and_methods():
    x = torch.ones(3, 4)
    with pytest.raises(MoeCompressError, match="non-negative"):
        expert_hessians([(x, torch.tensor([1.0, -1.0, 1.0]))], 4)
    with pytest.raises(MoeCompressError, match="non-negative"):
        expert_hessians([(x, torch.tensor([1.0, float("nan"), 1.0]))], 4, "padded")
    with pytest.raises(MoeCompressError, match="unknown Hessian method"):
        expert_hessians([(x, torch.ones(3))], 4, "dense")


# ---- GPTQ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group", [32, -1])
def test_batched_gptq_equals_per_expert(bits, act_order, group):
    w, h = _problem(5, 24, 96, seed=bits)
    _assert_same_as_reference(w, h, QuantSpec(bits, group), act_order=act_order, block_size=40)


@pytest.mark.parametrize("k", [40, 72, 100])  # not multiples of 32: padded partial last groups
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("act_order,static_groups", [(False, True), (True, True), (False, False)])
def test_batched_gptq_on_odd_k(k, symmetric, act_order, static_groups):
    w, h = _problem(3, 16, k, seed=k)
    spec = QuantSpec(4, 32, symmetric, clip_search=not symmetric)
    _assert_same_as_reference(w, h, spec, act_order=act_order, static_groups=static_groups, block_size=24)


def test_starved_experts_per_expert_damping_and_rtn_stacks():
    # experts 1 and 3 saw no tokens (H == 0): the reference treats them as plain RTN
    w, h = _problem(4, 16, 64, seed=7, dead=(1, 3))
    spec = QuantSpec(4, 32)
    batched = _assert_same_as_reference(w, h, spec, damp=[0.01, 0.1, 0.01, 0.1])
    for e in (1, 3):
        assert torch.equal(batched.codes[e], rtn(w[e], spec).codes)
    stacked = rtn(w, spec)  # RTN is batched already: a stack equals expert by expert
    for e in range(4):
        assert torch.equal(stacked.codes[e], rtn(w[e], spec).codes)


def test_only_the_failing_expert_gets_more_damping():
    _, h = _problem(3, 8, 32, seed=3)
    bad = torch.eye(32)
    bad[0, 1] = bad[1, 0] = 1.5  # eigenvalue -0.5: positive definite only from damping 1 (100x) on
    h[1] = bad
    upper = damped_inverse_cholesky_batched(h, torch.tensor([0.01, 0.01, 0.01], dtype=torch.float64))
    for e in range(3):
        assert torch.equal(upper[e], _damped_inverse_cholesky(h[e], 0.01))
    h[1, 0, 1] = h[1, 1, 0] = 1e9  # hopeless even with 1000x damping
    with pytest.raises(MoeCompressError, match=r"expert\(s\) \[1\]"):
        damped_inverse_cholesky_batched(h, torch.tensor([0.01] * 3, dtype=torch.float64))


def test_batched_gptq_is_deterministic_leaves_inputs_alone_and_checks_shapes():
    w, h = _problem(3, 8, 32, seed=1)
    w0, h0 = w.clone(), h.clone()
    a, _ = gptq_quantize_batched(w, h, QuantSpec(4, 32), act_order=True)
    b, _ = gptq_quantize_batched(w, h, QuantSpec(4, 32), act_order=True)
    assert torch.equal(a.codes, b.codes) and torch.equal(w, w0) and torch.equal(h, h0)
    with pytest.raises(MoeCompressError, match=r"w \[E, N, K\]"):
        gptq_quantize_batched(w[0], h[0], QuantSpec(4, 32))
    with pytest.raises(MoeCompressError, match="one per expert"):
        gptq_quantize_batched(w, h, QuantSpec(4, 32), damp=[0.01, 0.01])
    with pytest.raises(MoeCompressError, match="NaN"):
        gptq_quantize_batched(w, h.clone().fill_(float("nan")), QuantSpec(4, 32))


def test_chunk_size_follows_the_memory_budget():
    # 256 experts of K = 7168 (DeepSeek-V3's hidden size) cannot be solved in one batch
    per = 4 * (3 * 7168**2 + 6 * 4096 * 7168)
    assert experts_per_chunk(7168, 4096, 8 * per) == 8
    assert experts_per_chunk(7168, 4096, 1) == 1
    assert experts_per_chunk(256, 512, 2**30) >= 256

