"""The packed weight format, defined once.

Everything that stores or reads quantized weights imports this module: the quantizer (to pack),
the native checkpoint writer, the packed runtime modules (torch reference path), the Triton kernels
(`moecompress.kernels`), and the compressed-tensors exporter (which repacks from `unpack`).

Format ``PackFormat.KPACK_V2`` (``"kpack-v2"``, what moecompress writes) for one weight matrix ``W`` of
shape ``[N, K]`` (``nn.Linear`` layout: N output features, K input features, any ``K >= 1``), quantized
group-wise along K with group length ``G`` (``1 <= G <= K``; ``G == K`` means per-channel). Two derived
lengths::

    Kp = ceil(K / 32) * 32     K padded up to PACK_ALIGN (one int32 word of 1-bit codes)
    ng = ceil(K / G)           groups per row: columns [j*G, min((j+1)*G, K)); the LAST group holds
                               K - (ng - 1) * G columns (partial when G does not divide K)

==========  ============================  =======  =================================================
tensor      shape                         dtype    meaning
==========  ============================  =======  =================================================
qweight     ``[Kp * bits // 32, N]``      int32    integer codes q in [0, 2**bits), packed along K,
                                                   N contiguous (the layout kernels read fastest);
                                                   the codes of padding rows k in [K, Kp) are 0 bits
scales      ``[ng, N]``                   float16  one scale per (group, output column)
zeros       ``[ng, N]``                   uint8    zero point per (group, column); ABSENT for
                                                   symmetric quantization, where z = 2**(bits-1)
==========  ============================  =======  =================================================

Dequantization, for ``k < K`` only: ``W[n, k] = (q[k, n] - z[k // G, n]) * s[k // G, n]``. Padding rows
``k >= K`` are no part of W: the torch readers slice the unpacked codes to K (:func:`unpack`,
:func:`dequantize` with ``k``); the Triton kernels mask ``k >= K`` (x is never read there, it loads
as 0, and neither are the codes, so the weight there is the finite ``-z * s``: 0 times finite), so
padding contributes exactly nothing. Padding is written as 0 bits so packing is deterministic
(byte-identical outputs).

The true K cannot be read back from the tensors (qweight rows give Kp, scales rows ceil(K/G)), so it is
recorded beside them, once per module: in the checkpoint's ``quantization_config.modules`` entry
(``in_features`` of a ``linear``; ``hidden_size`` / ``intermediate_size`` of ``experts``: K of gate_up is
H, K of down is I), and in memory in :attr:`PackedWeight.shape` and :attr:`PackedProjection.k`. Those
config fields already existed (the loader builds every packed buffer from them on ``meta`` before any
tensor is read), so no new key or shape tensor is needed, and nothing stored can disagree with them.

``kpack-v1`` (written before kpack-v2 existed) is the special case ``K % 32 == 0`` and ``G | K``:
``Kp = K``, ``ng = K / G``, byte for byte the same tensors, so every kpack-v1 checkpoint is read as
kpack-v2 unchanged (the config's ``format`` names the writer's version; :data:`READABLE_FORMATS`).
Functions here that take an optional ``k`` read ``k=None`` as "K = Kp" (kpack-v1 data).

Group sizes (one rule, :func:`group_size_problem`, which every check in moecompress calls): -1
(per-channel) or ``1 <= G <= K``; a group longer than the row is refused, never silently read as
per-channel. Exports that need whole groups (compressed-tensors: its group quantization requires
``K % G == 0``) ask the same rule with ``whole_groups=True``. Refusals always suggest sizes that pass.

Bit layout of ``qweight`` (over the Kp padded codes, Kp a multiple of 32):

* bits 2, 4, 8: ``32 // bits`` codes per int32; code k sits in row ``k // (32 // bits)`` at bit offset
  ``(k % (32 // bits)) * bits``.
* bits 3: two bit-planes stacked along rows: rows ``[0, Kp // 16)`` hold the low two bits of every
  code packed exactly as 2-bit codes; rows ``[Kp // 16, Kp // 16 + Kp // 32)`` hold the high bit packed
  as 1-bit codes (32 per int32). Bit-planes keep every plane aligned to int32 words, so kernels never
  read a code split across two words.

Every function here accepts leading batch dimensions (``[..., Kp*bits//32, N]``), so a stack of
experts ``[E, ...]`` packs and unpacks in one call.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

SUPPORTED_BITS = (2, 3, 4, 8)
UNQUANTIZED_BITS = 16  # the width recorded for an expert kept in full precision (no codes, no scales)
PACK_ALIGN = 32  # K is padded up to a multiple of this: one int32 word of 1-bit codes
PER_CHANNEL = -1  # group_size meaning one group per row (G = K)
# Group sizes that are multiples of this also run on the Triton kernels (one K step reads one scale
# row, and tl.dot needs K steps >= 16: moecompress.kernels.launch_utils); preferred in suggestions.
KERNEL_GROUP_MULTIPLE = 16
# Why an export may need whole groups (``group_size_problem(..., whole_groups=True)``).
WHOLE_GROUPS_REASON = "the compressed-tensors format needs whole groups"


class PackFormat(str, enum.Enum):
    """Packing formats understood by moecompress; new ones get a new member.

    KPACK_V2 is what moecompress writes; KPACK_V1 (K % 32 == 0, G | K) is its special case, read
    unchanged (the module docstring)."""

    KPACK_V1 = "kpack-v1"
    KPACK_V2 = "kpack-v2"


CURRENT_FORMAT = PackFormat.KPACK_V2.value
READABLE_FORMATS = (PackFormat.KPACK_V1.value, PackFormat.KPACK_V2.value)


def check_readable_format(name: str | None) -> None:
    """ValueError unless ``name`` (a checkpoint's ``quantization_config.format``) is a format this
    version reads; None (no field) is read as kpack-v1."""
    if name is not None and name not in READABLE_FORMATS:
        raise ValueError(
            f"packing format {name!r} is not one this moecompress reads ({', '.join(READABLE_FORMATS)}); "
            "upgrade moecompress or re-run the command that wrote the checkpoint"
        )


@dataclass
class PackedWeight:
    """One packed matrix ``W [N, K]`` (see the module docstring for every tensor's shape)."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int
    shape: tuple[int, int]  # (N, K) of the dense weight: the true K (qweight holds padded_k(K) rows)

    @property
    def symmetric(self) -> bool:
        return self.zeros is None

    def nbytes(self) -> int:
        total = self.qweight.numel() * 4 + self.scales.numel() * 2
        return total + (self.zeros.numel() if self.zeros is not None else 0)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, dtype, k=self.shape[1])


# --------------------------------------------------------------------------------------------------
# Derived lengths
# --------------------------------------------------------------------------------------------------


def padded_k(k: int) -> int:
    """Kp: K rounded up to a multiple of :data:`PACK_ALIGN` (the codes qweight holds)."""
    return -(-k // PACK_ALIGN) * PACK_ALIGN


def num_groups(k: int, group_size: int) -> int:
    """ng = ceil(K / G): rows of scales / zeros (G = ``group_size``, -1 per-channel: one group)."""
    return 1 if group_size == PER_CHANNEL else -(-k // group_size)


def packed_rows(k: int, bits: int) -> int:
    """Rows of ``qweight`` for K input features: ``padded_k(K) * bits // 32``."""
    return padded_k(k) * bits // 32


# --------------------------------------------------------------------------------------------------
# The group-size rule (every check in moecompress calls group_size_problem)
# --------------------------------------------------------------------------------------------------


def _divisors(k: int) -> list[int]:
    return sorted({d for i in range(1, math.isqrt(k) + 1) if k % i == 0 for d in (i, k // i)})


def dividing_group_sizes(k: int, near: int | None = None, count: int = 4) -> list[int]:
    """Up to ``count`` group sizes that divide K, ascending, the ones closest to ``near`` (a wanted size).

    Multiples of :data:`KERNEL_GROUP_MULTIPLE` (which the Triton kernels also run) when K has any, else
    any divisor above 1, else K itself. Every one passes :func:`group_size_problem` for K, with or
    without ``whole_groups``.
    """
    divisors = _divisors(k)
    pool = [d for d in divisors if d % KERNEL_GROUP_MULTIPLE == 0] or [d for d in divisors if d > 1] or [k]
    if near is not None and near > 0:
        pool = sorted(pool, key=lambda d: (abs(d - near) / min(d, near), -d))
    else:
        pool = sorted(pool, reverse=True)
    return sorted(pool[:count])


def _listed(sizes: list[int]) -> str:
    return ", ".join(str(s) for s in sizes[:-1]) + (" or " if len(sizes) > 1 else "") + str(sizes[-1])


def group_size_problem(k: int | Iterable[int] | None, group_size, whole_groups: bool = False) -> str | None:
    """THE group-size rule: None when ``group_size`` is valid for input dimension K, else the reason.

    Valid: ``group_size`` is -1 (:data:`PER_CHANNEL`, one group per row, G = K) or an integer
    ``1 <= G <= K``; when G does not divide K the last group is partial (kpack-v2, the module
    docstring). With ``whole_groups`` (what a compressed-tensors export needs) G must also divide K.
    ``k`` may be several input dimensions (one model's H and I, ...): G must then suit every one, and
    the sizes suggested suit every one. ``k=None`` checks only what does not depend on K. A refusal
    always names sizes that pass this same check (:func:`suggested_group_sizes`) and -1.
    """
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size <= 0 and group_size != PER_CHANNEL):
        return f"group_size must be a positive group length or {PER_CHANNEL} (per-channel), got {group_size!r}"
    if k is None:
        return None
    ks = [k] if isinstance(k, int) else list(dict.fromkeys(k))  # order kept: the first refused one is named
    if not ks:
        return None
    for dim in ks:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            return f"input dimension must be a positive integer, got {dim!r}"
    if group_size == PER_CHANNEL:
        return None
    for dim in ks:
        if group_size > dim:
            reason = f"group size {group_size} is longer than the input dimension {dim} (a group never spans two rows)"
            break
        if whole_groups and dim % group_size:
            reason = f"group size {group_size} does not divide the input dimension {dim} ({WHOLE_GROUPS_REASON})"
            break
    else:
        return None
    sizes, which = suggested_group_sizes(ks, group_size, whole_groups)
    dims = ", ".join(str(d) for d in sorted(ks))
    return f"{reason}; use {_listed(sizes)} ({which} {dims}) or {PER_CHANNEL} (per-channel)"


def suggested_group_sizes(ks: list[int], near: int, whole_groups: bool) -> tuple[list[int], str]:
    """(sizes, how they relate to the dimensions: "dividing" or "at most the smallest of") that pass
    :func:`group_size_problem` for every K in ``ks``; multiples of :data:`KERNEL_GROUP_MULTIPLE` first.

    Sizes dividing every K are preferred (no partial group, exportable to compressed-tensors); without
    ``whole_groups`` and when the common divisor has no kernel-friendly divisor, kernel-friendly sizes
    up to the smallest K (the last group of a row partial) are offered instead.
    """
    common = math.gcd(*ks)
    if whole_groups or any(d % KERNEL_GROUP_MULTIPLE == 0 for d in _divisors(common)) or min(ks) < KERNEL_GROUP_MULTIPLE:
        return dividing_group_sizes(common, near=near), "dividing"
    pool = list(range(KERNEL_GROUP_MULTIPLE, min(ks) + 1, KERNEL_GROUP_MULTIPLE))
    pool = sorted(pool, key=lambda d: (abs(d - near) / min(d, near), -d))[:4]
    return sorted(pool), "at most the smallest of"


def resolve_group_size(k: int, group_size: int, whole_groups: bool = False) -> int:
    """The group length G used for input dimension K (K itself for per-channel); ValueError when the
    rule (:func:`group_size_problem`) refuses it."""
    problem = group_size_problem(k, group_size, whole_groups)
    if problem is not None:
        raise ValueError(problem)
    return k if group_size == PER_CHANNEL else group_size


def check_packable(k: int, bits: int, group_size: int) -> None:
    """Raise ValueError with a user-facing message when ``K`` cannot be packed at these settings."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    resolve_group_size(k, group_size)


# --------------------------------------------------------------------------------------------------
# Packing
# --------------------------------------------------------------------------------------------------


def _pack_uniform(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes int [..., K, N] in [0, 2**bits) -> int32 [..., K*bits//32, N] (bits divides 32, K % 32 == 0)."""
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
    """Pack integer codes ``[..., K, N]`` (values in [0, 2**bits)) into ``qweight [..., Kp*bits//32, N]``.

    Any K >= 1: rows ``[K, Kp)`` are padded with 0 codes (the module docstring)."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    k = codes.shape[-2]
    if k < 1:
        raise ValueError(f"cannot pack K={k} input features; K must be at least 1")
    if padded_k(k) != k:
        codes = torch.nn.functional.pad(codes, (0, 0, 0, padded_k(k) - k))  # zero rows [K, Kp)
    if bits == 3:
        low = _pack_uniform(codes & 0b11, 2)
        high = _pack_uniform(codes >> 2, 1)
        return torch.cat([low, high], dim=-2)
    return _pack_uniform(codes, bits)


def unpack(qweight: torch.Tensor, bits: int, k: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack`: ``qweight [..., Kp*bits//32, N]`` -> int64 codes ``[..., K, N]``.

    ``k``: the true K (padding rows dropped); None returns all Kp rows (kpack-v1: K = Kp)."""
    rows = qweight.shape[-2]
    if k is not None and packed_rows(k, bits) != rows:
        raise ValueError(f"K={k} packs to {packed_rows(k, bits)} qweight rows at {bits} bits, but qweight has {rows}")
    if bits == 3:
        kp = rows * 32 // 3
        low = _unpack_uniform(qweight[..., : kp // 16, :], 2)
        high = _unpack_uniform(qweight[..., kp // 16 :, :], 1)
        codes = low | (high << 2)
    else:
        codes = _unpack_uniform(qweight, bits)
    return codes if k is None or k == codes.shape[-2] else codes[..., :k, :]


def zero_points(
    zeros: torch.Tensor | None, scales: torch.Tensor, bits: int
) -> torch.Tensor:
    """Zero points as float ``[..., ng, N]``; the implicit 2**(bits-1) when ``zeros`` is None."""
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
    k: int | None = None,
) -> torch.Tensor:
    """The reference dequantization: packed tensors -> dense ``W [..., N, K]`` in ``dtype``.

    ``group_size`` is the group length G; ``k`` the true K (None: K = Kp, kpack-v1 data). Computed in
    float32 (``(q - z) * s``) and cast once, so every consumer (runtime, kernels' oracle, exporters)
    gets bit-identical values. Padding rows are dropped before anything reads them.
    """
    codes = unpack(qweight, bits, k).to(torch.float32)  # [..., K, N]
    hint = " (K was read from qweight's rows: pass the true K of a padded weight as k)" if k is None else ""
    k = codes.shape[-2]
    if scales.shape[-2] != num_groups(k, group_size):
        raise ValueError(
            f"scales have {scales.shape[-2]} group rows; K={k} in groups of {group_size} needs {num_groups(k, group_size)}{hint}"
        )
    s = scales.to(torch.float32).repeat_interleave(group_size, dim=-2)[..., :k, :]  # [..., K, N]
    z = zero_points(zeros, scales, bits).repeat_interleave(group_size, dim=-2)[..., :k, :]
    return ((codes - z) * s).transpose(-1, -2).contiguous().to(dtype)


def pack_weight(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> PackedWeight:
    """Build a :class:`PackedWeight` from codes in the dense layout ``[N, K]`` (as quantizers produce them).

    ``scales`` and ``zeros`` come in ``[N, ng]`` (quantizer layout, ng = ceil(K / G)) and are stored
    transposed. ``group_size`` is the group length G (or -1: per-channel).
    """
    n, k = codes.shape[-2:]
    check_packable(k, bits, group_size)
    g = resolve_group_size(k, group_size)
    if scales.shape[-1] != num_groups(k, g):
        raise ValueError(f"scales have {scales.shape[-1]} groups per row; K={k} in groups of {g} needs {num_groups(k, g)}")
    qweight = pack(codes.transpose(-1, -2).contiguous(), bits)
    s = scales.transpose(-1, -2).contiguous().to(torch.float16)
    z = None if zeros is None else zeros.transpose(-1, -2).contiguous().round().clamp(0, 255).to(torch.uint8)
    return PackedWeight(qweight, s, z, bits, g, (n, k))


@dataclass
class PackedProjection:
    """One projection of a stack of experts in one width class, all tensors with a leading E_b axis.

    qweight int32 ``[E_b, Kp*bits//32, N]``, scales float16 ``[E_b, ng, N]``, zeros uint8
    ``[E_b, ng, N]`` or None (symmetric). Same per-matrix layout as :class:`PackedWeight`. ``k`` is the
    true K (gate_up: H, down: I); None reads K from qweight's rows (kpack-v1: K = Kp).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    k: int | None = None

    def dequantize(self, bits: int, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """-> dense ``[E_b, N, K]``."""
        return dequantize(self.qweight, self.scales, self.zeros, bits, group_size, dtype, k=self.k)


@dataclass
class PackedExpertGroup:
    """All experts of one MoE layer that share one bit width (a "width class").

    The canonical expert layout, whatever the source model's layout: ``gate_up`` is ``[2I, H]`` with
    gate rows ``[0, I)`` and up rows ``[I, 2I)`` (for gateless experts just ``[I, H]`` of up rows);
    ``down`` is ``[H, I]``. ``expert_ids`` (int32 ``[E_b]``, ascending) are the layer's expert indices
    in this class. A layer with mixed widths has one group per width; the Triton grouped kernel runs
    one launch per group. Biases (GPT-OSS) stay unquantized on the module, not here. ``gate_up.k`` is
    H and ``down.k`` is I (needed when either is not a multiple of 32: qweight holds padded rows).
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
