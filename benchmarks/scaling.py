"""Expert-parallel scaling on CPU: 1 process vs N torchrun processes (gloo), same bytes.

Quantizes (GPTQ 4-bit g128, calibrate-all + AGQ, built-in `mixed` calibration) a model twice or more:
one process with T threads, and ``--nproc`` processes under torchrun with T / nproc threads each (the
same cores), then checks the checkpoints are byte-identical and prints one JSON line per run: wall and
CPU time of the whole job (RUSAGE_CHILDREN: the launcher and every worker), the per-phase
wall seconds of rank 0 (load, forward, hessian, solve, pack, share, write) and seconds per MoE layer.

Models: the testbed (16 experts, top-2, 6 layers), and a synthetic qwen3_moe with many experts
(default 128 experts, top-8, hidden 512, expert intermediate 256, 2 layers; random weights, the
testbed's tokenizer) -- the shape of a modern fine-grained MoE layer, scaled down.

    python benchmarks/scaling.py [--nproc 2] [--threads 2] [--models testbed,synthetic] [--nsamples 64 --seqlen 256]

Run on an otherwise idle machine: two CPU-heavy jobs at once inflate every time here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def synthetic_model(folder: Path, testbed: Path, experts: int, top_k: int, hidden: int, intermediate: int, layers: int) -> Path:
    from moecompress.model.tiny import save_tiny_model

    if (folder / "config.json").exists():
        return folder
    vocab = json.loads((testbed / "config.json").read_text())["vocab_size"]
    save_tiny_model("qwen3_moe", folder, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                    moe_intermediate_size=intermediate, num_experts=experts, num_experts_per_tok=top_k,
                    num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8)
    for name in TOKENIZER_FILES:
        shutil.copy2(testbed / name, folder / name)
    return folder


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: Path, out: Path, nproc: int, threads: int, nsamples: int, seqlen: int) -> dict:
    args = ["quantize", str(model), str(out), "--bits", "4", "--group-size", "128", "--calib", "mixed",
            "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--json", "--device", "cpu"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "moecompress", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
               str(_free_port()), "-m", "moecompress", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRITON_INTERPRET": "0"}
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/tmp")
    stdout, stderr = proc.communicate()
    wall = time.time() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the launcher and every worker it waited for
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed: {stderr.decode()[-1500:]}")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    return {"wall_s": round(wall, 2), "cpu_s_all_processes": round(cpu, 2), "phase_seconds": result.get("phase_seconds"), "job_cpu_s_rank0": result.get("cpu_seconds"),
            "experts_solved_rank0": result.get("experts_solved_here"), "peak_rss_mib_rank0": round(result.get("peak_rss_bytes", 0) / 2**20, 1)}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix == ".safetensors" or p.name == "config.json":
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", type=Path, default=REPO.parent / "shared" / "testbed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mc_scaling"))
    ap.add_argument("--models", default="testbed,synthetic")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="cores used by every configuration")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--layers", type=int, default=2)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    testbed = args.testbed.resolve()
    models = {"testbed": (testbed, 6)}
    if "synthetic" in args.models:
        folder = synthetic_model(args.work / "synthetic", testbed, args.experts, args.top_k, args.hidden, args.intermediate, args.layers)
        models["synthetic"] = (folder, args.layers)
    for name in filter(None, args.models.split(",")):
        model, layers = models[name]
        configs = [(1, 1), (1, args.threads), (args.nproc, max(1, args.threads // args.nproc))]
        digests = {}
        for nproc, threads in configs:
            out = args.work / f"{name}-p{nproc}-t{threads}"
            row = run(model, out, nproc, threads, args.nsamples, args.seqlen)
            digests[(nproc, threads)] = digest(out)
            row = {"model": name, "processes": nproc, "threads_per_process": threads, **row,
                   # the layer work of rank 0 (forward, Hessians, solve, pack, share), not process start-up
                   "seconds_per_layer": round(sum(v for k, v in (row["phase_seconds"] or {}).items() if k not in ("load", "write")) / layers, 3),
                   "same_bytes_as_1_process": digests[(nproc, threads)] == digests[configs[0]]}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
