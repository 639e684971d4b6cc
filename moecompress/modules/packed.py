"""Runtime modules that hold packed weights and compute with them (never dequantized to a dense copy).

* :class:`PackedExperts` replaces a family's fused experts module: same forward signature
  ``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``; each expert may have its
  own width; experts of one width form a width class stored as stacked buffers (format.py's
  :class:`PackedExpertGroup`), plus optional unquantized experts (width 16, super experts kept).
* :class:`PackedLinear` replaces an ``nn.Linear`` (attention, shared experts).

Both call ``moecompress.kernels``, which picks Triton on CUDA and the pure-torch reference elsewhere.
Buffer names are the checkpoint names of the native format (``w4_gate_up_qweight`` ...), so
``from_pretrained`` fills them directly.

Shape legend: T tokens, E experts, H hidden, I expert intermediate size, k top-k.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from moecompress.quant import format as fmt

UNQUANTIZED = fmt.UNQUANTIZED_BITS  # width recorded for experts kept in full precision


@dataclass(frozen=True)
class ExpertsSpec:
    """Everything needed to build an empty :class:`PackedExperts` (serialised in the quantization config)."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    bits: tuple[int, ...]  # per expert; 16 = unquantized
    group_size: int
    symmetric: bool
    has_gate: bool = True
    has_bias: bool = False
    activation: str = "silu"  # the kernels' name (kernels.moe_gemm.ACTIVATION_CODES): silu | gelu | gelu_tanh | relu | gpt_oss
    act_params: tuple[tuple[str, float], ...] = ()

    def group_for(self, k: int) -> int:
        """The group length G for a projection with K inputs (``format.resolve_group_size``: the one rule)."""
        return fmt.resolve_group_size(k, self.group_size)

    def as_json(self) -> dict:
        return {
            "num_experts": self.num_experts,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "bits": list(self.bits),
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "has_gate": self.has_gate,
            "has_bias": self.has_bias,
            "activation": self.activation,
            "act_params": dict(self.act_params),
        }

    @classmethod
    def from_json(cls, d: dict) -> "ExpertsSpec":
        d = dict(d)
        d["bits"] = tuple(d["bits"])
        d["act_params"] = tuple(sorted(d.get("act_params", {}).items()))
        return cls(**d)


