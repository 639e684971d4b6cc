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
    assert qweight.shape == (fmt.packed_rows(k, bits), 24)
    assert torch.equal(fmt.unpack(qweight, bits), codes)


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


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_matches_formula(bits, symmetric):
    n, k, g = 6, 64, 32
    codes = _random_codes((n, k), bits, seed=7)
    gen = torch.Generator().manual_seed(3)
    scales = torch.rand(n, k // g, generator=gen).to(torch.float16).to(torch.float32) + 0.01
    zeros = None if symmetric else torch.randint(0, 2**bits, (n, k // g), generator=gen).to(torch.float32)
    packed = fmt.pack_weight(codes, scales, zeros, bits, g)
    z = torch.full_like(scales, 2 ** (bits - 1)) if zeros is None else zeros
    expected = (codes.float() - z.repeat_interleave(g, 1)) * scales.to(torch.float16).float().repeat_interleave(g, 1)
    assert torch.equal(packed.dequantize(), expected)
    assert packed.symmetric == symmetric
    assert packed.shape == (n, k)


def test_check_packable_rejects_bad_shapes():
    with pytest.raises(ValueError, match="bits"):
        fmt.check_packable(64, 5, 32)
    with pytest.raises(ValueError, match="multiple of 32"):
        fmt.check_packable(48, 4, 16)
    with pytest.raises(ValueError, match="does not divide"):
        fmt.check_packable(64, 4, 48)


# ----------------------------------------------------------------------------------------------------------------
# The one group-size rule
# ----------------------------------------------------------------------------------------------------------------


def _suggested(message: str) -> list[int]:
    """The group sizes a refusal suggests: the numbers between 'use' and '(dividing'."""
    import re

    return [int(n) for n in re.findall(r"\d+", message.split("; use ", 1)[1].split("(dividing", 1)[0])]


@pytest.mark.parametrize("k", [48, 64, 96, 100, 128, 192, 704, 1408, 2880, 5120])
@pytest.mark.parametrize("group", [1, 16, 32, 48, 64, 100, 128, 256, 1024, -1])
def test_group_size_rule_is_divisibility_and_its_advice_is_satisfiable(k, group):
    problem = fmt.group_size_problem(k, group, packed=False)
    valid = group == -1 or k % group == 0
    assert (problem is None) == valid
    if problem is not None:
        sizes = _suggested(problem)
        assert sizes and all(k % s == 0 for s in sizes), problem  # every suggestion works for this K
        assert all(fmt.group_size_problem(k, s, packed=False) is None for s in sizes)
        assert "-1 (per-channel)" in problem
    if valid:
        assert fmt.resolve_group_size(k, group, packed=False) == (k if group == -1 else group)


def test_group_size_rule_for_48_never_suggests_32():
    problem = fmt.group_size_problem(48, 32, packed=False)
    assert problem.startswith("group size 32 does not divide the input dimension 48")
    assert _suggested(problem) == [16, 48]


def test_packing_a_dimension_no_group_size_can_fix_says_so():
    problem = fmt.group_size_problem(48, 16)  # packed: K must be a multiple of 32, whatever G
    assert "cannot pack it at any group size" in problem and "use" not in problem
    assert fmt.group_size_problem(48, 16, packed=False) is None
    with pytest.raises(ValueError, match="multiple of 32"):
        fmt.resolve_group_size(48, -1)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, None])
def test_group_size_rule_refuses_non_lengths_whatever_k(bad):
    for k in (None, 64):
        assert "group_size must be a positive group length or -1" in fmt.group_size_problem(k, bad)
