"""Rounding a rewritten layer to the checkpoint's dtype, as writing and reading it back would.

A prune or merge computes its new experts in float32 (DERN's recombined neurons, merged averages, the
refit's down projections) and its own checkpoint stores them in the source's dtype (bfloat16 for most
models). When a pipeline runs the quantizer in the same sweep instead of reading that checkpoint
(:mod:`moecompress.pipeline.run`), this pass, placed after the rewrite, makes the quantizer see the
weights it would have read: the fused pipeline writes the same bytes as the two passes one after the
other (when the rewrite needs no activations; see ``docs/ARCHITECTURE.md``).
"""

from __future__ import annotations

import torch

from moecompress.model.driver import LayerContext


class StorageRounding:
    """LayerPass: round every floating-point parameter and buffer of the layer to ``dtype`` and back."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def attach(self, ctx: LayerContext) -> list:
        return []

    def observation_end(self, ctx: LayerContext):
        return ctx.layer  # reads no activations

    @torch.no_grad()
    def process(self, ctx: LayerContext) -> bool:
        changed = False
        for tensor in [*ctx.layer.parameters(), *ctx.layer.buffers()]:
            if not tensor.is_floating_point() or tensor.dtype in (self.dtype, torch.float16) or tensor.device.type == "meta":
                continue  # float16 tensors are written as they are (export.writer)
            rounded = tensor.to(self.dtype).to(tensor.dtype)
            if not torch.equal(rounded, tensor):
                tensor.copy_(rounded)
                changed = True
        return changed
