"""Peak memory of a layer-by-layer pass over a multi-GB MoE checkpoint, against a plain from_pretrained.

    python benchmarks/layerwise_memory.py [--workdir DIR] [--layers N] [--no-baseline] [--keep] [--diagnose]

1. Writes (once, under ``--workdir``) a random bf16 Mixtral checkpoint of >= 4 GB, layer by layer, so
   the writer never holds more than one decoder layer: one safetensors shard per layer with the
   per-expert names real checkpoints use (``experts.3.w1.weight``), an index json, and the config.
2. Runs, in a subprocess, ``run_layerwise`` with a pass that reads and writes every expert through
   ``ExpertsView`` on 4 x 128 calibration tokens, and measures the subprocess's peak RSS.
3. Runs, in another subprocess, a plain ``AutoModelForCausalLM.from_pretrained`` of the same folder.

Each measurement is one JSON line on stdout::

    {"bench": "layerwise_memory", "variant": "default", "checkpoint_bytes": ..., "peak_rss_bytes": ...,
     "ratio": ..., "seconds": ..., "peak_rss_anon_bytes": ..., "peak_rss_file_bytes": ...}

``peak_rss_bytes`` is the kernel's ``ru_maxrss`` of that child (``os.wait4``); the anon/file split comes
from polling ``/proc/<pid>/status`` (file-backed pages are safetensors mmaps: resident, but page cache
the kernel can drop). The goal is ``ratio < 0.25`` for the layer-by-layer pass. The ratio depends on
the layer count: the floor is (python + torch, ~0.45 GB, + one layer) / checkpoint, i.e. ~25% at the
default 6 layers and ~13% at ``--layers 12`` (9 GB; skip the baseline there, it needs ~2x in RAM).

``--diagnose`` adds variants that separate the causes of a high peak without editing the library
(``--variants a,b`` picks some): ``MALLOC_ARENA_MAX=2``; ``malloc_trim(0)`` after each released layer;
dropping the cached safetensors handles after each layer (unmapping the shard that was read);
handing the loader lazy ``get_slice`` objects instead of tensors; opening a handle per tensor read.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

BENCH = "layerwise_memory"
SEED = 1234
# Mixtral-like geometry with smaller hidden/intermediate sizes; one layer is ~0.73 GB in bf16.
GEOMETRY = dict(
    hidden_size=2048,
    intermediate_size=7168,
    num_local_experts=8,
    num_experts_per_tok=2,
    num_attention_heads=16,
    num_key_value_heads=8,
    vocab_size=32000,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)
MIN_CHECKPOINT_BYTES = 4 * 10**9
COMPLETE_MARKER = ".complete"


# --------------------------------------------------------------------------------------------------
# Writing the checkpoint, one layer at a time
# --------------------------------------------------------------------------------------------------


def bench_config(num_layers: int):
    from transformers import MixtralConfig

    return MixtralConfig(num_hidden_layers=num_layers, dtype="bfloat16", **GEOMETRY)


def _randn(shape: tuple[int, ...], gen: torch.Generator, scale: float = 0.02) -> torch.Tensor:
    """bf16 normal noise; generated directly in bf16 (no fp32 copy) because generation is the slow part."""
    return torch.randn(shape, generator=gen, dtype=torch.bfloat16).mul_(scale)


def layer_tensors(config, index: int) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of decoder layer ``index`` with the names a Mixtral checkpoint uses."""
    gen = torch.Generator().manual_seed(SEED + 1 + index)
    h, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    head_dim = h // config.num_attention_heads
    kv = config.num_key_value_heads * head_dim
    p = f"model.layers.{index}"
    out = {
        f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
        f"{p}.self_attn.q_proj.weight": _randn((h, h), gen),
        f"{p}.self_attn.k_proj.weight": _randn((kv, h), gen),
        f"{p}.self_attn.v_proj.weight": _randn((kv, h), gen),
        f"{p}.self_attn.o_proj.weight": _randn((h, h), gen),
        f"{p}.block_sparse_moe.gate.weight": _randn((e, h), gen, scale=0.2),
    }
    for x in range(e):
        q = f"{p}.block_sparse_moe.experts.{x}"
        out[f"{q}.w1.weight"] = _randn((i, h), gen)  # gate [I, H]
        out[f"{q}.w2.weight"] = _randn((h, i), gen)  # down [H, I]
        out[f"{q}.w3.weight"] = _randn((i, h), gen)  # up   [I, H]
    return out


