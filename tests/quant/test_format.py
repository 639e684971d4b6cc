"""The packed format (moecompress.quant.format): pack/unpack and dequantize are exact."""

import pytest
import torch

from moecompress.quant import format as fmt


def _random_codes(shape, bits, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**bits, shape, generator=gen, dtype=torch.int64)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [32, 64, 256])
def test_pack_unpack_round_trip_is_exact(bits, k):
    codes = _random_codes((k, 24), bits, seed=bits * 1000 + k)
    qweight = fmt.pack(codes, bits)
    assert qweight.dtype == torch.int32
    assert qweight.shape == (fmt.packed_rows(k, bits), 24) == (k * bits // 32, 24)  # kpack-v1 shapes
    assert torch.equal(fmt.unpack(qweight, bits), codes)
    assert torch.equal(fmt.unpack(qweight, bits, k), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("k", [1, 5, 33, 48, 72, 100])
def test_any_k_round_trips_exactly_with_zero_padding(bits, k):
    """kpack-v2: K padded to a multiple of 32 with 0 codes; unpack(k) gives back exactly K rows."""
    codes = _random_codes((2, k, 24), bits, seed=bits * 1000 + k)
    codes[..., -1, :] = 2**bits - 1  # the last real row all ones: padding must not swallow it
    qweight = fmt.pack(codes, bits)
    kp = fmt.padded_k(k)
    assert kp % 32 == 0 and kp - 32 < k <= kp
    assert qweight.dtype == torch.int32 and qweight.shape == (2, kp * bits // 32, 24) == (2, fmt.packed_rows(k, bits), 24)
    assert torch.equal(fmt.unpack(qweight, bits, k), codes)
    everything = fmt.unpack(qweight, bits)  # all Kp rows: the padding is 0 bits
    assert everything.shape == (2, kp, 24) and not everything[:, k:].any()
    assert torch.equal(qweight, fmt.pack(everything, bits))  # padding rows written explicitly pack the same
    with pytest.raises(ValueError, match="qweight rows"):
        fmt.unpack(qweight, bits, kp + 1)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_unpack_with_leading_batch_dims(bits):
    codes = _random_codes((3, 2, 64, 8), bits, seed=bits)
    qweight = fmt.pack(codes, bits)
    assert qweight.shape == (3, 2, 64 * bits // 32, 8)
    assert torch.equal(fmt.unpack(qweight, bits), codes)
    # Each matrix of the batch packs exactly as it would alone.
    assert torch.equal(qweight[1, 0], fmt.pack(codes[1, 0], bits))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_extreme_codes_survive_sign_bit(bits):
    # All-ones words set the int32 sign bit: the unsigned reinterpretation must round-trip.
    codes = torch.full((64, 4), 2**bits - 1, dtype=torch.int64)
    codes[::2] = 0
    assert torch.equal(fmt.unpack(fmt.pack(codes, bits), bits), codes)


def test_documented_bit_layout_4bit():
    codes = torch.zeros(32, 1, dtype=torch.int64)
    codes[1, 0] = 0xA  # code k=1 sits in word 0 at bit offset 4
    codes[9, 0] = 0x3  # code k=9 sits in word 1 at bit offset 4
    qweight = fmt.pack(codes, 4)
    assert qweight[0, 0].item() == 0xA << 4
    assert qweight[1, 0].item() == 0x3 << 4


def test_documented_bit_layout_3bit_planes():
    k = 64
    codes = torch.zeros(k, 1, dtype=torch.int64)
    codes[5, 0] = 0b110  # low plane 0b10 in 2-bit row 0 offset 10; high bit in 1-bit row 0 offset 5
    qweight = fmt.pack(codes, 3)
    assert qweight.shape == (k * 3 // 32, 1)
    assert qweight[0, 0].item() == 0b10 << 10
    assert qweight[k // 16, 0].item() == 1 << 5


def test_documented_bit_layout_3bit_planes_with_padding():
    k = 48  # Kp = 64: a 2-bit plane of 64 // 16 = 4 rows, then a 1-bit plane of 64 // 32 = 2 rows
    codes = torch.zeros(k, 1, dtype=torch.int64)
    codes[40, 0] = 0b111  # low 0b11 in 2-bit row 40 // 16 = 2 at offset 16; high bit in row 4 + 1 at offset 8
    qweight = fmt.pack(codes, 3)
    assert qweight.shape == (6, 1)
    assert qweight[:, 0].tolist() == [0, 0, 0b11 << 16, 0, 0, 1 << 8]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k, g", [(64, 32), (48, 32), (72, 16), (100, 64), (100, 100)])
def test_dequantize_matches_formula(bits, symmetric, k, g):
    """W[n, k] = (q - z[k // G]) * s[k // G] for k < K; ceil(K / G) groups, the last one partial."""
    n = 6
    ng = -(-k // g)
    codes = _random_codes((n, k), bits, seed=7)
    gen = torch.Generator().manual_seed(3)
    scales = torch.rand(n, ng, generator=gen).to(torch.float16).to(torch.float32) + 0.01
    zeros = None if symmetric else torch.randint(0, 2**bits, (n, ng), generator=gen).to(torch.float32)
    packed = fmt.pack_weight(codes, scales, zeros, bits, g)
    assert packed.scales.shape == (ng, n) == (fmt.num_groups(k, g), n)
    z = torch.full_like(scales, 2 ** (bits - 1)) if zeros is None else zeros
    group = torch.arange(k) // g  # the group of each column
    expected = (codes.float() - z[:, group]) * scales.to(torch.float16).float()[:, group]
    assert torch.equal(packed.dequantize(), expected)
    assert torch.equal(fmt.dequantize(packed.qweight, packed.scales, packed.zeros, bits, g, k=k), expected)
    projection = fmt.PackedProjection(packed.qweight[None], packed.scales[None], None if symmetric else packed.zeros[None], k)
    assert torch.equal(projection.dequantize(bits, g)[0], expected)
    assert packed.symmetric == symmetric
    assert packed.shape == (n, k)
    if k % 32 and fmt.num_groups(fmt.padded_k(k), g) != ng:  # a forgotten true K is an error, not garbage
        with pytest.raises(ValueError, match="pass the true K"):
            fmt.dequantize(packed.qweight, packed.scales, packed.zeros, bits, g)


def test_check_packable_takes_any_k_and_refuses_bad_settings():
    fmt.check_packable(48, 4, 16)
    fmt.check_packable(64, 4, 48)  # a partial last group
    fmt.check_packable(5, 3, -1)
    with pytest.raises(ValueError, match="bits"):
        fmt.check_packable(64, 5, 32)
    with pytest.raises(ValueError, match="longer than the input dimension 48"):
        fmt.check_packable(48, 4, 64)
    with pytest.raises(ValueError, match="groups per row"):
        fmt.pack_weight(torch.zeros(4, 48, dtype=torch.int64), torch.ones(4, 1), None, 4, 32)  # needs ceil(48/32) = 2


def test_formats_readable():
    assert fmt.CURRENT_FORMAT == "kpack-v2" and fmt.READABLE_FORMATS == ("kpack-v1", "kpack-v2")
    for name in (None, "kpack-v1", "kpack-v2"):
        fmt.check_readable_format(name)
    with pytest.raises(ValueError, match="kpack-v3"):
        fmt.check_readable_format("kpack-v3")


# ----------------------------------------------------------------------------------------------------------------
# The one group-size rule
# ----------------------------------------------------------------------------------------------------------------


def _suggested(message: str) -> list[int]:
    """The group sizes a refusal suggests: the numbers between 'use' and the parenthesis after them."""
    import re

    return [int(n) for n in re.findall(r"\d+", message.split("; use ", 1)[1].split("(", 1)[0])]


KS = [1, 10, 48, 64, 72, 96, 100, 128, 192, 704, 1408, 2880, 5120]
GROUPS = [1, 16, 32, 48, 64, 100, 128, 256, 1024, -1]


@pytest.mark.parametrize("whole_groups", [False, True])
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("group", GROUPS)
def test_group_size_rule_and_its_advice_is_satisfiable(k, group, whole_groups):
    """Native (kpack-v2): -1 or 1 <= G <= K, the last group partial. Whole groups (compressed-tensors):
    also G | K. Every size a refusal suggests passes the rule asked; sizes dividing K come first, and
    natively, when K has no divisor the Triton kernels run (a multiple of 16), multiples of 16 up to K."""
    problem = fmt.group_size_problem(k, group, whole_groups)
    valid = group == -1 or (group <= k and (not whole_groups or k % group == 0))
    assert (problem is None) == valid, problem
    if problem is not None:
        sizes = _suggested(problem)
        assert sizes, problem
        kernel_divisors = [d for d in range(16, k + 1, 16) if k % d == 0]
        for size in sizes:  # every suggestion works for this K
            assert fmt.group_size_problem(k, size, whole_groups) is None
            if whole_groups or kernel_divisors or k < 16:
                assert k % size == 0  # no partial group, exportable anywhere
            else:
                assert size % 16 == 0  # runs on the Triton kernels
        assert "-1 (per-channel)" in problem
        assert "longer than" in problem if group > k else "does not divide" in problem
    else:
        assert fmt.resolve_group_size(k, group, whole_groups) == (k if group == -1 else group)
        assert fmt.num_groups(k, fmt.resolve_group_size(k, group)) == -(-k // (k if group == -1 else group))


@pytest.mark.parametrize("whole_groups", [False, True])
@pytest.mark.parametrize("ks", [(64, 40), (48, 40, 64), (2880, 1408), (100, 48), (10, 64)])
@pytest.mark.parametrize("group", [32, 48, 64, 128])
def test_group_size_rule_over_several_dims_suggests_sizes_that_suit_all(ks, group, whole_groups):
    problem = fmt.group_size_problem(list(ks), group, whole_groups)
    valid = all(fmt.group_size_problem(k, group, whole_groups) is None for k in ks)
    assert (problem is None) == valid
    if problem is not None:
        first_refused = next(k for k in ks if fmt.group_size_problem(k, group, whole_groups) is not None)
        assert f"input dimension {first_refused} " in problem
        for size in _suggested(problem):
            assert all(fmt.group_size_problem(k, size, whole_groups) is None for k in ks), (problem, size)


def test_group_size_rule_for_48_never_suggests_32_for_whole_groups():
    assert fmt.group_size_problem(48, 32) is None  # kpack-v2: [0, 32) and a partial [32, 48)
    problem = fmt.group_size_problem(48, 32, whole_groups=True)
    assert problem.startswith("group size 32 does not divide the input dimension 48 (the compressed-tensors format")
    assert _suggested(problem) == [16, 48]


def test_group_longer_than_the_row_is_refused_never_read_as_per_channel():
    problem = fmt.group_size_problem(48, 128)
    assert problem.startswith("group size 128 is longer than the input dimension 48") and _suggested(problem) == [16, 48]
    assert fmt.resolve_group_size(48, -1) == 48
    with pytest.raises(ValueError, match="longer than"):
        fmt.resolve_group_size(48, 128)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, None])
def test_group_size_rule_refuses_non_lengths_whatever_k(bad):
    for k in (None, 64):
        assert "group_size must be a positive group length or -1" in fmt.group_size_problem(k, bad)
