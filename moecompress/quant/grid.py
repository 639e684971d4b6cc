"""The quantization grid: specs, scales/zeros, codes, round-to-nearest.

Shape legend: N out features, K in features, G group size along K (``G == K`` per-channel),
``ng = ceil(K / G)`` groups per row, the last one partial when G does not divide K (the packed
format's rule, :mod:`moecompress.quant.format`: groups are columns ``[j*G, min((j+1)*G, K))``). Every function accepts leading batch dimensions ``[..., N, K]`` (a stack
of experts ``[E, N, K]`` quantizes in one call); the GPTQ solver uses them on plain ``[N, K]``.

Grid conventions (chosen to match :mod:`moecompress.quant.format`, compressed-tensors and GPTQ):

* ``maxq = 2**bits - 1``; codes ``q`` are integers in ``[0, maxq]``; ``w_hat = (q - z) * s``.
* Symmetric: ``z = 2**(bits-1)`` implicit (format.py stores no zeros), ``s = 2 * max|w| / maxq``
  (the GPTQ / compressed-tensors convention). ``w / s`` spans ``[-maxq/2, maxq/2]``, so codes use the
  whole range ``q - z in [-2**(bits-1), 2**(bits-1) - 1]``; only the very largest positive weight of
  a group loses half a step to the clamp.
* Asymmetric: the range ``[min(w, 0), max(w, 0)]`` (zero always representable, as GPTQ does),
  ``s = (max - min) / maxq``, ``z = round(-min / s)`` clamped to ``[0, maxq]`` (integer-valued float32).
* Scales are rounded through float16 before anything uses them, floored at the float16 normal
  minimum ``2**-14`` (all-zero groups never give a zero, subnormal or NaN scale) and capped at the
  float16 maximum. Because the packed format stores scales as float16 and zeros as uint8, the
  in-memory dequantized weight equals ``format.dequantize(pack(...))`` bit for bit.
* A partial last group is computed as a full group zero-padded to G columns. The padding changes
  nothing: zero is always inside the group's range (symmetric ``max|w|``, asymmetric
  ``[min(w, 0), max(w, 0)]``), and a zero weight rounds to code z, so its error is exactly 0 in the
  clip search too. Codes of the padding are dropped before anything returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moecompress.errors import MoeCompressError
from moecompress.quant import format as fmt

SCALE_MIN = 2.0**-14  # float16 smallest normal: no subnormal, zero or NaN scales ever
SCALE_MAX = 65504.0  # float16 largest finite
CLIP_SHRINKS = 51  # clip search tries shrink factors 1.00, 0.99, ..., 0.50
CLIP_NORM = 2.4  # error exponent of the clip search, as GPTQ's `mse` option (MoEQuant uses it)


@dataclass(frozen=True)
class QuantSpec:
    """How one weight matrix is quantized.

    bits: 2, 3, 4 or 8. group_size: G along K, or -1 for per-channel (G = K). symmetric: implicit
    zero point 2**(bits-1) (no zeros stored). clip_search: per-group search over range shrink
    factors 1.0 .. 0.5 minimising the rounding error (GPTQ's ``mse`` option, MoEQuant's MSE clip).
    """

    bits: int
    group_size: int = 128
    symmetric: bool = True
    clip_search: bool = False

    def __post_init__(self) -> None:
        # K-independent checks fail at construction so a bad config is caught before any work.
        if self.bits not in fmt.SUPPORTED_BITS:
            raise MoeCompressError(f"bits must be one of {fmt.SUPPORTED_BITS}, got {self.bits}; pick a supported width")
        problem = fmt.group_size_problem(None, self.group_size)
        if problem is not None:
            raise MoeCompressError(problem)

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def resolved_group(self, k: int) -> int:
        """The group length G for an input dimension K (K itself when per-channel)."""
        return k if self.group_size == fmt.PER_CHANNEL else self.group_size

    def groups(self, k: int) -> int:
        """Number of groups ceil(K / G) per row (the last one partial when G does not divide K)."""
        return fmt.num_groups(k, self.resolved_group(k))

    def validate(self, k: int, packable: bool = False) -> None:
        """Raise MoeCompressError when a matrix with K inputs cannot be quantized with this spec.

        Checks bits and the group-size rule (``format.group_size_problem``: -1 or 1 <= G <= K). The
        grid and the packed format share that rule (every K packs), so what passes here packs:
        ``packable`` is accepted for the callers that say so and changes nothing. Call it before a
        long calibration whose result will be packed, so the error comes first.
        """
        if self.bits not in fmt.SUPPORTED_BITS:
            raise MoeCompressError(f"bits must be one of {fmt.SUPPORTED_BITS}, got {self.bits}")
        problem = fmt.group_size_problem(k, self.group_size)
        if problem is not None:
            raise MoeCompressError(problem)


def _split_groups(w: torch.Tensor, g: int) -> torch.Tensor:
    """``[..., N, K]`` -> ``[..., N, ng, G]``, a partial last group zero-padded (a view when G divides K)."""
    k = w.shape[-1]
    ng = fmt.num_groups(k, g)
    if ng * g != k:
        w = torch.nn.functional.pad(w, (0, ng * g - k))
    return w.reshape(*w.shape[:-1], ng, g)


def _merge_groups(wg: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`_split_groups`: ``[..., N, ng, G]`` -> ``[..., N, K]`` (padding dropped)."""
    flat = wg.reshape(*wg.shape[:-2], -1)
    return flat if flat.shape[-1] == k else flat[..., :k].contiguous()


