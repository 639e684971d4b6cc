"""Heal on the testbed: held-out perplexity of compressed models with and without `moecompress heal`.

    python benchmarks/heal.py [--testbed ../shared/testbed] [--work /tmp/mc_heal] [--cases a,b] [--steps 100] [--lr 1e-3]
    python benchmarks/heal.py --select-lr 1e-3,3e-3,1e-2 --select-case prune-reap-8   # choose lr on calibration only
    python benchmarks/heal.py --chart-case merge-msmoe-4 --chart-steps 0,25,50,100,200

Every command runs in its own single-threaded subprocess (OMP_NUM_THREADS=1): wall time, CPU time and peak
RSS come from ``os.wait4`` of that process. Perplexity: ``moecompress eval`` on the testbed's held-out
prose and code files (256-token chunks, first 40k tokens), geometric mean, as benchmarks/quality.py.
Calibration for compression and healing: the built-in ``mixed`` set (never the held-out files), or the
teacher's own samples where a row says ``--calib sample``. Settings (learning rate, steps, trainables,
schedule) are compared with ``--select-lr ... --select-case CASE [--extra ...]``, which runs the heal without
evaluating held-out perplexity and reports the whole-model guard's KL on the held-back calibration
sequences and on the teacher-sampled guard sequences; never on the held-out files. The chart evaluates
held-out perplexity at a few step counts for display only.

Prints one JSON line per measurement; results are cached in WORK/results.json (delete to start over);
writes reports/heal.md and reports/heal_curve.png.
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
STATS_CALIB = ["--calib", "mixed", "--nsamples", "64", "--seqlen", "256"]
CALIB = ["--calib", "mixed", "--nsamples", "128", "--seqlen", "256"]

# case -> (what it is, the compress command after `moecompress`, with {model} {out} {stats})
CASES = {
    "prune-reap-8": ("REAP pruning + refit, 8 of 16", "prune {model} {out} --method reap --num-experts 8 --stats {stats}"),
    "merge-msmoe-8": ("M-SMoE merging (RegMean) + refit, 8 of 16", "merge {model} {out} --method msmoe --num-experts 8 --stats {stats}"),
    "merge-msmoe-4": ("M-SMoE merging (RegMean) + refit, 4 of 16", "merge {model} {out} --method msmoe --num-experts 4 --stats {stats}"),
    "merge-exact-8": ("M-SMoE exact router (native checkpoint) + refit, 8 of 16",
                      "merge {model} {out} --method msmoe --num-experts 8 --router exact --per-layer --stats {stats}"),
    "ce-top1": ("compressed experts, n_ce = 1 (top-1 compute), layer-wise fit",
                "compress-experts {model} {out} --n-ce 1 " + " ".join(CALIB)),
}


def run_cli(args: list[str], env: dict) -> dict:
    """`moecompress ARGS` in a subprocess: its wall time, and CPU time and peak RSS from os.wait4 (that process only)."""
    import tempfile

    start = time.time()
    command = [sys.executable, "-m", "moecompress.cli.main", *args]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, env=env, cwd="/tmp")
        out = proc.stdout.read()
        _pid, status, usage = os.wait4(proc.pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            err.seek(0)
            raise RuntimeError(f"moecompress {' '.join(args)} failed: {err.read().decode()[-800:]}")
    return {"seconds": round(time.time() - start, 1), "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "stdout": out.decode()}


def evaluate(folder: Path, testbed: Path, env: dict) -> dict:
    result = {}
    for name in ("prose", "code"):
        out = run_cli(["eval", str(folder), "--data", str(testbed / f"heldout_{name}.txt"), "--max-tokens", "40000", "--json"], env)
        result[name] = json.loads(out["stdout"].strip().splitlines()[-1])["ppl"]
    result["mean"] = math.sqrt(result["prose"] * result["code"])
    return result


class Cache:
    def __init__(self, path: Path):
        self.path = path
        self.rows = json.loads(path.read_text()) if path.exists() else {}

    def get(self, key: str, make):
        if key not in self.rows:
            self.rows[key] = make()
            self.path.write_text(json.dumps(self.rows, indent=1))
        row = self.rows[key]
        print(json.dumps({"key": key, **{k: v for k, v in row.items() if k != "records"}}), flush=True)
        return row


def heal_args(student: Path, out: Path, testbed: Path, steps: int, lr: float, extra: list[str]) -> list[str]:
    return ["heal", str(student), str(out), "--teacher", str(testbed), *CALIB, "--steps", str(steps), "--lr", str(lr),
            "--overwrite", "--json", *extra]


def heal_row(student: Path, out: Path, testbed: Path, steps: int, lr: float, extra: list[str], env: dict, evaluate_it=True) -> dict:
    m = run_cli(heal_args(student, out, testbed, steps, lr, extra), env)
    summary = json.loads(m.pop("stdout").strip().splitlines()[-1])
    records = summary["records"]
    row = {**m, "train_tokens": summary["train_tokens"], "steps": steps, "lr": lr, "extra": extra,
           "model_guard": summary.get("model_guard"),
           "heldout_calib_before": sum(r["heldout_before"] for r in records),
           "heldout_calib_after": sum(r["heldout_after"] for r in records),
           "kept": [r["kept"] for r in records], "records": records,
           "command": "moecompress " + " ".join(heal_args(student, out, testbed, steps, lr, extra))}
    if evaluate_it:
        row.update(evaluate(out, testbed, env))
    return row


def top1_model(testbed: Path, folder: Path) -> Path:
    """The original with num_experts_per_tok = 1 (top-1 compute, no compensation)."""
    if not folder.exists():
        shutil.copytree(testbed, folder)
        config = json.loads((folder / "config.json").read_text())
        config["num_experts_per_tok"] = 1
        (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--testbed", type=Path, default=REPO.parent / "shared" / "testbed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mc_heal"))
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--extra", default="", help="extra heal options for every case (space separated), e.g. '--mode end-to-end'")
    ap.add_argument("--select-lr", default="")
    ap.add_argument("--select-case", default="prune-reap-8")
    ap.add_argument("--chart-case", default="")
    ap.add_argument("--chart-steps", default="0,25,50,100,200")
    ap.add_argument("--report", type=Path, default=REPO / "reports" / "heal.md")
    args = ap.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    args.work.mkdir(parents=True, exist_ok=True)
    testbed = args.testbed.resolve()
    cache = Cache(args.work / "results.json")
    stats = args.work / "stats"
    if not stats.exists():
        run_cli(["stats", str(testbed), "--out", str(stats), *STATS_CALIB], env)

    def student(case: str) -> Path:
        out = args.work / case
        if not out.exists():
            m = run_cli(CASES[case][1].format(model=testbed, out=out, stats=stats).split(), env)
            cache.rows[f"{case}/compress"] = {k: v for k, v in m.items() if k != "stdout"}
        return out

    cache.get("original", lambda: evaluate(testbed, testbed, env))
    if args.select_lr:
        for lr in [float(x) for x in args.select_lr.split(",")]:
            extra = args.extra.split()
            cache.get(f"select/{args.select_case}/lr={lr:g}/steps={args.steps}" + (f"/{' '.join(extra)}" if extra else ""),
                      lambda: heal_row(student(args.select_case), args.work / "select", testbed, args.steps, lr, extra, env, False))
    if args.chart_case:
        extra = args.extra.split()
        suffix = f"/{' '.join(extra)}" if extra else ""
        for steps in [int(x) for x in args.chart_steps.split(",")]:
            key = f"chart/{args.chart_case}/lr={args.lr:g}/steps={steps}{suffix}"
            same = f"{args.chart_case}/heal/lr={args.lr:g}/steps={steps}{suffix}"  # a table row with these settings
            if steps == 0:
                cache.get(key, lambda: {"train_tokens": 0, **evaluate(student(args.chart_case), testbed, env)})
            elif same in cache.rows:
                cache.get(key, lambda: dict(cache.rows[same]))
            else:
                cache.get(key, lambda: heal_row(student(args.chart_case), args.work / "chart", testbed, steps, args.lr, extra, env))
    for case in filter(None, args.cases.split(",")):
        cache.get(f"{case}/before", lambda: evaluate(student(case), testbed, env))
        extra = args.extra.split()
        tag = f"{case}/heal/lr={args.lr:g}/steps={args.steps}" + (f"/{' '.join(extra)}" if extra else "")
        cache.get(tag, lambda: heal_row(student(case), args.work / f"{case}-healed", testbed, args.steps, args.lr, extra, env))
        if case == "ce-top1":
            cache.get("top1", lambda: evaluate(top1_model(testbed, args.work / "top1"), testbed, env))
    write_report(args, cache.rows)
    write_chart(args, cache.rows)


def write_chart(args, rows: dict) -> None:
    if not args.chart_case:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = f"chart/{args.chart_case}/lr={args.lr:g}/steps="
    suffix = f"/{args.extra}" if args.extra else ""
    points = sorted((r["train_tokens"], r["mean"]) for k, r in rows.items()
                    if k.startswith(prefix) and (k.endswith(suffix) if suffix else "/--" not in k))
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot([p[0] / 1e6 for p in points], [p[1] for p in points], "o-", label=f"{args.chart_case} healed")
    ax.axhline(rows["original"]["mean"], color="gray", ls="--", label="original")
    ax.set_xlabel("training tokens (millions, with repeats)")
    ax.set_ylabel("held-out ppl (geo-mean)")
    ax.set_title(f"heal {args.chart_case}: {args.extra.replace('--mode ', '') or 'blockwise'}, lr {args.lr:g}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(REPO / "reports" / "heal_curve.png")


def _kl(h: dict) -> str:
    """The whole-model guard: KL per token on the held-back calibration sequences and on the teacher-sampled
    guard sequences (unhealed -> healed, as measured; the written model is the student when not kept)."""
    g = h.get("model_guard")
    if g:
        line = f"{g['kl_student']:.4f} -> {g['kl_healed']:.4f}"
        if g.get("kl_student_sampled") == g.get("kl_student_sampled"):  # not nan
            line += f"; sampled {g['kl_student_sampled']:.4f} -> {g['kl_healed_sampled']:.4f}"
        return line + ("" if g["kept"] else " (student kept)")
    if len(h["records"]) == 1 and "layer" not in h["records"][0]:
        r = h["records"][0]
        return f"{r['heldout_before']:.4f} -> {r['heldout_after']:.4f}" + ("" if r["kept"] else " (student kept)")
    return "—"


def _pct(value: float, base: float) -> str:
    return f"{100 * (value / base - 1):+.2f}%"


def write_report(args, rows: dict) -> None:
    base = rows["original"]["mean"]
    lines = [
        "# Heal on the testbed",
        "",
        f"Generated by `python benchmarks/heal.py` (see its docstring). Held-out perplexity of `../shared/testbed`: "
        "256-token chunks, first 40k tokens of `heldout_prose.txt` and `heldout_code.txt`, geometric mean. "
        "Compression and healing calibrate on the built-in `mixed` set (128 x 256 tokens, seed 0), never the held-out files, "
        "unless a row says `--calib sample` (128 x 256 tokens sampled from the teacher). Heal: each row's label gives its lr, "
        "steps and the options beyond the defaults (blockwise, steps per decoder layer; 8 sequences per step; "
        "default trainables: ces when present, routers, LoRA rank 8 merged into the experts, "
        "norms; constant learning rate), 10% of the calibration sequences held back. Whole-model guard (both modes): KL(teacher || model) on the held-back calibration sequences and on "
        "16 x 256 tokens sampled from the teacher (its own distribution; no held-out data); the healed model is written only if the "
        "KL drops by more than 1 standard error of the paired per-sequence decrease on each (`--guard-z 1`), otherwise the student unchanged. "
        "One thread per process; time / CPU / peak RSS of the heal process itself (sampling the guard text included).",
        "",
        "| case | before: mean ppl | vs original | healed: prose | code | mean | vs original | parts kept | guard: KL/token held-back calib.; teacher-sampled (unhealed -> healed) | heal time s | CPU s | peak RSS MiB | training tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| original | {base:.3f} | — | {rows['original']['prose']:.3f} | {rows['original']['code']:.3f} | {base:.3f} | — | | | | | | |",
    ]
    for case in CASES:
        before = rows.get(f"{case}/before")
        for key, h in rows.items():
            if before is None or not key.startswith(f"{case}/heal/"):
                continue
            variant = key[len(case) + 6:]
            lines.append(f"| {case} ({variant}) | {before['mean']:.3f} | {_pct(before['mean'], base)} | {h['prose']:.3f} | "
                         f"{h['code']:.3f} | {h['mean']:.3f} | {_pct(h['mean'], base)} | {sum(h['kept'])}/{len(h['kept'])} | {_kl(h)} | "
                         f"{h['seconds']} | {h['cpu_seconds']} | {h['peak_rss_mib']} | {h['train_tokens']:,} |")
    if "top1" in rows and any(k.startswith("ce-top1/heal") for k in rows):
        top1, top2 = rows["top1"]["mean"], base
        gap = math.log(top1) - math.log(top2)
        lines += ["", f"Compressed experts at top-1 compute: log-ppl gap top-1 ({top1:.3f}) -> top-2 ({top2:.3f}) = {gap:.4f}; "
                  "a row recovers (log top-1 ppl - log its ppl) / gap. Settings are chosen on the guard's KLs (held-back "
                  "calibration and teacher-sampled sequences), never on the held-out columns.", "",
                  "| run | training tokens | wall s | CPU s | peak RSS MiB | KL held-back calib. (unhealed -> healed) | "
                  "KL teacher-sampled | kept | held-out mean ppl | gap recovered |", "|---|---|---|---|---|---|---|---|---|---|"]
        for k, r in rows.items():
            if k == "ce-top1/before" or k.startswith(("ce-top1/heal", "experiment/patched-view/ce-top1")):
                rec = (math.log(top1) - math.log(r["mean"])) / gap
                label = (" (before the ExpertsView fix, with the same fix patched in-process)" if k.startswith("experiment/") else "")
                g = r.get("model_guard") or {}
                calib = f"{g['kl_student']:.4f} -> {g['kl_healed']:.4f}" if g else ""
                sampled = f"{g['kl_student_sampled']:.4f} -> {g['kl_healed_sampled']:.4f}" if g else ""
                kept = ("yes" if g["kept"] else "no (student written)") if g else ""
                cost = ("| | | | " if k.endswith("before") else
                        f"| {r['train_tokens']:,} | {r['seconds']} | {r['cpu_seconds']} | {r['peak_rss_mib']} ")
                lines.append(f"| `{k}`{label} {cost}| {calib} | {sampled} | {kept} | {r['mean']:.3f} | {100 * rec:.1f}% |")
    sel = {k: r for k, r in rows.items() if k.startswith("select/")}
    if sel:
        lines += ["", "## Setting selection (held-back calibration and teacher-sampled sequences only; no held-out data)", "",
                  "Criterion: the whole-model guard's KL(teacher || healed model) per token, measured whether or not the guard kept "
                  "the heal, on the held-back calibration sequences and on the 16 teacher-sampled guard sequences (rows without "
                  "guard numbers predate the guard: end-to-end T^2 KL, blockwise the last layer's normalised output error).",
                  "", "| run | held-back calib. before -> after | teacher-sampled before -> after | kept | CPU s |", "|---|---|---|---|---|"]
        for k, r in sel.items():
            g, last = r.get("model_guard"), r["records"][-1]
            calib = (f"{g['kl_student']:.5f} -> {g['kl_healed']:.5f}" if g else
                     f"{last['heldout_before']:.5f} -> {last['heldout_after']:.5f}")
            sampled = (f"{g['kl_student_sampled']:.5f} -> {g['kl_healed_sampled']:.5f}"
                       if g and g.get("kl_student_sampled") == g.get("kl_student_sampled") else "—")
            kept = ("yes" if g["kept"] else "no") if g else f"{sum(r['kept'])}/{len(r['kept'])}"
            lines.append(f"| {k} | {calib} | {sampled} | {kept} | {r.get('cpu_seconds', '')} |")
    chart = sorted(((r["train_tokens"], k, r) for k, r in rows.items() if k.startswith("chart/")), key=lambda t: t[0])
    if chart:
        lines += ["", "## Held-out perplexity vs training tokens (display only; nothing chosen on it)", "",
                  "![heal curve](heal_curve.png)", "", "| run | training tokens | mean ppl |", "|---|---|---|"]
        lines += [f"| {k} | {t:,} | {r['mean']:.3f} |" for t, k, r in chart]
    lines += ["", "## Commands", "", "Students (in WORK, statistics: `moecompress stats TESTBED --out WORK/stats " + " ".join(STATS_CALIB) + "`):", ""]
    lines += [f"- {case}: `moecompress {template}`" for case, (_what, template) in CASES.items()]
    lines += ["", "Heal runs (a later `--calib` overrides the first):", ""]
    for k, r in rows.items():
        if "command" in r:
            lines.append(f"- {k}: `{r['command']}`")
    marker = "## Notes (written by hand, kept across regenerations)"
    old = args.report.read_text() if args.report.exists() else ""
    notes = old[old.index(marker):] if marker in old else ""
    args.report.write_text("\n".join(lines) + "\n" + ("\n" + notes if notes else ""))  # notes: hand-written, kept


if __name__ == "__main__":
    main()
