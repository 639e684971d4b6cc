"""The results table: every method at its main settings on the testbed, one run each.

For each method: the compress command runs in a subprocess (wall time, CPU time and peak RSS of that
process from os.wait4), then held-out perplexity of the output on the testbed's prose and code files
(256-token chunks, first 40k tokens) and their geometric mean, and the checkpoint size. The bf16
baseline is measured in the same run by the same code. Calibration is the built-in `mixed` set; the
held-out files are only ever evaluated on. Prints one JSON line per method; writes reports/results.md.

    python benchmarks/quality.py [--testbed ../shared/testbed] [--work /tmp/mc_quality] [--only NAME,...]

``--only`` re-runs the named methods and keeps the other rows from the last run in ``--work``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CALIB = ["--calib", "mixed", "--nsamples", "128", "--seqlen", "256"]
STATS_CALIB = ["--calib", "mixed", "--nsamples", "64", "--seqlen", "256"]

# name -> (what it is, command after `moecompress`, with {model} {out} {stats})
METHODS = {
    "rtn-w4": ("RTN 4-bit g128", "quantize {model} {out} --bits 4 --method rtn"),
    "gptq-w4": ("GPTQ 4-bit g128, calibrate-all + AGQ", "quantize {model} {out} --bits 4 " + " ".join(CALIB)),
    "gptq-w3": ("GPTQ 3-bit g128, calibrate-all + AGQ", "quantize {model} {out} --bits 3 " + " ".join(CALIB)),
    "mixed-2.5": ("LP mixed precision, 2.5 bits avg, global", "quantize {model} {out} --bits-budget 2.5 --stats {stats} " + " ".join(CALIB)),
    "prune-reap-12": ("REAP pruning + refit, 12 of 16", "prune {model} {out} --method reap --num-experts 12 --stats {stats}"),
    "prune-dern-8": ("DERN pruning + refit, 8 of 16", "prune {model} {out} --method dern --num-experts 8 --stats {stats}"),
    "prune-reap-8": ("REAP pruning + refit, 8 of 16", "prune {model} {out} --method reap --num-experts 8 --stats {stats}"),
    "prune-reap-8-norefit": ("REAP pruning alone (--no-refit), 8 of 16", "prune {model} {out} --method reap --num-experts 8 --no-refit --stats {stats}"),
    "merge-msmoe-8": ("M-SMoE merging (RegMean) + refit, 8 of 16", "merge {model} {out} --method msmoe --num-experts 8 --stats {stats}"),
    "merge-msmoe-exact-8": ("M-SMoE exact router (RegMean, output grouping) + refit, 8 of 16", "merge {model} {out} --method msmoe --num-experts 8 --router exact --per-layer --stats {stats}"),
    "dynamic-skip": ("MC-MoE dynamic skipping", "compress-experts {model} {out} --n-ce 0 --dynamic-skip " + " ".join(CALIB)),
}


def run_measured(cmd: list[str], env: dict) -> tuple[float, float, int, str]:
    start = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/tmp")
    out = proc.stdout.read()
    err = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {err.decode()[-800:]}")
    return time.time() - start, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024, out.decode()


def evaluate(folder: Path, testbed: Path, env: dict) -> dict:
    result = {}
    for name in ("prose", "code"):
        _w, _c, _r, out = run_measured(
            [sys.executable, "-m", "moecompress.cli.main", "eval", str(folder), "--data", str(testbed / f"heldout_{name}.txt"), "--max-tokens", "40000", "--json"],
            env,
        )
        result[name] = json.loads(out.strip().splitlines()[-1])["ppl"]
    result["mean"] = math.sqrt(result["prose"] * result["code"])
    return result


def size_mib(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", type=Path, default=REPO.parent / "shared" / "testbed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mc_quality"))
    ap.add_argument("--only", default="")
    ap.add_argument("--report", type=Path, default=REPO / "reports" / "results.md")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    args.work.mkdir(parents=True, exist_ok=True)
    testbed = args.testbed.resolve()
    cache = args.work / "results.json"
    previous = {r["name"]: r for r in json.loads(cache.read_text())} if cache.exists() else {}
    rows = []
    base = {"name": "bf16", "what": "original (bf16)", **evaluate(testbed, testbed, env), "size_mib": size_mib(testbed), "seconds": 0.0, "cpu_seconds": 0.0, "peak_rss_mib": 0.0}
    print(json.dumps(base), flush=True)
    rows.append(base)
    stats = args.work / "stats"
    if not stats.exists():
        w, c, r, _ = run_measured([sys.executable, "-m", "moecompress.cli.main", "stats", str(testbed), "--out", str(stats), *STATS_CALIB], env)
        print(json.dumps({"name": "stats", "seconds": w, "cpu_seconds": c, "peak_rss_mib": r / 2**20}), flush=True)
    only = set(filter(None, args.only.split(",")))
    for name, (what, template) in METHODS.items():
        if only and name not in only:
            if name in previous:  # --only re-runs some methods and keeps the others' last results
                rows.append(previous[name])
            continue
        out = args.work / name
        shutil.rmtree(out, ignore_errors=True)
        cmd = template.format(model=testbed, out=out, stats=stats).split()
        try:
            w, c, r, _ = run_measured([sys.executable, "-m", "moecompress.cli.main", *cmd], env)
        except RuntimeError as exc:
            print(json.dumps({"name": name, "error": str(exc)[-300:]}), flush=True)
            continue
        row = {"name": name, "what": what, **evaluate(out, testbed, env), "size_mib": size_mib(out), "seconds": w, "cpu_seconds": c, "peak_rss_mib": r / 2**20, "command": "moecompress " + " ".join(cmd)}
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_report(args.report, rows)
        cache.write_text(json.dumps(rows, indent=1))
    write_report(args.report, rows)
    cache.write_text(json.dumps(rows, indent=1))  # also the rows kept from the last run (--only)


def write_report(path: Path, rows: list[dict]) -> None:
    base = rows[0]["mean"]
    lines = [
        "# Results on the testbed",
        "",
        "Held-out perplexity of `../shared/testbed` (qwen3_moe, 16 experts, top-2, 22M parameters) after each",
        "method at its main settings: 256-token chunks, first 40k tokens of `heldout_prose.txt` and",
        "`heldout_code.txt`, geometric mean; calibration from the built-in `mixed` set (128 x 256 tokens;",
        "statistics 64 x 256), never the held-out files. Time, CPU time and peak RSS are those of the",
        "compress command's own process (`os.wait4`), on a 2-core CPU machine shared with other work, so",
        "time is noisy; CPU time is the steadier figure. Statistics (for the passes given `--stats`) are",
        "gathered once and not counted in their rows.",
        "",
        "Reproduce: `python benchmarks/quality.py` (JSON lines on stdout, this file rewritten).",
        "",
        "| method | prose | code | mean | vs bf16 | size MiB | time s | CPU s | peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = "—" if r["name"] == "bf16" else f"{100 * (r['mean'] / base - 1):+.2f}%"
        lines.append(
            f"| {r['what']} | {r['prose']:.3f} | {r['code']:.3f} | {r['mean']:.3f} | {vs} | {r['size_mib']:.1f} | {r['seconds']:.0f} | {r['cpu_seconds']:.0f} | {r['peak_rss_mib']:.0f} |"
        )
    lines += ["", "Commands:", ""] + [f"- {r['name']}: `{r['command']}`" for r in rows if "command" in r]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