def _round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Clamp to the float16 normal range and round through float16, so packing loses nothing."""
    return scale.clamp(SCALE_MIN, SCALE_MAX).to(torch.float16).to(torch.float32)


def _qparams_from_range(
    wmin: torch.Tensor, wmax: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-group range ``[..., N, ng]`` -> (scales, zeros or None), same shape, float32."""
    if spec.symmetric:
        amax = torch.maximum(wmin.abs(), wmax.abs())
        return _round_scale(2.0 * amax / spec.maxq), None
    lo = wmin.clamp(max=0.0)  # zero must be exactly representable (padding, ReLU-like inputs)
    hi = wmax.clamp(min=0.0)
    scales = _round_scale((hi - lo) / spec.maxq)
    zeros = torch.round(-lo / scales).clamp(0, spec.maxq)
    return scales, zeros


def _zero_or_mid(zeros: torch.Tensor | None, scales: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Zero points as float32 ``[..., N, ng]``; the implicit 2**(bits-1) when symmetric."""
    if zeros is None:
        return torch.full_like(scales, float(2 ** (spec.bits - 1)))
    return zeros.to(torch.float32)


def _group_codes(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, maxq: int) -> torch.Tensor:
    """Grouped weights ``[..., N, ng, G]``, s and z ``[..., N, ng, 1]`` -> float codes, same shape."""
    return torch.clamp(torch.round(wg / s) + z, 0, maxq)


def _clip_searched_qparams(
    wg: torch.Tensor, spec: QuantSpec
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per group, keep the shrink factor of the range with the smallest sum |w_hat - w|^CLIP_NORM.

    wg: ``[..., N, ng, G]`` float32 (a partial last group zero-padded: padding has zero error). Candidates are judged with the float16-rounded scales they
    would really get. Ties keep the larger range (first candidate), so the result is deterministic.
    """
    wmin, wmax = wg.amin(dim=-1), wg.amax(dim=-1)
    best_err = torch.full_like(wmin, float("inf"))
    best_s = torch.empty_like(wmin)
    best_z = None if spec.symmetric else torch.empty_like(wmin)
    for i in range(CLIP_SHRINKS):
        shrink = 1.0 - i / 100.0
        s, z = _qparams_from_range(wmin * shrink, wmax * shrink, spec)
        zf = _zero_or_mid(z, s, spec).unsqueeze(-1)
        q = _group_codes(wg, s.unsqueeze(-1), zf, spec.maxq)
        err = ((q - zf) * s.unsqueeze(-1) - wg).abs_().pow_(CLIP_NORM).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        if best_z is not None:
            best_z = torch.where(better, z, best_z)
    return best_s, best_z


def compute_qparams(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Group-wise scales and zeros for ``w [..., N, K]``.

    Returns ``scales [..., N, ng]`` float32 (exactly representable in float16, >= 2**-14) and
    ``zeros [..., N, ng]`` float32 integer-valued in ``[0, 2**bits - 1]``, or None when symmetric.
    """
    k = w.shape[-1]
    spec.validate(k)
    wg = _split_groups(w.to(torch.float32), spec.resolved_group(k))
    if spec.clip_search:
        return _clip_searched_qparams(wg, spec)
    return _qparams_from_range(wg.amin(dim=-1), wg.amax(dim=-1), spec)


def quantize_to_codes(
    w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """``w [..., N, K]`` on the grid (scales/zeros ``[..., N, ng]``) -> codes int64 ``[..., N, K]``."""
    k = w.shape[-1]
    wg = _split_groups(w.to(torch.float32), spec.resolved_group(k))
    z = _zero_or_mid(zeros, scales, spec).unsqueeze(-1)
    codes = _group_codes(wg, scales.to(torch.float32).unsqueeze(-1), z, spec.maxq)
    return _merge_groups(codes, k).to(torch.int64)


def dequantize_codes(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, spec: QuantSpec
) -> torch.Tensor:
    """codes ``[..., N, K]`` -> float32 ``[..., N, K]``: ``(q - z) * s`` in float32, as format.dequantize."""
    k = codes.shape[-1]
    qg = _split_groups(codes.to(torch.float32), spec.resolved_group(k))
    z = _zero_or_mid(zeros, scales, spec).unsqueeze(-1)
    return _merge_groups((qg - z) * scales.to(torch.float32).unsqueeze(-1), k)


@dataclass
class QuantResult:
    """A quantized matrix in the quantizer layout.

    codes int64 ``[..., N, K]`` in ``[0, 2**bits)``; scales float32 ``[..., N, ng]`` (float16-exact);
    zeros float32 ``[..., N, ng]`` integer-valued, or None when symmetric.
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    spec: QuantSpec

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dense ``[..., N, K]`` in ``dtype``, bit-identical to ``format.dequantize(self.packed())``."""
        return dequantize_codes(self.codes, self.scales, self.zeros, self.spec).to(dtype)

    def packed(self) -> fmt.PackedWeight:
        """The packed-format tensors (``format.pack_weight``; any K, padded to a multiple of 32)."""
        k = self.codes.shape[-1]
        self.spec.validate(k, packable=True)
        return fmt.pack_weight(self.codes, self.scales, self.zeros, self.spec.bits, self.spec.resolved_group(k))


def check_finite_weight(w: torch.Tensor) -> None:
    """Raise MoeCompressError when a weight holds NaN or Inf (quantizing it would spread garbage)."""
    if not torch.isfinite(w).all():
        raise MoeCompressError("weight contains NaN or Inf values; fix the checkpoint before quantizing it")


def rtn(w: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Round-to-nearest quantization of ``w [..., N, K]`` (any float dtype; math in float32)."""
    check_finite_weight(w)
    scales, zeros = compute_qparams(w, spec)
    return QuantResult(quantize_to_codes(w, scales, zeros, spec), scales, zeros, spec)
