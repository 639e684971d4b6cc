"""A Hugging Face Hub model id where a model folder is expected.

``moecompress inspect Qwen/Qwen1.5-MoE-A2.7B`` works when the Hub is reachable: the checkpoint's
config, tokenizer and safetensors shards are fetched into the Hugging Face cache
(``snapshot_download``) and the command then reads them layer by layer as it reads any folder. When
the Hub cannot be reached (offline, no network, a gated or missing repository) the message says so
and how to pass a folder instead.
"""

from __future__ import annotations

import re
from pathlib import Path

from moecompress.errors import MoeCompressError

# owner/name, as the Hub spells repository ids (no absolute or relative path looks like this AND is
# missing on disk by accident: a folder that exists always wins).
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
# What a layer-by-layer run needs: config, tokenizer, weights (never *.bin / *.pt / optimizer states).
FETCHED = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def looks_like_hub_id(model: str | Path) -> bool:
    return not Path(model).exists() and bool(HUB_ID.match(str(model)))


def resolve_model(model: str | Path) -> Path:
    """``model`` as a local folder: itself, or the Hub snapshot of a repository id."""
    if not looks_like_hub_id(model):
        return Path(model)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(model), allow_patterns=FETCHED))
    except Exception as exc:  # huggingface_hub raises many kinds (offline, HTTP, auth, not found)
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise MoeCompressError(
            f"{model} is not a folder here and fetching it from the Hugging Face Hub failed ({reason}); "
            f"check the id, the network and HF_HUB_OFFLINE / HF_TOKEN, or download it first "
            f"(`hf download {model} --local-dir DIR`) and pass DIR"
        ) from None
