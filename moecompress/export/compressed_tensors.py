"""compressed-tensors ``pack-quantized`` export, converted from a native moecompress checkpoint.

The conversion reads the native checkpoint one shard (one decoder layer) at a time and writes one
compressed-tensors shard per native shard, so memory stays at about one layer.

Per quantized projection (routed experts under their ORIGINAL per-expert checkpoint names, e.g.
``model.layers.0.mlp.experts.3.gate_proj``, or an attention / shared-expert linear), with N output
and K input features, G the group size and b the width:

==================  =================================  ========  ===========================================
tensor              shape                              dtype     meaning
==================  =================================  ========  ===========================================
weight_packed       ``[N, ceil(K * b / 32)]``          int32     signed codes ``q - 2**(b-1)`` packed along K by
                                                                 ``compressed_tensors``' own ``pack_to_int32``
weight_scale        ``[N, K // G]``                    float32   our float16 scales, widened (exact): the
                                                                 library dequantizes in the scale's dtype, and
                                                                 float32 makes that equal ``format.dequantize``
weight_shape        ``[2]``                            int64     ``(N, K)``
weight_zero_point   ``[ceil(N * b / 32), K // G]``     int32     asymmetric only: signed zero points packed along N
==================  =================================  ========  ===========================================

Our codes ``q`` in ``[0, 2**b)`` with zero point z dequantize to ``(q - z) * s``; compressed-tensors
stores ``q_s = q - 2**(b-1)`` and ``z_s = z - 2**(b-1)`` (symmetric: ``z = 2**(b-1)``, ``z_s = 0``,
not stored) and computes ``(q_s - z_s) * s`` - the same values.

Any K: K is the TRUE input dimension (the module's ``in_features`` / ``hidden_size`` /
``intermediate_size`` in the native config). Our padding rows (kpack-v2 pads K to a multiple of 32)
are dropped before repacking; ``pack_to_int32`` packs the K codes densely (``ceil(K * b / 32)`` words,
its own zero padding at the end of each row) and its decompressor crops to ``weight_shape``. What
compressed-tensors cannot hold is a partial last group (its group quantization requires ``K % G == 0``):
:func:`check_whole_groups` refuses such a checkpoint before anything is converted
(``format.group_size_problem(..., whole_groups=True)``, the rule lint's CT103 checks).

``quantization_config``: one ``config_groups`` entry per scheme (width, group, symmetry), its
``targets`` anchored ``re:`` patterns naming exactly the modules it covers (disjoint by
construction; an experts pattern also names ``gate_proj|up_proj|down_proj``, the names vLLM looks a MoE
layer's scheme up under whatever the family calls them, :data:`VLLM_PROBE_PROJECTIONS`); routers,
``shared_expert_gate`` and ``lm_head`` listed in ``ignore``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moecompress.errors import MoeCompressError
from moecompress.model.families import OUTPUT_COPY_FILES, OUTPUT_HEAD, UNQUANTIZED_BLOCK_MODULES
from moecompress.quant import format as fmt

UNQUANTIZED = fmt.UNQUANTIZED_BITS


# --------------------------------------------------------------------------------------------------
# Tensor conversion (plain functions)
# --------------------------------------------------------------------------------------------------


def signed_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Our unsigned codes in [0, 2**bits) -> compressed-tensors' signed int8 ``q - 2**(bits-1)``."""
    return (codes.to(torch.int32) - (1 << (bits - 1))).to(torch.int8)


