"""Runtime nn.Modules a compressed checkpoint is made of, and how a checkpoint rebuilds them.

* :mod:`moecompress.modules.packed` — :class:`PackedExperts` / :class:`PackedLinear`, packed weights
  computed through ``moecompress.kernels`` (never dequantized to a dense copy).
* :mod:`moecompress.modules.compressed_experts` — the compressed-experts block (ALGORITHMS.md section 7)
  with dynamic skipping.
* :mod:`moecompress.modules.hf_quantizer` — rebuilds these modules from ``quantization_config.modules``
  for ``from_pretrained`` (the registered HfQuantizer) and for the layer-by-layer loader.

This layer sits above ``model`` (it reads experts through the MoE view) and below ``passes`` (which
build these modules); see docs/ARCHITECTURE.md.
"""
