"""vLLM's loading rules for a compressed-tensors MoE checkpoint, as code: a checker independent of
``moecompress lint`` (no code shared with it), for tests on machines without vLLM.

Written from vLLM's source (read with the ``search`` tool, vllm-project/vllm):

* ``compressed_tensors/compressed_tensors_moe/compressed_tensors_moe.py``
  (``CompressedTensorsMoEMethod.get_moe_method``, commits 0043d6b5 and db7a6bcb): the scheme of a MoE
  layer is looked up for ``<layer>.0.gate_proj``, ``.0.up_proj``, ``.0.down_proj`` and must be the same
  for the three ("All MoE projections need to have same quantization scheme"); no scheme (ignored or
  unmatched) -> ``UnquantizedFusedMoEMethod`` (dense weights); a weight-only int scheme must be group or
  channel strategy without input quantization (``_is_wNa16_group_channel``) in format
  ``pack-quantized`` with ``num_bits in WNA16_SUPPORTED_BITS = [4, 8]`` ("For Fused MoE layers, only
  format ... and bits ... are supported"); the Humming release sends other int widths to
  ``CompressedTensorsHummingMoEMethod`` (2-bit symmetric is the route its PR #48918 tests);
* ``compressed_tensors/utils.py``: ``should_ignore_layer`` / ``find_matched_target``: a name is ignored
  when equal to or ``re.match``-ed by an ``ignore`` entry; otherwise the FIRST target (config order)
  equal to it or ``re.match``-ing it wins; none -> unquantized (class-name targets such as ``Linear`` are
  not modelled: moecompress writes only ``re:`` targets);
* ``compressed_tensors_moe_wna16.py`` ``create_weights``: one parameter set per layer, from expert 0's
  scheme, for ALL experts: ``w13_weight_packed [E, H // pack_factor, 2I]`` and ``w2_weight_packed
  [E, I // pack_factor, H]`` with ``pack_factor = 32 // num_bits`` (so K must be a multiple of it),
  scales ``[E, K // group_size, N]`` (group) or one group (channel), ``weight_shape [E, 2]``;
  8-bit asymmetric experts fail ("No WNA16 MoE backend supports the deployment configuration", issue 17;
  ``WNA16_ZP`` types exist for 4 bits only in the MoE backends);
* dense linears (``schemes/compressed_tensors_wNa16.py``): ``WNA16_SUPPORTED_BITS = [4, 8]`` (Humming:
  2-8, PR #46389 merged).

:func:`vllm_problems` returns one line per broken rule ([] = vLLM loads it);
:func:`dequantize_like_vllm` writes the dense model vLLM's kernels compute with (every module decompressed
with ITS OWN scheme, not one per model as transformers does), for numerics on CPU.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WNA16_BITS = {"0.33": {4, 8}, "humming": {2, 4, 8}}  # MoE experts
WNA16_ASYM_BITS = {"0.33": {4}, "humming": {4}}  # zero points: 4-bit only (MoE)
DENSE_BITS = {"0.33": {4, 8}, "humming": {2, 3, 4, 5, 6, 7, 8}}
PROBES = ("gate_proj", "up_proj", "down_proj")
_EXPERT = re.compile(r"^(?P<layer>.*\.experts)\.(?P<e>\d+)\.(?P<proj>[A-Za-z0-9_]+)\.(?P<suffix>weight\w*)$")


def _match(name: str, target: str) -> bool:
    return re.match(target[3:], name) is not None if target.startswith("re:") else target == name


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape; a ``weight_shape`` tensor's entry is its VALUE, (N, K)."""
    shapes = {}
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        with safe_open(str(folder / shard), "pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
                if key.endswith(".weight_shape"):
                    shapes[key] = tuple(int(v) for v in f.get_tensor(key).tolist())
    return shapes


class _Config:
    def __init__(self, qc: dict):
        self.groups = qc["config_groups"]
        self.ignore = qc.get("ignore") or []
        self.format = qc.get("format")

    def scheme_of(self, name: str) -> str | None:
        """vLLM's get_scheme_dict: ignored -> None; first group whose target matches; else None."""
        if any(_match(name, t) for t in self.ignore):
            return None
        for group, scheme in self.groups.items():
            if any(_match(name, t) for t in scheme["targets"]):
                return group
        return None

    def weights(self, group: str) -> dict:
        return self.groups[group]["weights"]

    def format_of(self, group: str) -> str | None:
        return self.groups[group].get("format") or self.format


def _moe_scheme_problems(cfg: _Config, group: str, release: str) -> list[str]:
    w = cfg.weights(group)
    if cfg.groups[group].get("input_activations") is not None or w.get("dynamic") or w["strategy"] not in ("group", "channel"):
        return [f"{group}: not a weight-only group/channel scheme (Unsupported FusedMoe scheme)"]
    if w["type"] != "int" or cfg.format_of(group) != "pack-quantized":
        return [f"{group}: MoE layers need int pack-quantized weights"]
    bits, sym = w["num_bits"], w["symmetric"]
    if bits not in WNA16_BITS[release]:
        return [f"{group}: {bits}-bit experts: vLLM {release} runs MoE bits {sorted(WNA16_BITS[release])} only"]
    if not sym and bits not in WNA16_ASYM_BITS[release]:
        return [f"{group}: {bits}-bit asymmetric experts: no WNA16 MoE backend supports them"]
    if w.get("actorder") in ("group", "dynamic"):
        return [f"{group}: actorder={w['actorder']} is not supported by WNA16 MoE"]
    return []


def _expert_shape_problems(layer: str, members: dict, cfg: _Config, group: str, shapes) -> list[str]:
    """Every expert loads into parameters sized from expert 0's scheme."""
    w = cfg.weights(group)
    pack = 32 // w["num_bits"]
    problems = []
    for (e, proj), suffixes in sorted(members.items()):
        if "weight_packed" not in suffixes:
            problems.append(f"{layer}.{e}.{proj}: stored dense, but the layer's scheme ({group}) is quantized")
            continue
        n, k = shapes[f"{layer}.{e}.{proj}.weight_shape"]
        if k % pack:
            problems.append(f"{layer}.{e}.{proj}: K = {k} is not a multiple of {pack} (vLLM allocates K // {pack} packed columns)")
        elif shapes[f"{layer}.{e}.{proj}.weight_packed"] != (n, k // pack):
            problems.append(f"{layer}.{e}.{proj}: weight_packed {shapes[f'{layer}.{e}.{proj}.weight_packed']} != {(n, k // pack)}")
        groups_k = 1 if w["strategy"] == "channel" else (k // w["group_size"] if k % w["group_size"] == 0 else None)
        if groups_k is None or shapes.get(f"{layer}.{e}.{proj}.weight_scale") != (n, groups_k):
            problems.append(f"{layer}.{e}.{proj}: weight_scale {shapes.get(f'{layer}.{e}.{proj}.weight_scale')} does not fit {group}")
        if w["symmetric"] == ("weight_zero_point" in suffixes):
            problems.append(f"{layer}.{e}.{proj}: zero point {'stored' if w['symmetric'] else 'missing'} for {group}")
    return problems


def vllm_problems(folder: str | Path, release: str = "0.33") -> list[str]:
    """Why vLLM ``release`` ("0.33" or "humming") would refuse the checkpoint ([] = it loads)."""
    folder = Path(folder)
    qc = json.loads((folder / "config.json").read_text()).get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        return [f"quant_method is {qc.get('quant_method')!r}, not compressed-tensors"]
    cfg, shapes = _Config(qc), _tensor_shapes(folder)
    layers: dict[str, dict[tuple[int, str], set[str]]] = defaultdict(lambda: defaultdict(set))
    for key in shapes:
        found = _EXPERT.match(key)
        if found:
            layers[found["layer"]][(int(found["e"]), found["proj"])].add(found["suffix"])
    problems: list[str] = []
    for layer, members in sorted(layers.items()):
        looked_up = {cfg.scheme_of(f"{layer}.0.{p}") for p in PROBES}
        if len(looked_up) > 1:
            problems.append(f"{layer}: All MoE projections need to have same quantization scheme ({sorted(map(str, looked_up))})")
            continue
        group = looked_up.pop()
        if group is None:  # UnquantizedFusedMoEMethod: plain weights only
            packed = [f"{layer}.{e}.{p}" for (e, p), s in members.items() if "weight_packed" in s]
            if packed:
                problems.append(f"{layer}: vLLM resolves no scheme (unquantized) but {packed[0]} is packed")
            continue
        scheme_problems = _moe_scheme_problems(cfg, group, release)
        problems += [f"{layer}: {p}" for p in scheme_problems]
        if not scheme_problems:
            problems += _expert_shape_problems(layer, members, cfg, group, shapes)
    problems += _dense_problems(cfg, shapes, set(layers), release)
    return problems


def _dense_problems(cfg: _Config, shapes, moe_layers: set[str], release: str) -> list[str]:
    problems = []
    for key in shapes:
        if not key.endswith(".weight_packed") or any(key.startswith(layer + ".") for layer in moe_layers):
            continue
        module = key[: -len(".weight_packed")]
        group = cfg.scheme_of(module)
        if group is None:
            problems.append(f"{module}: packed, but vLLM resolves no scheme for it")
        elif cfg.weights(group)["num_bits"] not in DENSE_BITS[release]:
            problems.append(f"{module}: {cfg.weights(group)['num_bits']}-bit linear: vLLM {release} runs {sorted(DENSE_BITS[release])}")
    return problems


@torch.no_grad()
def dequantize_like_vllm(folder: str | Path, out: str | Path) -> Path:
    """A dense HF checkpoint at ``out`` holding what vLLM computes with: each packed module decompressed
    with the scheme vLLM resolves for it (its own), by compressed-tensors' own decompressor."""
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme

    folder, out = Path(folder), Path(out)
    config = json.loads((folder / "config.json").read_text())
    cfg = _Config(config.pop("quantization_config"))
    tensors: dict[str, torch.Tensor] = {}
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted(set(index.values())):
        with safe_open(str(folder / shard), "pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    dense: dict[str, torch.Tensor] = {}
    modules = defaultdict(dict)
    for key, value in tensors.items():
        module, _, suffix = key.rpartition(".")
        if suffix.startswith("weight_"):
            modules[module][suffix] = value
        else:
            dense[key] = value
    for module, parts in modules.items():
        # vLLM reads a MoE layer's scheme from expert 0's lookup names; for our exports that is every
        # expert's own group (VL304 / CT101 clean), so the module's own match is the same scheme.
        group = cfg.scheme_of(module)
        scheme = QuantizationScheme.model_validate(cfg.groups[group])
        compressor = BaseCompressor.get_value_from_registry(cfg.format_of(group))
        dense[f"{module}.weight"] = compressor.decompress(dict(parts), scheme)["weight"].to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in dense.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config))
    return out