def repack_projection(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    bits: int,
    rows: slice = slice(None),
    k: int | None = None,
) -> dict[str, torch.Tensor]:
    """One packed matrix in our format -> its compressed-tensors ``pack-quantized`` tensors.

    qweight int32 ``[Kp*bits//32, N_all]``, scales float16 ``[K//G, N_all]`` (whole groups:
    :func:`check_whole_groups`), zeros uint8 or None; ``rows`` picks the output features (e.g. the gate
    rows of a fused gate_up); ``k`` the true K (None: K = Kp, kpack-v1 data). Returns
    ``weight_packed [N, ceil(K*bits/32)]``, ``weight_scale [N, K//G]`` float32, ``weight_shape [2]``
    = (N, K) and, when asymmetric, ``weight_zero_point [ceil(N*bits/32), K//G]``."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = fmt.unpack(qweight, bits, k)[:, rows]  # [K, N]: padding rows dropped
    q = signed_codes(codes.t().contiguous(), bits)  # [N, K]
    out = {
        "weight_packed": pack_to_int32(q, bits),
        "weight_scale": scales[:, rows].t().contiguous().to(torch.float32),
        "weight_shape": torch.tensor(list(q.shape), dtype=torch.int64),
    }
    if zeros is not None:
        zp = signed_codes(zeros[:, rows].t().contiguous(), bits)  # [N, K//G]
        out["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    return out


# --------------------------------------------------------------------------------------------------
# Names: fused experts module -> original per-expert checkpoint names
# --------------------------------------------------------------------------------------------------


def skeleton_from_config(folder: Path):
    """The model (on meta) of a native checkpoint's config, without its quantization config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(folder))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def expert_checkpoint_names(model, experts_path: str, num_experts: int, has_gate: bool) -> dict[tuple[int, str], str]:
    """(expert, "gate" | "up" | "down") -> original checkpoint module name (without ``.weight``).

    Asks transformers' own reverse conversion (what ``save_pretrained`` does) with tiny marker
    tensors: gate_up ``[E, 2, 1]`` (gate row 3e, up row 3e+1) and down ``[E, 1, 1]`` (3e+2)."""
    from transformers.core_model_loading import revert_weight_conversion

    e = torch.arange(num_experts, dtype=torch.float32)
    fused_in = torch.stack([3 * e, 3 * e + 1], dim=1).unsqueeze(-1) if has_gate else (3 * e + 1).view(-1, 1, 1)
    state = {
        f"{experts_path}.{'gate_up_proj' if has_gate else 'up_proj'}": fused_in,
        f"{experts_path}.down_proj": (3 * e + 2).view(-1, 1, 1),
    }
    reverted = revert_weight_conversion(model, state)
    names: dict[tuple[int, str], str] = {}
    for key, value in reverted.items():
        if value.numel() != 1 or not key.endswith(".weight"):
            raise MoeCompressError(
                f"{experts_path}: this model family stores its experts fused in checkpoints ({key}); the "
                "compressed-tensors export needs per-expert checkpoint names; use --target native / --format native"
            )
        marker = int(value.reshape(-1)[0])
        names[(marker // 3, ("gate", "up", "down")[marker % 3])] = key[: -len(".weight")]
    expected = num_experts * (3 if has_gate else 2)
    if len(names) != expected:
        raise MoeCompressError(f"{experts_path}: found {len(names)} per-expert checkpoint names, expected {expected}")
    return names


def checkpoint_prefix(model, module_path: str) -> str:
    """The checkpoint name prefix of a module path (families rename, e.g. Mixtral's ``mlp`` is stored as
    ``block_sparse_moe``): transformers' reverse conversion applied to a probe key."""
    from transformers.core_model_loading import revert_weight_conversion

    probe = "moecompress_probe"
    reverted = list(revert_weight_conversion(model, {f"{module_path}.{probe}": torch.zeros(1)}))
    if len(reverted) != 1 or not reverted[0].endswith("." + probe):
        raise MoeCompressError(f"cannot tell the checkpoint name of module {module_path}; use --format native")
    return reverted[0][: -len(probe) - 1]


# --------------------------------------------------------------------------------------------------
# Config groups
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemeKey:
    bits: int
    group_size: int  # -1: per channel
    symmetric: bool


def scheme_dict(key: SchemeKey, targets: list[str]) -> dict:
    """One ``config_groups`` entry, validated by compressed-tensors' own pydantic models."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if key.group_size == -1:
        args = QuantizationArgs(num_bits=key.bits, type="int", symmetric=key.symmetric, strategy="channel")
    else:
        args = QuantizationArgs(num_bits=key.bits, type="int", symmetric=key.symmetric, group_size=key.group_size, strategy="group")
    return QuantizationScheme(targets=targets, weights=args, format="pack-quantized").model_dump()


# vLLM (``CompressedTensorsMoEMethod.get_moe_method``) resolves a MoE layer's scheme by looking up the
# names ``<experts>.0.gate_proj / .0.up_proj / .0.down_proj``, whatever the family's checkpoint names are
# (Mixtral and PhiMoE store w1 / w3 / w2): a pattern naming only w1|w2|w3 leaves the layer "unquantized"
# in vLLM while its tensors are packed, and the load fails. The patterns therefore also name these.
VLLM_PROBE_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def expert_targets(names: dict[tuple[int, str], str], experts_path: str, experts: list[int], num_experts: int) -> str:
    """One anchored ``re:`` pattern matching exactly the given experts' projections of one layer (and
    vLLM's lookup names for them, :data:`VLLM_PROBE_PROJECTIONS`)."""
    projections = sorted({name.rsplit(".", 1)[-1] for name in names.values()} | set(VLLM_PROBE_PROJECTIONS))
    for (e, _proj), name in names.items():
        if not name.startswith(f"{experts_path}.{e}.") or name.count(".") != experts_path.count(".") + 2:
            raise MoeCompressError(f"unexpected per-expert checkpoint name {name!r} under {experts_path}")
    which = r"\d+" if sorted(experts) == list(range(num_experts)) else "(" + "|".join(map(str, sorted(experts))) + ")"
    return "re:^" + re.escape(experts_path) + r"\." + which + r"\.(" + "|".join(map(re.escape, projections)) + ")$"


def linear_target(name: str) -> str:
    return "re:^" + re.escape(name) + "$"


def build_quantization_config(groups: dict[SchemeKey, list[str]], ignore: list[str]) -> dict:
    """The ``quantization_config`` of config.json: one group per scheme, widest first for stable names."""
    from compressed_tensors.quantization import QuantizationConfig

    ordered = sorted(groups.items(), key=lambda kv: (kv[0].bits, kv[0].group_size, not kv[0].symmetric))
    config_groups = {f"group_{i}": scheme_dict(k, targets) for i, (k, targets) in enumerate(ordered)}
    qc = QuantizationConfig(
        config_groups=config_groups, format="pack-quantized", quantization_status="compressed", ignore=sorted(set(ignore))
    )
    return qc.model_dump(mode="json")


# --------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------


def _native_config(folder: Path) -> dict:
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MoeCompressError(f"cannot read {path} ({exc}); pass a native moecompress checkpoint") from None
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "moecompress":
        raise MoeCompressError(f"{folder} is not a native moecompress checkpoint (quant_method {qc.get('quant_method')!r})")
    return config


def check_no_expert_groups(quantization_config: dict, where: str) -> None:
    """compressed-tensors has no expert -> group map: refuse an exact-router merge (it would load wrong)."""
    if quantization_config.get("expert_groups"):
        raise MoeCompressError(
            f"{where} holds merged experts behind an expert -> group map (merge --router exact), which compressed-tensors "
            "cannot express; use --format native, or merge with --router standard or exact-slots"
        )


def projection_dims(d: dict) -> list[tuple[str, int, int]]:
    """(projection, true K, group length G or -1) of every packed projection of one module description."""
    if d["type"] == "experts":
        return [("gate_up", d["hidden_size"], d["group_size"]), ("down", d["intermediate_size"], d["group_size"])]
    if d["type"] == "linear":
        return [("weight", d["in_features"], d["group_size"])]
    return []


def check_whole_groups(modules: dict[str, dict]) -> None:
    """compressed-tensors' rule (``format.group_size_problem(..., whole_groups=True)``): every group is
    whole, G divides K. A native checkpoint with a partial last group (allowed by kpack-v2) is refused
    before anything is converted; any K itself is fine (the padding is dropped)."""
    for path, d in modules.items():
        for proj, k, g in projection_dims(d):
            if g in (fmt.PER_CHANNEL, k):
                continue  # per-channel: one whole group
            problem = fmt.group_size_problem(k, g, whole_groups=True)
            if problem is not None:
                raise MoeCompressError(
                    f"{path} ({proj}): {problem}; quantize again with such a --group-size, or use --format native"
                )


def check_exportable(modules: dict[str, dict], allow_mixed_layers: bool = False) -> None:
    """vLLM's rules the export can guarantee up front: whole groups (:func:`check_whole_groups`), every
    expert quantized, one width per layer."""
    check_whole_groups(modules)
    for path, d in modules.items():
        if d["type"] != "experts":
            continue
        if d.get("has_bias"):
            raise MoeCompressError(f"{path}: experts with biases cannot be exported to compressed-tensors; use --format native")
        if allow_mixed_layers:
            continue
        if UNQUANTIZED in d["bits"]:
            raise MoeCompressError(
                f"{path} keeps experts unquantized, which vLLM cannot load from compressed-tensors; "
                "use --super-experts pin or none, or --format native"
            )
        if len(set(d["bits"])) > 1:
            raise MoeCompressError(
                f"{path} mixes widths {sorted(set(d['bits']))} across experts; vLLM needs one width per MoE layer: "
                "use --granularity layer or --format native"
            )


def check_model_exportable(model, view) -> None:
    """Before any work (``quantize --format compressed-tensors`` / ``--target vllm|hf``): what the conversion
    would refuse only after the whole quantization sweep -- experts with biases (compressed-tensors has no
    place for them; gpt_oss) and experts stored fused in checkpoints (no per-expert names; granitemoe).
    ``model``: the (meta) skeleton, ``view``: its :class:`~moecompress.model.view.MoEModelView`."""
    for index, block in sorted(view.blocks.items()):
        path = f"{view.layers_name}.{index}.{block.experts_name}"
        if block.experts.has_bias:
            raise MoeCompressError(f"{path}: experts with biases cannot be exported to compressed-tensors (it stores no "
                                   "expert biases); use --target native / --format native")
        expert_checkpoint_names(model, path, block.experts.num_experts, block.experts.has_gate)


def _expert_tensors(path: str, d: dict, names, shard) -> tuple[dict[str, torch.Tensor], dict[SchemeKey, list[int]], list[str]]:
    """Per-expert tensors of one experts module -> (tensors, scheme -> experts, dense expert names)."""
    out: dict[str, torch.Tensor] = {}
    by_scheme: dict[SchemeKey, list[int]] = defaultdict(list)
    dense: list[str] = []
    i, has_gate = d["intermediate_size"], d.get("has_gate", True)
    parts = (("gate", slice(0, i)), ("up", slice(i, 2 * i))) if has_gate else (("up", slice(None)),)
    for bits in sorted(set(d["bits"])):
        ids = shard.get_tensor(f"{path}.w{bits}_expert_ids").tolist()
        if bits == UNQUANTIZED:
            gate_up, down = shard.get_tensor(f"{path}.w16_gate_up"), shard.get_tensor(f"{path}.w16_down")
            for slot, e in enumerate(ids):
                for proj, rows in parts:
                    out[f"{names[(e, proj)]}.weight"] = gate_up[slot, rows].contiguous()
                    dense.append(names[(e, proj)])
                out[f"{names[(e, 'down')]}.weight"] = down[slot].contiguous()
                dense.append(names[(e, "down")])
            continue
        get = lambda n: shard.get_tensor(f"{path}.w{bits}_{n}")  # noqa: E731
        zeros_gu = get("gate_up_zeros") if not d["symmetric"] else None
        zeros_dn = get("down_zeros") if not d["symmetric"] else None
        qw_gu, sc_gu, qw_dn, sc_dn = get("gate_up_qweight"), get("gate_up_scales"), get("down_qweight"), get("down_scales")
        h = d["hidden_size"]
        for slot, e in enumerate(ids):
            for proj, rows in parts:
                z = None if zeros_gu is None else zeros_gu[slot]
                for k, v in repack_projection(qw_gu[slot], sc_gu[slot], z, bits, rows, k=h).items():
                    out[f"{names[(e, proj)]}.{k}"] = v
            z = None if zeros_dn is None else zeros_dn[slot]
            for k, v in repack_projection(qw_dn[slot], sc_dn[slot], z, bits, k=i).items():
                out[f"{names[(e, 'down')]}.{k}"] = v
            by_scheme[SchemeKey(bits, d["group_size"], d["symmetric"])].append(e)
    return out, by_scheme, dense


def convert_native_to_compressed_tensors(native: str | Path, target: str | Path, allow_mixed_layers: bool = False) -> Path:
    """Write a compressed-tensors ``pack-quantized`` checkpoint into the folder ``target`` (created if
    missing) from the native one at ``native``. Staging and the swap into OUT are the job's
    (:mod:`moecompress.api.output`).

    ``allow_mixed_layers``: also convert layers vLLM cannot load (mixed widths, unquantized experts;
    the result is then what ``moecompress lint`` reports). Returns ``target``."""
    native, target = Path(native), Path(target)
    config = _native_config(native)
    qc = config["quantization_config"]
    modules: dict[str, dict] = qc.get("modules", {})
    check_no_expert_groups(qc, str(native))
    check_exportable(modules, allow_mixed_layers)
    index_path = native / "model.safetensors.index.json"
    try:
        weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise MoeCompressError(f"cannot read {index_path} ({exc}); the native checkpoint is incomplete") from None
    skeleton = skeleton_from_config(native)
    groups: dict[SchemeKey, list[str]] = defaultdict(list)
    ignore: list[str] = [OUTPUT_HEAD] if f"{OUTPUT_HEAD}.weight" in weight_map else []
    stored = {path: checkpoint_prefix(skeleton, path) for path in modules}  # module path -> checkpoint prefix
    for path, d in modules.items():
        if d["type"] == "experts":
            block = stored[path].rsplit(".", 1)[0]
            ignore += [f"{block}.{n}" for n in UNQUANTIZED_BLOCK_MODULES if f"{block}.{n}.weight" in weight_map]
    new_map: dict[str, str] = {}
    total = 0
    target.mkdir(parents=True, exist_ok=True)
    from moecompress.quant.hf_integration import GUARD_SHARD

    # The native load guard's shard (tripwires for a plain transformers load of the NATIVE checkpoint)
    # has no place in a compressed-tensors checkpoint, which loads without moecompress.
    for shard_name in sorted(set(weight_map.values()) - {GUARD_SHARD}):
        tensors: dict[str, torch.Tensor] = {}
        with safe_open(str(native / shard_name), "pt") as shard:
            keys = set(shard.keys())
            handled: set[str] = set()
            for path, d in modules.items():
                name = stored[path]  # the module's name in the checkpoint
                mine = {k for k in keys if k.startswith(name + ".")}
                if not mine:
                    continue
                handled |= mine
                if d["type"] == "experts":
                    names = expert_checkpoint_names(skeleton, path, d["num_experts"], d.get("has_gate", True))
                    packed, by_scheme, _dense = _expert_tensors(name, d, names, shard)
                    tensors.update(packed)
                    for key, experts in by_scheme.items():
                        groups[key].append(expert_targets(names, name, experts, d["num_experts"]))
                else:
                    zeros = shard.get_tensor(f"{name}.zeros") if not d["symmetric"] else None
                    packed = repack_projection(
                        shard.get_tensor(f"{name}.qweight"), shard.get_tensor(f"{name}.scales"), zeros, d["bits"], k=d["in_features"]
                    )
                    for k, v in packed.items():
                        tensors[f"{name}.{k}"] = v
                    if d.get("bias"):
                        tensors[f"{name}.bias"] = shard.get_tensor(f"{name}.bias")
                    g = -1 if qc.get("group_size") == -1 else d["group_size"]
                    groups[SchemeKey(d["bits"], g, d["symmetric"])].append(linear_target(name))
            for k in sorted(keys - handled):
                tensors[k] = shard.get_tensor(k)
        save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(target / shard_name), metadata={"format": "pt"})
        for k, v in tensors.items():
            new_map[k] = shard_name
            total += v.numel() * v.element_size()
    config["quantization_config"] = build_quantization_config(groups, ignore)
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}
    (target / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    for name in OUTPUT_COPY_FILES:
        if (native / name).exists():
            shutil.copy2(native / name, target / name)
    return target
