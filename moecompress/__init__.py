"""moecompress: post-training compression for Mixture-of-Experts LLMs.

Importing the package registers ``quant_method: "moecompress"`` with transformers (its config in
``quant.hf_integration``, its quantizer in ``modules.hf_quantizer``), so
``AutoModelForCausalLM.from_pretrained`` loads moecompress checkpoints packed.
"""

__version__ = "0.1.0"

from moecompress.modules import hf_quantizer as _hf_quantizer  # noqa: E402,F401  (registration)

# The library API (moecompress.quantize(model, out, QuantizeOptions(...)), ...), imported on first use
# so that `import moecompress` stays the light registration above.
_API_NAMES = (
    "quantize", "prune", "merge", "stats", "compress_experts", "heal", "JobResult",
    "QuantizeOptions", "PruneOptions", "MergeOptions", "StatsOptions", "CompressExpertsOptions", "HealOptions",
)


def __getattr__(name: str):
    if name in _API_NAMES:
        from moecompress import api

        return getattr(api, name)
    raise AttributeError(f"module 'moecompress' has no attribute {name!r}")
