"""Names that model families use, defined once: config keys, module names, side files of a model folder.

Every module that looks a family's config or checkpoint up by name imports the tuple from here, so a
new family's spelling is added in one place.

* Config keys: the routed expert count (:data:`EXPERT_COUNT_KEYS`) and the experts per token
  (:data:`TOP_K_KEYS`), in the order families use them.
* Module names: inside an MoE block, the router (:data:`ROUTER_NAMES`), the shared experts and their
  sigmoid gate; outside, the output head. Routers, shared-expert gates and the head are never
  quantized (:data:`UNQUANTIZED_BLOCK_MODULES`, :data:`OUTPUT_HEAD`).
* Side files of a model folder: those whose presence means "this folder has a tokenizer"
  (:data:`TOKENIZER_MARKER_FILES`) and those copied verbatim from the source into every written
  checkpoint (:data:`OUTPUT_COPY_FILES`).
"""

from __future__ import annotations

# --------------------------------------------------------------------------------------------------
# Config keys
# --------------------------------------------------------------------------------------------------

# The routed expert count, as families serialise it (config.json) and name it on modules.
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")
# The experts per token (top-k).
TOP_K_KEYS = ("num_experts_per_tok", "moe_topk", "moe_top_k", "top_k_experts", "experts_per_token", "moe_k")

# --------------------------------------------------------------------------------------------------
# Module names
# --------------------------------------------------------------------------------------------------

# The router of an MoE block (an attribute of the block beside the experts module).
ROUTER_NAMES = ("gate", "router")
# Shared experts of a block, and the gate that scales them (Qwen2-MoE: sigmoid(shared_expert_gate(x))).
SHARED_EXPERT_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
SHARED_GATE_NAMES = ("shared_expert_gate",)
# Block children that always stay in full precision (vLLM and llm-compressor expect them dense).
UNQUANTIZED_BLOCK_MODULES = ROUTER_NAMES + SHARED_GATE_NAMES
# The output head: stays in full precision too.
OUTPUT_HEAD = "lm_head"

# --------------------------------------------------------------------------------------------------
# Side files of a model folder
# --------------------------------------------------------------------------------------------------

# Any of these in a folder means it holds a tokenizer (AutoTokenizer can load it).
TOKENIZER_MARKER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model")
# Copied verbatim from the source folder into every written checkpoint when present: every tokenizer
# file, the chat template, the generation defaults.
OUTPUT_COPY_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def config_value(config, keys: tuple[str, ...]):
    """The value of the first of ``keys`` the config (a transformers config or a dict) sets; None if none.

    Returned as stored (type checks belong to the caller, e.g. :mod:`moecompress.model.checks`)."""
    for key in keys:
        value = config.get(key) if isinstance(config, dict) else getattr(config, key, None)
        if value is not None:
            return value
    return None


def config_top_k(config) -> int | None:
    """Experts per token from a config (the first of :data:`TOP_K_KEYS` it holds), None when absent."""
    return config_value(config, TOP_K_KEYS)
