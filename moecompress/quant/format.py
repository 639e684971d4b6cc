"""The packed weight format, defined once.

Everything that stores or reads quantized weights imports this module: the quantizer (to pack),
the native checkpoint writer, the packed runtime modules (torch reference path), the Triton kernels
(`moecompress.kernels`), and the compressed-tensors exporter (which repacks from `unpack`).

Format ``PackFormat.KPACK_V1`` for one weight matrix ``W`` of shape ``[N, K]`` (``nn.Linear`` layout:
N output features, K input features), quantized group-wise along K with group size ``G`` (``G == K``
means per-channel):

==========  ============================  =======  =================================================
tensor      shape                         dtype    meaning
==========  ============================  =======  =================================================
qweight     ``[K * bits // 32, N]``       int32    integer codes q in [0, 2**bits), packed along K,
                                                   N contiguous (the layout kernels read fastest)
scales      ``[K // G, N]``               float16  one scale per (group, output column)
zeros       ``[K // G, N]``               uint8    zero point per (group, column); ABSENT for
                                                   symmetric quantization, where z = 2**(bits-1)
==========  ============================  =======  =================================================

Dequantization: ``W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]``.

Group sizes (one rule, :func:`group_size_problem`, which every check in moecompress calls): ``G`` divides
``K``, or ``group_size = -1`` for per-channel (``G = K``); packing also needs ``K`` a multiple of 32.

Bit layout of ``qweight`` (K must be a multiple of 32):

* bits 2, 4, 8: ``32 // bits`` codes per int32; code k sits in row ``k // (32 // bits)`` at bit offset
  ``(k % (32 // bits)) * bits``.
* bits 3: two bit-planes stacked along rows: rows ``[0, K // 16)`` hold the low two bits of every
  code packed exactly as 2-bit codes; rows ``[K // 16, K // 16 + K // 32)`` hold the high bit packed
  as 1-bit codes (32 per int32). Bit-planes keep every plane aligned to int32 words, so kernels never
  read a code split across two words.

Every function here accepts leading batch dimensions (``[..., K*bits//32, N]``), so a stack of
experts ``[E, ...]`` packs and unpacks in one call.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
UNQUANTIZED_BITS = 16  # the width recorded for an expert kept in full precision (no codes, no scales)
PACK_ALIGN = 32  # K must be a multiple of this: one int32 word of 1-bit codes
PER_CHANNEL = -1  # group_size meaning one group per row (G = K)
# Group sizes that are multiples of this also run on the Triton kernels (one K step reads one scale
# row, and tl.dot needs K steps >= 16: moecompress.kernels.launch_utils); preferred in suggestions.
KERNEL_GROUP_MULTIPLE = 16


class PackFormat(str, enum.Enum):
    """Packing formats understood by moecompress. Only one exists; new ones get a new member."""

    KPACK_V1 = "kpack-v1"


@dataclass
class PackedWeight:
    """One packed matrix ``W [N, K]`` (see the module docstring for every tensor's shape)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]  # (N, K) of the dense weight

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def nbytes(self) -> int:
        total = self.qweight.numel() * 4 + self.scales.numel() * 2
        return total + (self.zeros.numel() if self.zeros is not None else 0)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, dtype)


# --------------------------------------------------------------------------------------------------
# The group-size rule (every check in moecompress calls group_size_problem)
# --------------------------------------------------------------------------------------------------


def can_pack(k: int) -> bool:
    """Whether an input dimension K can be packed at all (at any group size)."""
    return k % PACK_ALIGN == 0