class PackedExperts(nn.Module):
    """Routed experts of one layer in the packed format, any width per expert."""

    def __init__(self, spec: ExpertsSpec, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.spec = spec
        self.compute_dtype = dtype
        self._dequantized: dict | None = None  # see reuse_dequantized
        h, i, e = spec.hidden_size, spec.intermediate_size, spec.num_experts
        n_in = 2 * i if spec.has_gate else i  # rows of the fused input projection
        for bits in self.widths:
            ids = [x for x in range(e) if spec.bits[x] == bits]
            self.register_buffer(f"w{bits}_expert_ids", torch.tensor(ids, dtype=torch.int32))
            if bits == UNQUANTIZED:
                self.register_buffer(f"w{bits}_gate_up", torch.zeros(len(ids), n_in, h, dtype=dtype))
                self.register_buffer(f"w{bits}_down", torch.zeros(len(ids), h, i, dtype=dtype))
                continue
            for proj, (n, k) in (("gate_up", (n_in, h)), ("down", (h, i))):
                g = spec.group_for(k)
                # format.py's shapes: K padded to 32 in qweight, ceil(K / G) groups; the true K is the spec's.
                rows, groups = fmt.packed_rows(k, bits), fmt.num_groups(k, g)
                self.register_buffer(f"w{bits}_{proj}_qweight", torch.zeros(len(ids), rows, n, dtype=torch.int32))
                self.register_buffer(f"w{bits}_{proj}_scales", torch.zeros(len(ids), groups, n, dtype=torch.float16))
                if not spec.symmetric:
                    self.register_buffer(f"w{bits}_{proj}_zeros", torch.zeros(len(ids), groups, n, dtype=torch.uint8))
        if spec.has_bias:
            self.register_buffer("gate_up_bias", torch.zeros(e, n_in, dtype=dtype))
            self.register_buffer("down_bias", torch.zeros(e, h, dtype=dtype))

    @property
    def widths(self) -> list[int]:
        return sorted(set(self.spec.bits))

    @contextmanager
    def reuse_dequantized(self) -> Iterator[None]:
        """Inside, the torch reference path dequantizes each expert once and reuses it on every call
        (the calibration re-run of a layer: 16 batches would dequantize every expert 16 times); the
        outputs are the same. Costs one float32 copy of the experts, about what the layer held before
        quantization; dropped on exit."""
        self._dequantized = {}
        try:
            yield
        finally:
            self._dequantized = None

    def packed_groups(self) -> list[fmt.PackedExpertGroup]:
        """The quantized width classes as format.py groups (views of this module's buffers)."""
        groups = []
        for bits in self.widths:
            if bits == UNQUANTIZED:
                continue

            def proj(name: str, k: int) -> fmt.PackedProjection:
                return fmt.PackedProjection(
                    getattr(self, f"w{bits}_{name}_qweight"),
                    getattr(self, f"w{bits}_{name}_scales"),
                    getattr(self, f"w{bits}_{name}_zeros", None),
                    k,
                )

            groups.append(
                fmt.PackedExpertGroup(
                    bits=bits,
                    group_size=self.spec.group_for(self.spec.hidden_size),
                    down_group_size=self.spec.group_for(self.spec.intermediate_size),
                    expert_ids=getattr(self, f"w{bits}_expert_ids"),
                    gate_up=proj("gate_up", self.spec.hidden_size),
                    down=proj("down", self.spec.intermediate_size),
                )
            )
        return groups

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        from moecompress.kernels import moe_experts_dispatch

        x = hidden_states
        out = torch.zeros(x.shape[0], self.spec.hidden_size, dtype=torch.float32, device=x.device)
        groups = self.packed_groups()
        if groups:
            out += moe_experts_dispatch(
                x,
                top_k_index,
                top_k_weights,
                groups,
                num_experts=self.spec.num_experts,
                activation=self.spec.activation,
                gate_up_bias=getattr(self, "gate_up_bias", None),
                down_bias=getattr(self, "down_bias", None),
                act_params=dict(self.spec.act_params),
                dequantized=self._dequantized,
            ).float()
        if UNQUANTIZED in self.spec.bits:
            out += self._dense_experts(x, top_k_index, top_k_weights)
        return out.to(x.dtype)

    def _dense_experts(self, x, top_k_index, top_k_weights) -> torch.Tensor:
        """Experts kept in full precision (super experts with --super-experts keep)."""
        from moecompress.kernels.moe_gemm import MoeLayerDims, apply_expert_activation, canonical_activation

        params = dict(self.spec.act_params)
        dims = MoeLayerDims(
            self.spec.hidden_size, self.spec.intermediate_size, self.spec.has_gate,
            canonical_activation(self.spec.activation), params.get("alpha", 1.702), params.get("limit", 7.0),
        )
        out = torch.zeros(x.shape[0], self.spec.hidden_size, dtype=torch.float32, device=x.device)
        ids = getattr(self, f"w{UNQUANTIZED}_expert_ids").tolist()
        for slot, e in enumerate(ids):
            token, pos = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            h = x[token].float() @ getattr(self, f"w{UNQUANTIZED}_gate_up")[slot].float().t()
            if self.spec.has_bias:
                h = h + self.gate_up_bias[e].float()
            a = apply_expert_activation(h, dims)
            y = a @ getattr(self, f"w{UNQUANTIZED}_down")[slot].float().t()
            if self.spec.has_bias:
                y = y + self.down_bias[e].float()
            out.index_add_(0, token, y * top_k_weights[token, pos, None].float())
        return out

    def packed_nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())


class PackedLinear(nn.Module):
    """An ``nn.Linear`` replaced by one packed weight (format.py's :class:`PackedWeight`)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, symmetric: bool, bias: bool, dtype=torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.symmetric = bits, symmetric
        self.group_size = fmt.resolve_group_size(in_features, group_size)
        rows, groups = fmt.packed_rows(in_features, bits), fmt.num_groups(in_features, self.group_size)
        self.register_buffer("qweight", torch.zeros(rows, out_features, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        if not symmetric:
            self.register_buffer("zeros", torch.zeros(groups, out_features, dtype=torch.uint8))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=dtype))
        else:
            self.bias = None

    @classmethod
    def from_packed(cls, packed: fmt.PackedWeight, bias: torch.Tensor | None, dtype) -> "PackedLinear":
        n, k = packed.shape
        m = cls(k, n, packed.bits, packed.group_size, packed.symmetric, bias is not None, dtype)
        m.qweight.copy_(packed.qweight)
        m.scales.copy_(packed.scales)
        if packed.zeros is not None:
            m.zeros.copy_(packed.zeros)
        if bias is not None:
            m.bias.copy_(bias)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from moecompress.kernels import dequant_gemm_dispatch

        shape = x.shape
        if shape[-1] != self.in_features:  # the kernels take K from x: qweight only bounds it (padded rows)
            raise ValueError(f"input has {shape[-1]} features, this packed linear takes {self.in_features}")
        y = dequant_gemm_dispatch(
            x.reshape(-1, shape[-1]), self.qweight, self.scales, getattr(self, "zeros", None), self.bits, self.group_size, self.bias
        )
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group={self.group_size}"
