"""Compression speed side by side with llm-compressor, in one run, on the same machine.

Both tools quantize the testbed at the same scheme and on the same calibration token ids (the built-in
`mixed` set, 128 x 256 tokens, seed 0, extracted once by moecompress and handed to llm-compressor as a
dataset of input ids), attention quantized too (parity: llm-compressor's GPTQModifier targets every
Linear but the router and lm_head). Each quantization runs as its own subprocess, one after the
other (never two at once: on 2 cores a second job inflates the first's time several-fold); its wall
time, CPU time and peak RSS come from ``os.wait4``. Then both outputs are evaluated by the same code
(`moecompress eval`: held-out prose and code files of the testbed, 256-token chunks, first 40k tokens,
geometric mean): llm-compressor's compressed-tensors checkpoint loads in transformers 5.x through
compressed-tensors' decompression.

Schemes: W4A16 (llm-compressor's preset: 4-bit symmetric, group 128) and W3A16 (the same, 3 bits).
Both tools calibrate every expert on every token (llm-compressor's `moe_calibrate_all_experts`,
its default; ours `--calibrate-all-experts`, also the default, with AGQ affinity weighting).

llm-compressor pins its own transformers, so it lives in its own venv (not a dependency of ours):

    python3 -m venv /work/llmc && /work/llmc/bin/pip install torch==2.13.0 && /work/llmc/bin/pip install llmcompressor==0.14.0.1
    python benchmarks/speed.py [--llmc-python /work/llmc/bin/python] [--schemes w4,w3] [--work /tmp/mc_speed] [--repeat 3]
    python benchmarks/speed.py --synthetic 16,2,1024,512,4 --nsamples 64 --schemes w4   # memory at scale

Prints one JSON line per (tool, scheme, run) and one line of ratios per scheme (moecompress /
llm-compressor: wall, CPU, peak RSS, ppl; medians over ``--repeat`` runs, the tools alternating, since
wall time on a shared 2-core VM varies by 10-20% from run to run). Without the llm-compressor venv it
runs moecompress alone and says so. ``--synthetic`` quantizes a random-weight model built to the given
shape instead of the testbed (no perplexity): on the 44 MB testbed both processes are mostly imports,
on a larger model the difference between loading one layer at a time and loading the whole model shows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
NSAMPLES, SEQLEN, SEED, GROUP = 128, 256, 0, 128
SCHEMES = {"w4": 4, "w3": 3}

LLMC_SCRIPT = textwrap.dedent('''
    import json, sys, time
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    model_path, ids_path, out, bits, group = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
    phases = {}
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype="auto")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    phases["load"] = time.perf_counter() - t
    ids = json.load(open(ids_path))
    data = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(r) for r in ids]})
    weights = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head", "re:.*mlp.gate$"])
    t = time.perf_counter()
    oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=len(ids[0]), num_calibration_samples=len(ids),
            moe_calibrate_all_experts=True)
    phases["oneshot"] = time.perf_counter() - t
    t = time.perf_counter()
    model.save_pretrained(out, save_compressed=True)
    tokenizer.save_pretrained(out)
    phases["save"] = time.perf_counter() - t
    print(json.dumps(phases))
''')


def run_child(cmd: list[str], env: dict, cwd: str = "/tmp") -> dict:
    """Run one command as its own process: wall, CPU (user+sys) and peak RSS of that process from os.wait4."""
    start = time.time()
    with open(Path(cwd) / ".speed_stdout", "wb") as so, open(Path(cwd) / ".speed_stderr", "wb") as se:
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env, cwd=cwd)
        _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - start
    out = (Path(cwd) / ".speed_stdout").read_text(errors="replace")
    err = (Path(cwd) / ".speed_stderr").read_text(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd[:4]))} ... failed: {err[-1500:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "stdout": out}


def calibration_ids(model: Path, path: Path, nsamples: int = NSAMPLES) -> None:
    """The exact token ids `moecompress quantize --calib mixed --nsamples N --seqlen 256` uses."""
    from moecompress.api.calibration import calibration_for

    calib, _ = calibration_for(model, "mixed", nsamples, SEQLEN, SEED)
    path.write_text(json.dumps(calib.input_ids.tolist()))


def perplexity(folder: Path, testbed: Path, env: dict) -> dict:
    result = {}
    for name in ("prose", "code"):
        done = run_child([sys.executable, "-m", "moecompress.cli.main", "eval", str(folder), "--data",
                          str(testbed / f"heldout_{name}.txt"), "--max-tokens", "40000", "--json"], env)
        result[name] = json.loads(done["stdout"].strip().splitlines()[-1])["ppl"]
    result["mean"] = math.sqrt(result["prose"] * result["code"])
    return result


def moecompress_run(model: Path, out: Path, bits: int, env: dict, nsamples: int) -> dict:
    cmd = [sys.executable, "-m", "moecompress.cli.main", "quantize", str(model), str(out), "--bits", str(bits),
           "--group-size", str(GROUP), "--quantize-attention", "--attention-bits", str(bits), "--calib", "mixed", "--nsamples", str(nsamples),
           "--seqlen", str(SEQLEN), "--seed", str(SEED), "--json"]
    done = run_child(cmd, env)
    try:
        summary = json.loads(done["stdout"].strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        summary = {}
    return {k: v for k, v in done.items() if k != "stdout"} | {"phases": summary.get("phase_seconds")}


def llmc_run(llmc_python: Path, model: Path, ids: Path, out: Path, bits: int, env: dict, work: Path) -> dict:
    script = work / "llmc_quantize.py"
    script.write_text(LLMC_SCRIPT)
    done = run_child([str(llmc_python), str(script), str(model), str(ids), str(out), str(bits), str(GROUP)], env)
    phases = json.loads(done["stdout"].strip().splitlines()[-1])
    return {k: v for k, v in done.items() if k != "stdout"} | {"phases": phases}


def synthetic(spec: str, testbed: Path, work: Path) -> Path:
    """A random-weight qwen3_moe with the testbed's tokenizer: ``experts,top_k,hidden,intermediate,layers``
    (benchmarks/scaling.py builds it). For memory at a size where the weights, not the imports, dominate."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from scaling import synthetic_model

    experts, top_k, hidden, intermediate, layers = (int(v) for v in spec.split(","))
    return synthetic_model(work / f"synthetic-{spec.replace(',', '-')}", testbed, experts, top_k, hidden, intermediate, layers)


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", type=Path, default=REPO.parent / "shared" / "testbed")
    ap.add_argument("--llmc-python", type=Path, default=Path("/work/llmc/bin/python"))
    ap.add_argument("--schemes", default="w4,w3")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mc_speed"))
    ap.add_argument("--repeat", type=int, default=1, help="runs per tool and scheme, alternating tools; medians compared")
    ap.add_argument("--synthetic", default=None, help="experts,top_k,hidden,intermediate,layers: a random-weight model "
                    "instead of the testbed (memory at scale; no perplexity)")
    ap.add_argument("--nsamples", type=int, default=NSAMPLES)
    args = ap.parse_args()
    testbed = args.testbed.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    model = synthetic(args.synthetic, testbed, args.work) if args.synthetic else testbed
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    env.pop("OMP_NUM_THREADS", None)  # both tools use every core of the machine
    ids = args.work / "calib_ids.json"
    calibration_ids(model, ids, args.nsamples)
    have_llmc = args.llmc_python.exists()
    if not have_llmc:
        print(json.dumps({"skipped": "llm-compressor", "why": f"{args.llmc_python} not found; see this file's docstring"}))
    if not args.synthetic:
        print(json.dumps({"tool": "bf16", **perplexity(testbed, testbed, env)}), flush=True)
    tools = ("moecompress", "llmcompressor") if have_llmc else ("moecompress",)
    for scheme in filter(None, args.schemes.split(",")):
        bits = SCHEMES[scheme]
        runs: dict[str, list[dict]] = {tool: [] for tool in tools}
        for attempt in range(args.repeat):
            for tool in tools:
                out = args.work / f"{tool}-{scheme}"
                shutil.rmtree(out, ignore_errors=True)
                if tool == "moecompress":
                    row = moecompress_run(model, out, bits, env, args.nsamples)
                else:
                    row = llmc_run(args.llmc_python, model, ids, out, bits, env, args.work)
                row = {"tool": tool, "scheme": f"W{bits}A16 g{GROUP}", "model": model.name, "run": attempt + 1, **row}
                if not args.synthetic and attempt == 0:  # same inputs, same bytes: one evaluation suffices
                    row |= perplexity(out, testbed, env)
                runs[tool].append(row)
                print(json.dumps(row), flush=True)
        if len(runs) == 2:
            ours, peer = runs["moecompress"], runs["llmcompressor"]
            keys = ("wall_s", "cpu_s", "peak_rss_mib") + (("mean",) if not args.synthetic else ())
            summary = {k: (median([r[k] for r in ours if k in r]), median([r[k] for r in peer if k in r])) for k in keys}
            print(json.dumps({"ratio": f"moecompress / llmcompressor, W{bits}A16 g{GROUP}, {model.name}, median of {args.repeat}",
                              **{k: round(a / b, 3) for k, (a, b) in summary.items()},
                              "medians": {k: {"moecompress": a, "llmcompressor": b} for k, (a, b) in summary.items()}}),
                  flush=True)


if __name__ == "__main__":
    main()