def dividing_group_sizes(k: int, near: int | None = None, count: int = 4) -> list[int]:
    """Up to ``count`` group sizes that divide K, ascending, the ones closest to ``near`` (a wanted size).

    Multiples of :data:`KERNEL_GROUP_MULTIPLE` (which the Triton kernels also run) when K has any, else
    any divisor above 1, else K itself.
    """
    divisors = sorted({d for i in range(1, int(k**0.5) + 1) if k % i == 0 for d in (i, k // i)})
    pool = [d for d in divisors if d % KERNEL_GROUP_MULTIPLE == 0] or [d for d in divisors if d > 1] or [k]
    if near is not None and near > 0:
        pool = sorted(pool, key=lambda d: (abs(d - near) / min(d, near), -d))
    else:
        pool = sorted(pool, reverse=True)
    return sorted(pool[:count])


def group_size_problem(k: int | None, group_size, packed: bool = True) -> str | None:
    """THE group-size rule: None when ``group_size`` is valid for input dimension K, else the reason.

    Valid: ``group_size`` is -1 (:data:`PER_CHANNEL`, one group per row, G = K) or a positive integer
    that divides K. With ``packed`` (the kpack-v1 format) K must also be a multiple of
    :data:`PACK_ALIGN`, whatever the group size. ``k=None`` checks only what does not depend on K.
    The message always names sizes that work for this K (or says that none does).
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != PER_CHANNEL):
        return f"group_size must be a positive group length or {PER_CHANNEL} (per-channel), got {group_size!r}"
    if k is None:
        return None
    if packed and not can_pack(k):
        return (
            f"input dimension {k} is not a multiple of {PACK_ALIGN}, cannot pack it at any group size "
            f"({PackFormat.KPACK_V1.value} packs codes along K in int32 words)"
        )
    if group_size == PER_CHANNEL or k % group_size == 0:
        return None
    sizes = dividing_group_sizes(k, near=group_size)
    listed = ", ".join(str(s) for s in sizes[:-1]) + (" or " if len(sizes) > 1 else "") + str(sizes[-1])
    return (
        f"group size {group_size} does not divide the input dimension {k}; use {listed} "
        f"(dividing {k}) or {PER_CHANNEL} (per-channel)"
    )


def resolve_group_size(k: int, group_size: int, packed: bool = True) -> int:
    """The group length G used for input dimension K (K itself for per-channel); ValueError when the
    rule (:func:`group_size_problem`) refuses it."""
    problem = group_size_problem(k, group_size, packed)
    if problem is not None:
        raise ValueError(problem)
    return k if group_size == PER_CHANNEL else group_size


def check_packable(k: int, bits: int, group_size: int) -> None:
    """Raise ValueError with a user-facing message when ``K`` cannot be packed at these settings."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    resolve_group_size(k, group_size, packed=True)


def packed_rows(k: int, bits: int) -> int:
    """Rows of ``qweight`` for K input features."""
    return k * bits // 32


def _pack_uniform(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes int [..., K, N] in [0, 2**bits) -> int32 [..., K*bits//32, N] (bits divides 32)."""
    per_word = 32 // bits
    *lead, k, n = codes.shape
    grouped = codes.to(torch.int64).reshape(*lead, k // per_word, per_word, n)
    shifts = torch.arange(per_word, dtype=torch.int64, device=codes.device) * bits
    words = (grouped << shifts.view(per_word, 1)).sum(dim=-2)  # disjoint bits: sum == or
    # Reinterpret the unsigned 32-bit value as int32 (two's complement) for storage.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def _unpack_uniform(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [..., R, N] -> int64 codes [..., R*32//bits, N]."""
    per_word = 32 // bits
    *lead, r, n = words.shape
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per_word, dtype=torch.int64, device=words.device) * bits
    codes = (w.unsqueeze(-2) >> shifts.view(per_word, 1)) & ((1 << bits) - 1)  # [..., R, per_word, N]
    return codes.reshape(*lead, r * per_word, n)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[..., K, N]`` (values in [0, 2**bits)) into ``qweight [..., K*bits//32, N]``."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    k = codes.shape[-2]
    if k % PACK_ALIGN:
        raise ValueError(f"K={k} must be a multiple of {PACK_ALIGN}")
    if bits == 3:
        low = _pack_uniform(codes & 0b11, 2)
        high = _pack_uniform(codes >> 2, 1)
        return torch.cat([low, high], dim=-2)
    return _pack_uniform(codes, bits)


def unpack(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``qweight [..., K*bits//32, N]`` -> int64 codes ``[..., K, N]``."""
    if bits == 3:
        rows = qweight.shape[-2]
        k = rows * 32 // 3
        low = _unpack_uniform(qweight[..., : k // 16, :], 2)
        high = _unpack_uniform(qweight[..., k // 16 :, :], 1)
        return low | (high << 2)
    return _unpack_uniform(qweight, bits)


def zero_points(
    zeros: torch.Tensor | None, scales: torch.Tensor, bits: int
) -> torch.Tensor:
    """Zero points as float ``[..., K//G, N]``; the implicit 2**(bits-1) when ``zeros`` is None."""
    if zeros is None:
        return torch.full_like(scales, float(2 ** (bits - 1)), dtype=torch.float32)
    return zeros.to(torch.float32)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The reference dequantization: packed tensors -> dense ``W [..., N, K]`` in ``dtype``.

    Computed in float32 (``(q - z) * s``) and cast once, so every consumer (runtime, kernels' oracle,
    exporters) gets bit-identical values.
    """
    codes = unpack(qweight, bits).to(torch.float32)  # [..., K, N]
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=-2)  # [..., K, N]
    z = zero_points(zeros, scales, bits).repeat_interleave(group_size, dim=-2)
    return ((codes - z) * s).transpose(-1, -2).contiguous().to(dtype)


def pack_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> PackedWeight:
    """Build a :class:`PackedWeight` from codes in the dense layout ``[N, K]`` (as quantizers produce them).

    ``scales`` and ``zeros`` come in ``[N, K // G]`` (quantizer layout) and are stored transposed.
    """
    n, k = codes.shape[-2:]
    check_packable(k, bits, group_size)
    qweight = pack(codes.transpose(-1, -2).contiguous(), bits)
    s = scales.transpose(-1, -2).contiguous().to(torch.float16)
    z = None if zeros is None else zeros.transpose(-1, -2).contiguous().round().clamp(0, 255).to(torch.uint8)
    return PackedWeight(qweight, s, z, bits, group_size, (n, k))


@dataclass
class PackedProjection:
    """One projection of a stack of experts in one width class, all tensors with a leading E_b axis.

    qweight int32 ``[E_b, K*bits//32, N]``, scales float16 ``[E_b, K//G, N]``, zeros uint8
    ``[E_b, K//G, N]`` or None (symmetric). Same per-matrix layout as :class:`PackedWeight`.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None

    def dequantize(self, bits: int, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> dense ``[E_b, N, K]``."""
        return dequantize(self.qweight, self.scales, self.zeros, bits, group_size, dtype)


@dataclass
class PackedExpertGroup:
    """All experts of one MoE layer that share one bit width (a "width class").

    The canonical expert layout, whatever the source model's layout: ``gate_up`` is ``[2I, H]`` with
    gate rows ``[0, I)`` and up rows ``[I, 2I)`` (for gateless experts just ``[I, H]`` of up rows);
    ``down`` is ``[H, I]``. ``expert_ids`` (int32 ``[E_b]``, ascending) are the layer's expert indices
    in this class. A layer with mixed widths has one group per width; the Triton grouped kernel runs
    one launch per group. Biases (GPT-OSS) stay unquantized on the module, not here.
    """

    bits: int
    group_size: int  # group size of gate_up (K = H)
    expert_ids: torch.Tensor
    gate_up: PackedProjection
    down: PackedProjection
    down_group_size: int | None = None  # group size of down (K = I); None: the same as gate_up

    @property
    def down_group(self) -> int:
        return self.group_size if self.down_group_size is None else self.down_group_size
