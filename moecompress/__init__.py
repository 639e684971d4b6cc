"""moecompress: post-training compression for Mixture-of-Experts LLMs.

Importing the package registers ``quant_method: "moecompress"`` with transformers, so
``AutoModelForCausalLM.from_pretrained`` loads moecompress checkpoints packed.
"""

__version__ = "0.1.0"

from moecompress.quant import hf_integration as _hf_integration  # noqa: E402,F401  (registration)