def outer_tensors(config) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(SEED)
    h, v = config.hidden_size, config.vocab_size
    return {
        "model.embed_tokens.weight": _randn((v, h), gen),
        "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
        "lm_head.weight": _randn((v, h), gen),
    }


def write_checkpoint(folder: Path, num_layers: int) -> int:
    """Write the checkpoint shard by shard (at most one layer in memory); returns its size in bytes."""
    from safetensors.torch import save_file

    config = bench_config(num_layers)
    folder.mkdir(parents=True, exist_ok=True)
    shards = [("outer", None)] + [(f"layer{i:03d}", i) for i in range(num_layers)]
    weight_map: dict[str, str] = {}
    total = 0
    for n, (tag, index) in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = outer_tensors(config) if index is None else layer_tensors(config, index)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
        print(f"  wrote {name} ({tag})", file=sys.stderr, flush=True)
    index_json = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
    config.save_pretrained(str(folder))
    (folder / COMPLETE_MARKER).write_text("ok\n")
    return checkpoint_bytes(folder)


def checkpoint_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def ensure_checkpoint(workdir: Path, num_layers: int) -> Path:
    folder = workdir / f"mixtral_h{GEOMETRY['hidden_size']}_i{GEOMETRY['intermediate_size']}_l{num_layers}"
    if (folder / COMPLETE_MARKER).exists():
        print(f"reusing {folder}", file=sys.stderr, flush=True)
        return folder
    if folder.exists():
        shutil.rmtree(folder)  # a half-written checkpoint from an interrupted run
    free = shutil.disk_usage(workdir if workdir.exists() else workdir.parent).free
    need = int(num_layers * 0.75e9 + 0.3e9)
    if free < need * 1.2:
        sys.exit(f"not enough disk under {workdir}: {free / 1e9:.1f} GB free, need ~{need / 1e9:.1f} GB")
    print(f"writing a {num_layers}-layer checkpoint to {folder} ...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    size = write_checkpoint(folder, num_layers)
    print(f"wrote {size / 1e9:.2f} GB in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return folder


# --------------------------------------------------------------------------------------------------
# The measured children
# --------------------------------------------------------------------------------------------------


class TouchEveryExpert:
    """A LayerPass that reads every expert's gate/up/down through the view, runs each expert on a
    few calibration tokens, and writes every down projection back in place (as a quantizer would)."""

    def __init__(self) -> None:
        self.experts_touched = 0
        self.checksum = 0.0

    def attach(self, ctx) -> list:
        return []

    def process(self, ctx) -> bool:
        if ctx.block is None:
            return False
        view = ctx.block.experts
        x = ctx.inputs[0].reshape(-1, view.hidden_size)[:16]  # [16, H]
        for e in range(view.num_experts):
            for w in view.expert_weights(e).values():
                self.checksum += float(w.sum(dtype=torch.float32))
            self.checksum += float(view.forward_expert(e, x).sum(dtype=torch.float32))
            view.set(e, "down", view.get(e, "down"))
            self.experts_touched += 1
        return False


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _read_with_a_handle_per_tensor(checkpoint):
    """Diagnostic: a mapping opened and closed around every read, so no shard stays mapped."""
    from safetensors import safe_open

    def get(key: str) -> torch.Tensor:
        with safe_open(str(checkpoint.key_to_file[key]), "pt") as f:
            return f.get_tensor(key)

    return get


def _read_lazy_slices(checkpoint):
    """Diagnostic: safetensors slices, materialised by transformers one target parameter at a time."""
    return lambda key: checkpoint._handle(checkpoint.key_to_file[key]).get_slice(key)


def child_layerwise(folder: Path, trim: bool, close_handles: bool, read: str = "default") -> dict:
    from moecompress.model.driver import run_layerwise
    from moecompress.model.loading import LayerwiseModel

    start = time.perf_counter()
    lm = LayerwiseModel(folder, dtype=torch.bfloat16)
    if read == "per_tensor":
        lm.checkpoint.get = _read_with_a_handle_per_tensor(lm.checkpoint)
    elif read == "lazy":
        lm.checkpoint.get = _read_lazy_slices(lm.checkpoint)
    vocab = lm.config.vocab_size
    ids = torch.randint(3, vocab, (4, 128), generator=torch.Generator().manual_seed(0))
    touch = TouchEveryExpert()

    def after_release(done: int, total: int) -> None:
        # The driver calls `progress` right after releasing a layer: the place for the diagnostics.
        if close_handles:
            lm.checkpoint._handles.clear()
        if trim:
            _malloc_trim()

    result = run_layerwise(lm, ids, passes=[touch], batch_size=4, progress=after_release)
    assert touch.experts_touched == lm.view.num_layers * lm.view.blocks[0].num_experts
    assert all(torch.isfinite(h).all() for h in result.hidden)
    return {"seconds": time.perf_counter() - start, "experts_touched": touch.experts_touched}


def child_baseline(folder: Path) -> dict:
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.bfloat16)
    n = sum(p.numel() for p in model.parameters())
    return {"seconds": time.perf_counter() - start, "params": n}


def run_child(args) -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import transformers

    transformers.logging.disable_progress_bar()
    folder = Path(args.model)
    if args.child == "layerwise":
        info = child_layerwise(folder, trim=args.trim, close_handles=args.close_handles, read=args.read)
    else:
        info = child_baseline(folder)
    info["self_maxrss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(info), flush=True)


# --------------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------------


def _rss_fields(pid: int) -> dict[str, int] | None:
    """VmRSS / RssAnon / RssFile of a live process in bytes, None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def measure(cmd: list[str], env: dict[str, str]) -> dict:
    """Run ``cmd``; return its own JSON line plus peak RSS (ru_maxrss) and the polled anon/file peaks."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
    peaks = {"VmRSS": 0, "RssAnon": 0, "RssFile": 0}
    done = threading.Event()

    def poll() -> None:
        while not done.is_set():
            fields = _rss_fields(proc.pid)
            if fields is None:
                return
            for k, v in fields.items():
                peaks[k] = max(peaks[k], v)
            time.sleep(0.02)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    stdout = proc.stdout.read()
    # wait4 gives this child's own rusage (RUSAGE_CHILDREN would mix both children of this run).
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    poller.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    info = json.loads(stdout.strip().splitlines()[-1])
    info.update(
        peak_rss_bytes=usage.ru_maxrss * 1024,
        peak_rss_anon_bytes=peaks["RssAnon"],
        peak_rss_file_bytes=peaks["RssFile"],
        wall_seconds=seconds,
    )
    return info


def report(variant: str, ckpt_bytes: int, info: dict) -> None:
    line = {
        "bench": BENCH,
        "variant": variant,
        "checkpoint_bytes": ckpt_bytes,
        "peak_rss_bytes": info["peak_rss_bytes"],
        "ratio": round(info["peak_rss_bytes"] / ckpt_bytes, 4),
        "seconds": round(info["seconds"], 2),
        "peak_rss_anon_bytes": info["peak_rss_anon_bytes"],
        "peak_rss_file_bytes": info["peak_rss_file_bytes"],
    }
    print(json.dumps(line), flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/moecompress_bench")
    ap.add_argument("--layers", type=int, default=6, help="decoder layers (~0.73 GB each in bf16)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the plain from_pretrained measurement")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint for the next run")
    ap.add_argument("--diagnose", action="store_true", help="also run the allocator / mmap variants")
    ap.add_argument("--variants", default="", help="comma-separated subset of the --diagnose variants")
    # internal: the measured child processes
    ap.add_argument("--child", choices=("layerwise", "baseline"), help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--trim", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--close-handles", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--read", choices=("default", "per_tensor", "lazy"), default="default", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        run_child(args)
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    folder = ensure_checkpoint(workdir, args.layers)
    size = checkpoint_bytes(folder)
    if size < MIN_CHECKPOINT_BYTES:
        print(f"warning: checkpoint is {size / 1e9:.2f} GB (< 4 GB); use more --layers", file=sys.stderr)

    me = [sys.executable, str(Path(__file__).resolve()), "--model", str(folder)]
    base_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    variants = [("default", [], {})]
    diagnostics = [
        ("malloc_arena_max_2", [], {"MALLOC_ARENA_MAX": "2"}),
        ("malloc_trim", ["--trim"], {}),
        ("close_handles", ["--close-handles"], {}),
        ("close_handles+malloc_trim+arena2", ["--close-handles", "--trim"], {"MALLOC_ARENA_MAX": "2"}),
        ("lazy_slices+close_handles", ["--read", "lazy", "--close-handles"], {}),
        ("handle_per_tensor", ["--read", "per_tensor"], {}),
    ]
    if args.variants:
        wanted = set(args.variants.split(","))
        variants = [v for v in [*variants, *diagnostics] if v[0] in wanted]
    elif args.diagnose:
        variants += diagnostics
    try:
        for name, flags, env in variants:
            info = measure(me + ["--child", "layerwise", *flags], {**base_env, **env})
            report(name, size, info)
        if not args.no_baseline:
            info = measure(me + ["--child", "baseline"], base_env)
            report("from_pretrained", size, info)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
