"""One sweep per pipeline where the passes allow it: fused vs pass-by-pass, in one run.

Two pipelines on the testbed (calibration: the built-in `mixed` set, 128 x 256 tokens, seed 0):

* ``prune_quantize``: stats -> prune (REAP, 8 of 16 experts, with the default output refit) -> quantize
  (W4 g128 GPTQ). Fused, the prune runs in the quantizer's sweep: each layer is pruned, refit,
  observed again and quantized, and only the quantized model is written (no intermediate pruned
  checkpoint). The refit then sees the activations of the already pruned AND quantized layers before
  it (pass by pass: of the pruned ones), so the bytes differ; the perplexity says by how much.
* ``stats_mixed``: stats -> quantize with a bit budget (2.5 bits over {2, 3, 4}). Fused, the statistics
  sweep also measures the bit-allocation profile, and the quantize pass reuses it instead of sweeping
  the model again: the same bytes (tests/pipeline/test_run.py checks that on a tiny model).

Each pipeline runs as its own process (``PipelineJob(fuse=True|False)``), one after the other, the two
modes alternating over ``--repeat`` runs; wall time, CPU time and peak RSS come from ``os.wait4``
(benchmarks/speed.py's ``run_child``). Held-out perplexity as in speed.py. Prints one JSON line per
run and one line of medians and ratios (fused / pass-by-pass) per pipeline.

    python benchmarks/pipeline_fusion.py [--repeat 2] [--threads 2] [--work /tmp/mc_fusion] [--pipelines prune_quantize,stats_mixed]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import median, perplexity, run_child  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CALIBRATION = {"source": "mixed", "nsamples": 128, "seqlen": 256, "seed": 0}
PIPELINES = {
    "prune_quantize": [{"stats": {}}, {"prune": {"method": "reap", "num_experts": 8}},
                       {"quantize": {"bits": 4, "group_size": 128}}],
    "stats_mixed": [{"stats": {}}, {"quantize": {"bits_budget": 2.5, "bit_choices": "2,3,4", "group_size": 128}}],
}

CHILD = textwrap.dedent('''
    import json, sys
    from moecompress.api.job import execute
    from moecompress.pipeline.run import PipelineJob
    from moecompress.pipeline.schema import PASSES, load_pipeline
    p = load_pipeline(sys.argv[1], PASSES)
    result = execute(PipelineJob(p, echo=lambda line: None, fuse=sys.argv[2] == "fused"), p.export["output"], False)
    print(json.dumps({"passes": result.summary["passes"], "pass_seconds": result.run.get("pass_seconds")}))
''')


def run_pipeline(name: str, mode: str, testbed: Path, work: Path, env: dict) -> dict:
    out = work / f"{name}_{mode}"
    shutil.rmtree(out, ignore_errors=True)
    doc = {"model": str(testbed), "calibration": CALIBRATION, "passes": PIPELINES[name], "export": {"output": str(out)}}
    path = work / f"{name}_{mode}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    done = run_child([sys.executable, "-c", CHILD, str(path), mode], env)
    summary = json.loads(done.pop("stdout").strip().splitlines()[-1])
    row = {"pipeline": name, "mode": mode, **done, **summary, "ppl": perplexity(out, testbed, env)}
    shutil.rmtree(out)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--testbed", type=Path, default=REPO.parent / "shared" / "testbed")
    ap.add_argument("--work", type=Path, default=Path("/tmp/mc_fusion"))
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pipelines", default=",".join(PIPELINES))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO)}
    for name in args.pipelines.split(","):
        rows: dict[str, list[dict]] = {"fused": [], "separate": []}
        for r in range(args.repeat):
            for mode in (("fused", "separate") if r % 2 == 0 else ("separate", "fused")):
                row = run_pipeline(name, mode, args.testbed, args.work, env)
                rows[mode].append(row)
                print(json.dumps(row), flush=True)
        med = {m: {k: median([x[k] for x in rows[m]]) for k in ("wall_s", "cpu_s", "peak_rss_mib")} for m in rows}
        for m in rows:
            med[m]["ppl"] = rows[m][0]["ppl"]["mean"]
        print(json.dumps({"pipeline": name, "median": med, "threads": args.threads, "repeat": args.repeat,
                          "ratio_fused_over_separate": {k: round(med["fused"][k] / med["separate"][k], 3)
                                                        for k in ("wall_s", "cpu_s", "peak_rss_mib", "ppl")}}), flush=True)


if __name__ == "__main__":
    main()
