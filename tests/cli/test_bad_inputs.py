"""Issue 16, "no traceback for any input": a table of bad or unlucky inputs across every command and
the YAML pipeline.

Each case runs in process through ``CliRunner().invoke(app, args)`` and asserts EITHER exit code 2 with
exactly one non-empty stderr line ``error: ...`` naming the problem (a substring), no OUT and no
staging folder left, and every input unchanged -- OR, for input that is legitimately acceptable (the
case id starts with ``ok-``), exit 0 and a correct result. A problem only the work itself can find (NaN
weights, found when their layer is loaded) is marked ``midway``: the per-layer progress lines a
non-terminal run prints for the layers already done may precede the one error line.

Placeholders ``@name`` in a case's arguments (and pipeline YAML) are replaced by paths: the module's
fixtures (models, statistics, calibration files) and, per case, ``@tmp`` (the case's own folder) and
``@out`` (``@tmp/out``).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizer_util import save_tiny_tokenizer
from typer.testing import CliRunner

from moecompress.cli.main import app
from moecompress.model.tiny import save_tiny_model

runner = CliRunner()

SMALL = ("--nsamples", "4", "--seqlen", "16")
PROGRESS = re.compile(r"^[\w ,-]+: \d+/\d+ layers$")  # LayerProgress's line when stderr is not a terminal
RTN = ("--method", "rtn", "--group-size", "32")


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    error: str | None  # substring of the one error line; None: legitimately accepted (id "ok-...")
    setup: Callable[[Path, dict], None] | None = None  # makes per-case inputs in @tmp
    check: Callable[[object, Path, dict], None] | None = None  # for accepted input: is the result right?
    midway: bool = False  # found during the work: per-layer progress lines may precede the error line


def fill(text: str, paths: dict) -> str:
    return re.sub(r"@([a-z_0-9]+)", lambda m: str(paths.get(m.group(1), m.group(0))), text)


def write_file(name: str, text: str):
    def setup(tmp: Path, paths: dict) -> None:
        (tmp / name).write_text(fill(text, paths))
    return setup


def make_dir(name: str, files: dict[str, str] | None = None):
    def setup(tmp: Path, paths: dict) -> None:
        (tmp / name).mkdir()
        for fname, text in (files or {}).items():
            (tmp / name / fname).write_text(text)
    return setup


# --------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------

BASE_CALIB = "calibration: {source: @calib, nsamples: 4, seqlen: 16, seed: 0}\n"
QUANT = "passes:\n  - quantize: {method: rtn, group_size: 32}\n"
EXPORT = "export: {format: native, output: @out}\n"


def yaml_case(id: str, text: str, error: str | None, check=None) -> Case:
    return Case(id, ("run", "@tmp/p.yaml"), error, setup=write_file("p.yaml", text), check=check)


def pipe(model="model: @moe\n", calib=BASE_CALIB, passes=QUANT, export=EXPORT, extra="") -> str:
    return model + calib + passes + export + extra


# --------------------------------------------------------------------------------------------------
# Checks of accepted input
# --------------------------------------------------------------------------------------------------


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def check_inspect_json(result, tmp, paths):
    summary = json.loads(result.stdout)
    assert summary["num_experts"] == 4 and summary["top_k"] == 2 and summary["moe_layers"] == [0, 1, 2]


def check_native_counts(result, tmp, paths):
    """A quantized checkpoint has the logical parameter counts of its source (its packed codes are not weights)."""
    native = json.loads(result.stdout)
    source = json.loads(runner.invoke(app, ["inspect", paths["bare"], "--json"]).stdout)
    for key in ("params_total", "params_routed_experts", "params_active", "estimated_bytes"):
        assert native[key] == source[key], key
    assert 0 < native["params_active"] < native["params_total"]


def check_per_channel(result, tmp, paths):
    qc = _config(tmp / "out")["quantization_config"]
    assert qc["quant_method"] == "moecompress" and qc["group_size"] == -1
    assert {tuple(m["bits"]) for m in qc["modules"].values()} == {(3, 3, 3, 3)}


def check_ct_then_lint(result, tmp, paths):
    qc = _config(tmp / "out")["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors"
    lint = runner.invoke(app, ["lint", str(tmp / "out"), "--json"])
    assert lint.exit_code == 0 and json.loads(lint.stdout)["clean"] is True, lint.output


def check_keep_all(result, tmp, paths):
    assert _config(tmp / "out")["num_local_experts"] == 4
    kept = json.loads((tmp / "out" / "kept_experts.json").read_text())
    assert all(sorted(v) == [0, 1, 2, 3] for v in kept["layers"].values())


def check_eval_json(result, tmp, paths):
    r = json.loads(result.stdout)
    assert r["chunks"] == 1 and r["tokens"] == 15 and r["ppl"] > 1


def check_dynamic_skip(result, tmp, paths):
    s = json.loads(result.stdout)
    assert s["n_ce"] == 0 and s["dynamic_skip"] is True and (tmp / "out" / "config.json").is_file()


def check_bit_choices_list(result, tmp, paths):
    qc = _config(tmp / "out")["quantization_config"]
    widths = {b for m in qc["modules"].values() for b in m["bits"]}
    assert widths <= {2, 4} and (tmp / "out" / "pipeline.yaml").is_file()


def check_stats_receives_profile(result, tmp, paths):
    assert (tmp / "prof" / "profile.json").is_file()
    assert _config(tmp / "out")["quantization_config"]["quant_method"] == "moecompress"


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------

Q = ("quantize", "@moe", "@out")
P = ("prune", "@moe", "@out")
MG = ("merge", "@moe", "@out")
CE = ("compress-experts", "@moe", "@out")
ST = ("stats", "@moe", "--out", "@out", "--calib", "@calib", *SMALL)
EV = ("eval", "@moe", "--data", "@evaltext")

CASES: list[Case] = [
    # ---------------------------------------------------------------- inspect
    Case("inspect-missing-model", ("inspect", "@tmp/nope"), "does not exist"),
    Case("inspect-file-not-folder", ("inspect", "@textfile"), "is not a folder"),
    Case("inspect-no-config-json", ("inspect", "@noconfig"), "has no config.json"),
    Case("inspect-no-weights", ("inspect", "@noweights"), "no model.safetensors"),
    Case("inspect-dense-model", ("inspect", "@dense"), "llama"),
    Case("inspect-corrupt-config", ("inspect", "@corrupt"), "config.json"),
    Case("inspect-top-k-0", ("inspect", "@topk0"), "num_experts_per_tok"),
    Case("inspect-unknown-dtype", ("inspect", "@baddtype"), "dtype must be one of"),
    Case("inspect-group-size-0", ("inspect", "@moe", "--group-size", "0"), "--group-size"),
    Case("inspect-native-missing-tensor", ("inspect", "@holed"), "is incomplete"),
    Case("inspect-config-json-a-list", ("inspect", "@tmp/m"), "config.json",
         setup=lambda tmp, p: (shutil.copytree(p["moe"], tmp / "m"), (tmp / "m" / "config.json").write_text("[1, 2]"))),
    Case("inspect-config-without-model-type", ("inspect", "@tmp/m"), "model_type",
         setup=lambda tmp, p: (shutil.copytree(p["moe"], tmp / "m"), (tmp / "m" / "config.json").write_text('{"num_experts": 4}'))),
    Case("inspect-unknown-model-type", ("inspect", "@tmp/m"), "foo_moe",
         setup=lambda tmp, p: (shutil.copytree(p["moe"], tmp / "m"), (tmp / "m" / "config.json").write_text('{"model_type": "foo_moe"}'))),
    Case("inspect-num-experts-0", ("inspect", "@tmp/m"), "must be an integer >= 1",
         setup=lambda tmp, p: _copy_with_config(Path(p["moe"]), tmp / "m", lambda c: c.update(num_local_experts=0, num_experts=0))),
    Case("inspect-corrupt-safetensors", ("inspect", "@tmp/m"), "model.safetensors",
         setup=lambda tmp, p: (shutil.copytree(p["moe"], tmp / "m"), (tmp / "m" / "model.safetensors").write_bytes(b"\x00garbage" * 10))),
    Case("inspect-unknown-option", ("inspect", "@moe", "--bits", "4"), "--bits"),
    Case("ok-inspect-native-checkpoint-logical-counts", ("inspect", "@native", "--json"), None, check=check_native_counts),
    Case("ok-inspect-json-without-tokenizer", ("inspect", "@bare", "--json"), None, check=check_inspect_json),
    # ---------------------------------------------------------------- stats
    Case("stats-calib-missing-file", ("stats", "@moe", "--out", "@out", "--calib", "@tmp/nope.txt", *SMALL), "not found"),
    Case("stats-calib-empty-file", ("stats", "@moe", "--out", "@out", "--calib", "@emptytxt", *SMALL), "is empty"),
    Case("stats-calib-too-short", ("stats", "@moe", "--out", "@out", "--calib", "@shorttxt", *SMALL), "tokens"),
    Case("stats-calib-unknown-set", ("stats", "@moe", "--out", "@out", "--calib", "prosee", *SMALL), "prosee"),
    Case("stats-calib-wrong-suffix", ("stats", "@moe", "--out", "@out", "--calib", "@csvfile", *SMALL), "neither .txt nor .jsonl"),
    Case("stats-calib-jsonl-without-text", ("stats", "@moe", "--out", "@out", "--calib", "@tmp/c.jsonl", *SMALL), 'needs a "text" field',
         setup=write_file("c.jsonl", '{"body": "the quick brown fox"}\n')),
    Case("stats-calib-jsonl-bad-line", ("stats", "@moe", "--out", "@out", "--calib", "@tmp/c.jsonl", *SMALL), "line 2: not valid JSON",
         setup=write_file("c.jsonl", '{"text": "the quick brown fox"}\n{"text": oops}\n')),
    Case("stats-calib-folder-without-text-files", ("stats", "@moe", "--out", "@out", "--calib", "@tmp/d", *SMALL), "holds no .txt or .jsonl",
         setup=make_dir("d", {"notes.md": "hello"})),
    Case("stats-calib-empty-string", ("stats", "@moe", "--out", "@out", "--calib", "", *SMALL), "--calib is empty"),
    Case("stats-coverage-layer-negative", (*ST, "--coverage-layer", "-1"), "--coverage-layer"),
    Case("stats-corrupt-tokenizer", ("stats", "@tmp/m", "--out", "@out", "--calib", "@calib", *SMALL), "cannot load the tokenizer",
         setup=lambda tmp, p: (shutil.copytree(p["moe"], tmp / "m"), (tmp / "m" / "tokenizer.json").write_text("{not json"))),
    Case("stats-nsamples-0", (*ST, "--nsamples", "0"), "--nsamples"),
    Case("stats-seqlen-1", (*ST, "--seqlen", "1"), "--seqlen"),
    Case("stats-seqlen-above-positions", (*ST, "--seqlen", "1000"), "positions"),
    Case("stats-batch-size-negative", (*ST, "--batch-size", "-1"), "--batch-size"),
    Case("stats-seed-negative", (*ST, "--seed", "-1"), "--seed"),
    Case("stats-coverage-layer-not-moe", (*ST, "--coverage-layer", "7"), "--coverage-layer 7 is not an MoE layer"),
    Case("stats-super-percentile-150", (*ST, "--super-percentile", "150"), "--super-percentile"),
    Case("stats-super-ratio-nan", (*ST, "--super-ratio", "nan"), "--super-ratio"),
    Case("stats-coverage-threshold-inf", (*ST, "--coverage-threshold", "inf"), "--coverage-threshold"),
    Case("stats-no-tokenizer", ("stats", "@bare", "--out", "@out", "--calib", "@calib", *SMALL), "no tokenizer files"),
    Case("stats-out-is-model", ("stats", "@moe", "--out", "@moe", "--calib", "@calib", *SMALL), "is the model itself"),
    Case("stats-out-inside-model", ("stats", "@moe", "--out", "@moe/sub", "--calib", "@calib", *SMALL), "lies inside the model"),
    Case("stats-out-holds-calib", ("stats", "@moe", "--out", "@tmp", "--calib", "@tmp/c.jsonl", *SMALL, "--overwrite"),
         "contains the calibration source", setup=write_file("c.jsonl", '{"text": "the quick brown fox jumps over the lazy dog again and again"}\n' * 20)),
    Case("stats-out-is-a-file", ("stats", "@moe", "--out", "@tmp/f.txt", "--calib", "@calib", *SMALL), "is not a folder",
         setup=write_file("f.txt", "mine")),
    Case("stats-out-exists-no-overwrite", ST, "--overwrite", setup=make_dir("out", {"keep.txt": "mine"})),
    Case("stats-save-pipeline-to-folder", (*ST, "--save-pipeline", "@tmp/sp"), "is a folder", setup=make_dir("sp")),
    Case("stats-missing-calib-option", ("stats", "@moe", "--out", "@out"), "--calib"),
    # ---------------------------------------------------------------- quantize
    Case("quantize-bits-5", (*Q, *RTN, "--bits", "5"), "--bits must be one of"),
    Case("quantize-bits-not-a-number", (*Q, "--bits", "four"), "Invalid value for '--bits'"),
    Case("quantize-group-size-0", (*Q, "--method", "rtn", "--group-size", "0"), "group_size must be a positive group length"),
    Case("quantize-group-size-negative-2", (*Q, "--method", "rtn", "--group-size", "-2"), "group_size must be a positive group length"),
    Case("quantize-group-size-longer-than-dims", (*Q, "--method", "rtn", "--group-size", "128"), "group size 128"),
    Case("quantize-ct-group-size-48-does-not-divide", (*Q, "--method", "rtn", "--group-size", "48", "--format", "compressed-tensors"),
         "group size 48"),
    Case("quantize-damp-nan", (*Q, "--damp", "nan", "--calib", "@calib", *SMALL), "--damp"),
    Case("quantize-damp-0", (*Q, "--damp", "0", "--calib", "@calib", *SMALL), "--damp"),
    Case("quantize-batch-size-negative", (*Q, *RTN, "--batch-size", "-1"), "--batch-size"),
    Case("quantize-nsamples-0", (*Q, "--calib", "@calib", "--nsamples", "0", "--seqlen", "16"), "--nsamples"),
    Case("quantize-seqlen-1", (*Q, "--calib", "@calib", "--nsamples", "4", "--seqlen", "1"), "--seqlen"),
    Case("quantize-unknown-method", (*Q, "--method", "awq"), "unknown method 'awq'"),
    Case("quantize-unknown-fallback", (*Q, *RTN, "--fallback", "drop"), "unknown fallback 'drop'"),
    Case("quantize-unknown-format", (*Q, *RTN, "--format", "gguf"), "--format"),
    Case("quantize-attention-bits-5", (*Q, *RTN, "--quantize-attention", "--attention-bits", "5"), "--attention-bits"),
    Case("quantize-shared-expert-bits-7", (*Q, *RTN, "--shared-expert-bits", "7"), "--shared-expert-bits"),
    Case("quantize-min-tokens-fraction-1.5", (*Q, *RTN, "--min-tokens-fraction", "1.5"), "--min-tokens-fraction"),
    Case("quantize-no-tokenizer-gptq", ("quantize", "@bare", "@out", "--calib", "@calib", *SMALL, "--group-size", "32"), "no tokenizer files"),
    Case("quantize-dense-model", ("quantize", "@dense", "@out", *RTN), "llama"),
    Case("quantize-corrupt-config", ("quantize", "@corrupt", "@out", *RTN), "config.json"),
    Case("quantize-top-k-0", ("quantize", "@topk0", "@out", *RTN), "num_experts_per_tok"),
    Case("quantize-unknown-dtype", ("quantize", "@baddtype", "@out", *RTN), "dtype must be one of"),
    # NaN weights are found when their layer is loaded: the layers before it were already processed
    # (the per-layer progress lines of a non-terminal run precede the error; a terminal's bar is transient).
    Case("quantize-nan-weights", ("quantize", "@nan", "@out", *RTN), "holds NaN/Inf", midway=True),
    Case("stats-nan-weights", ("stats", "@nan", "--out", "@out", "--calib", "@calib", *SMALL), "holds NaN/Inf", midway=True),
    Case("quantize-missing-tensor", ("quantize", "@holeddense", "@out", *RTN), "lacks model.layers.1.self_attn.q_proj.weight"),
    Case("quantize-already-quantized", ("quantize", "@native", "@out", *RTN), "run quantize on the unquantized model"),
    Case("quantize-out-is-model", ("quantize", "@moe", "@moe", *RTN), "is the model itself"),
    Case("quantize-out-inside-model", ("quantize", "@moe", "@moe/q", *RTN), "lies inside the model"),
    Case("quantize-out-dot", ("quantize", "@moe", ".", *RTN), "must name a new folder"),
    Case("quantize-out-exists-no-overwrite", (*Q, *RTN), "--overwrite", setup=make_dir("out", {"keep.txt": "mine"})),
    Case("quantize-out-under-a-file", ("quantize", "@moe", "@tmp/f.txt/out", *RTN), "is a file", setup=write_file("f.txt", "x")),
    Case("quantize-save-pipeline-to-folder", (*Q, *RTN, "--save-pipeline", "@tmp/sp"), "is a folder", setup=make_dir("sp")),
    Case("quantize-save-pipeline-is-model-config", (*Q, *RTN, "--save-pipeline", "@moe/config.json"), "lies inside the model"),
    Case("ok-quantize-per-channel-group-size-minus-1", ("quantize", "@bare", "@out", "--method", "rtn", "--group-size", "-1", "--bits", "3"),
         None, check=check_per_channel),
    Case("ok-quantize-compressed-tensors-lints-clean", ("quantize", "@bare", "@out", *RTN, "--format", "compressed-tensors"),
         None, check=check_ct_then_lint),
    Case("quantize-device-not-a-device", (*Q, *RTN, "--device", "gpu0"), "is not a torch device name"),
    Case("quantize-device-cuda-without-cuda", (*Q, *RTN, "--device", "cuda"), "torch sees no CUDA device"),
    Case("quantize-solve-memory-0", (*Q, *RTN, "--solve-memory-mb", "0"), "--solve-memory-mb"),
    # ---------------------------------------------------------------- quantize, mixed precision
    Case("mp-bits-budget-0", (*Q, *RTN, "--bits-budget", "0"), "--bits-budget"),
    Case("mp-bits-budget-1-infeasible", (*Q, *RTN, "--bits-budget", "1"), "infeasible"),
    Case("mp-bits-budget-nan", (*Q, *RTN, "--bits-budget", "nan"), "--bits-budget"),
    Case("mp-bit-choices-letters", (*Q, *RTN, "--bits-budget", "3", "--bit-choices", "a,b"), "--bit-choices"),
    Case("mp-bit-choices-empty", (*Q, *RTN, "--bits-budget", "3", "--bit-choices", ""), "--bit-choices"),
    Case("mp-bit-choices-width-5", (*Q, *RTN, "--bits-budget", "3", "--bit-choices", "2,5"), "--bit-choices"),
    Case("mp-bit-choices-duplicate", (*Q, *RTN, "--bits-budget", "3", "--bit-choices", "2,2,4"), "distinct"),
    Case("mp-unknown-granularity", (*Q, *RTN, "--bits-budget", "3", "--granularity", "neuron"), "--granularity"),
    Case("mp-unknown-allocation", (*Q, *RTN, "--bits-budget", "3", "--allocation", "local"), "--allocation"),
    Case("mp-unknown-super-experts", (*Q, *RTN, "--bits-budget", "3", "--super-experts", "drop"), "--super-experts"),
    Case("mp-unknown-profile-method", (*Q, *RTN, "--bits-budget", "3", "--profile-method", "awq"), "--profile-method"),
    Case("mp-min-bits-5", (*Q, *RTN, "--bits-budget", "3", "--min-bits", "5"), "--min-bits"),
    Case("mp-alpha-nan", (*Q, *RTN, "--bits-budget", "3", "--alpha", "nan"), "--alpha"),
    Case("mp-beta-negative", (*Q, *RTN, "--bits-budget", "3", "--beta", "-1"), "--beta"),
    Case("mp-min-bits-above-max-bits", (*Q, *RTN, "--bits-budget", "3", "--min-bits", "4", "--max-bits", "2"), "--min-bits"),
    Case("mp-ct-needs-layer-granularity", (*Q, *RTN, "--bits-budget", "3", "--format", "compressed-tensors"), "--granularity layer"),
    Case("mp-ct-super-experts-keep", (*Q, *RTN, "--bits-budget", "3", "--format", "compressed-tensors", "--granularity", "layer",
                                      "--super-experts", "keep"), "--super-experts keep"),
    Case("mp-stats-of-another-model", (*Q, *RTN, "--bits-budget", "3", "--calib", "@calib", *SMALL, "--stats", "@tmp/other"),
         "another model", setup=lambda tmp, p: shutil.copytree(p["stats_other"], tmp / "other")),
    Case("mp-stats-is-a-file", (*Q, *RTN, "--bits-budget", "3", "--calib", "@calib", *SMALL, "--stats", "@textfile"), "is not a folder"),
    Case("mp-no-tokenizer-for-profile", ("quantize", "@bare", "@out", *RTN, "--bits-budget", "3", "--calib", "@calib", *SMALL),
         "no tokenizer files"),
    Case("ok-mp-stats-folder-receives-profile", (*Q, *RTN, "--bits-budget", "4.5", "--bit-choices", "2,4", "--calib", "@calib", *SMALL,
                                                 "--stats", "@tmp/prof"), None, check=check_stats_receives_profile),
    # ---------------------------------------------------------------- eval
    Case("eval-missing-data-option", ("eval", "@moe"), "--data"),
    Case("eval-data-missing-file", ("eval", "@moe", "--data", "@tmp/nope.txt"), "does not exist"),
    Case("eval-data-empty-file", ("eval", "@moe", "--data", "@emptytxt"), "is empty"),
    Case("eval-data-is-a-folder", ("eval", "@moe", "--data", "@tmp"), "is a folder"),
    Case("eval-max-tokens-0", (*EV, "--seqlen", "16", "--max-tokens", "0"), "--max-tokens"),
    Case("eval-max-tokens-below-seqlen", (*EV, "--seqlen", "16", "--max-tokens", "8"), "--max-tokens"),
    Case("eval-seqlen-1", (*EV, "--seqlen", "1"), "--seqlen"),
    Case("eval-seqlen-above-positions", (*EV, "--seqlen", "1000"), "positions"),
    Case("eval-batch-size-0", (*EV, "--seqlen", "16", "--batch-size", "0"), "--batch-size"),
    Case("eval-text-shorter-than-a-chunk", ("eval", "@moe", "--data", "@shorttxt", "--seqlen", "64"), "fewer than one chunk"),
    Case("eval-no-tokenizer", ("eval", "@bare", "--data", "@evaltext", "--seqlen", "16"), "tokenizer"),
    Case("eval-missing-model", ("eval", "@tmp/nope", "--data", "@evaltext"), "does not exist"),
    Case("eval-nan-weights", ("eval", "@nan", "--data", "@evaltext", "--seqlen", "16"), "NaN"),
    Case("ok-eval-max-tokens-equal-seqlen", (*EV, "--seqlen", "16", "--max-tokens", "16", "--json"), None, check=check_eval_json),
    # ---------------------------------------------------------------- prune
    Case("prune-keep-ratio-0", (*P, "--keep-ratio", "0", "--stats", "@stats"), "--keep-ratio"),
    Case("prune-keep-ratio-1.5", (*P, "--keep-ratio", "1.5", "--stats", "@stats"), "--keep-ratio"),
    Case("prune-keep-ratio-nan", (*P, "--keep-ratio", "nan", "--stats", "@stats"), "--keep-ratio"),
    Case("prune-keep-ratio-inf", (*P, "--keep-ratio", "inf", "--stats", "@stats"), "--keep-ratio"),
    Case("prune-quantized-model", ("prune", "@native", "@out", "--num-experts", "2", "--calib", "sample", *SMALL),
         "run prune on the unquantized model"),
    Case("prune-num-experts-0", (*P, "--num-experts", "0", "--stats", "@stats"), "--num-experts"),
    Case("prune-num-experts-above-e", (*P, "--num-experts", "9", "--stats", "@stats"), "exceeds the model's 4 experts"),
    Case("prune-num-experts-below-top-k", (*P, "--num-experts", "1", "--stats", "@stats"), "top-k"),
    Case("prune-both-ratio-and-count", (*P, "--num-experts", "2", "--keep-ratio", "0.5", "--stats", "@stats"), "exactly one"),
    Case("prune-neither-ratio-nor-count", (*P, "--stats", "@stats"), "exactly one"),
    Case("prune-unknown-method", (*P, "--method", "random", "--num-experts", "2", "--stats", "@stats"), "unknown pruning method"),
    Case("prune-refit-damp-negative", (*P, "--num-experts", "2", "--stats", "@stats", "--refit-damp", "-1"), "--refit-damp"),
    Case("prune-refit-sweeps-0", (*P, "--num-experts", "2", "--stats", "@stats", "--refit-sweeps", "0"), "--refit-sweeps"),
    Case("prune-similarity-threshold-2", (*P, "--method", "dern", "--num-experts", "2", "--stats", "@stats",
                                          "--similarity-threshold", "2"), "--similarity-threshold"),
    Case("prune-similarity-threshold-nan", (*P, "--method", "dern", "--num-experts", "2", "--stats", "@stats",
                                            "--similarity-threshold", "nan"), "--similarity-threshold"),
    Case("prune-stats-missing-folder", (*P, "--num-experts", "2", "--stats", "@tmp/nope"), "does not exist"),
    Case("prune-stats-without-stats-json", (*P, "--num-experts", "2", "--stats", "@tmp/empty"), "holds no stats.json",
         setup=make_dir("empty")),
    Case("prune-stats-of-another-model", (*P, "--num-experts", "2", "--stats", "@stats_other"), "collect statistics on this model"),
    Case("prune-stats-corrupt-json", (*P, "--num-experts", "2", "--stats", "@tmp/bad"), "stats.json",
         setup=make_dir("bad", {"stats.json": "{not json"})),
    Case("prune-eval-data-missing", (*P, "--num-experts", "2", "--stats", "@stats", "--eval-data", "@tmp/nope.txt"), "is not a file"),
    Case("prune-eval-max-tokens-below-seqlen", (*P, "--num-experts", "2", "--stats", "@stats", "--eval-data", "@evaltext",
                                                "--eval-max-tokens", "8", "--eval-seqlen", "16"), "--eval-max-tokens"),
    Case("prune-dense-model", ("prune", "@dense", "@out", "--num-experts", "2", "--calib", "@calib", *SMALL), "llama"),
    Case("prune-out-is-a-file", ("prune", "@moe", "@tmp/f.txt", "--num-experts", "2", "--stats", "@stats"), "is not a folder",
         setup=write_file("f.txt", "x")),
    Case("prune-out-is-stats-folder", ("prune", "@moe", "@stats", "--num-experts", "2", "--stats", "@stats", "--overwrite"),
         "is the statistics folder itself"),
    Case("prune-no-tokenizer-for-refit", ("prune", "@bare", "@out", "--num-experts", "2", "--calib", "@calib", *SMALL),
         "no tokenizer files"),
    Case("ok-prune-keep-ratio-1-keeps-all", (*P, "--keep-ratio", "1", "--stats", "@stats", "--no-refit"), None, check=check_keep_all),
    # ---------------------------------------------------------------- merge
    Case("merge-num-experts-missing", ("merge", "@moe", "@out", "--stats", "@stats"), "--num-experts"),
    Case("merge-num-experts-0", (*MG, "--num-experts", "0", "--stats", "@stats"), "--num-experts"),
    Case("merge-num-experts-above-e", (*MG, "--num-experts", "5", "--stats", "@stats"), "exceeds the model's 4 experts"),
    Case("merge-num-experts-below-top-k", (*MG, "--num-experts", "1", "--stats", "@stats"), "top-k"),
    Case("merge-unknown-method", (*MG, "--num-experts", "2", "--method", "hcsmoe", "--stats", "@stats"), "unknown merging method"),
    Case("merge-unknown-router", (*MG, "--num-experts", "2", "--router", "magic", "--stats", "@stats"), "unknown --router"),
    Case("merge-unknown-router-mode", (*MG, "--num-experts", "2", "--router-mode", "max", "--stats", "@stats"), "unknown --router-mode"),
    Case("merge-unknown-grouping", (*MG, "--num-experts", "2", "--grouping", "weights", "--stats", "@stats"), "unknown --grouping"),
    Case("merge-unknown-merge-weights", (*MG, "--num-experts", "2", "--merge-weights", "avg", "--stats", "@stats"), "unknown --merge-weights"),
    Case("merge-unknown-dominance", (*MG, "--num-experts", "2", "--dominance", "size", "--stats", "@stats"), "unknown --dominance"),
    Case("merge-standard-router-global", (*MG, "--num-experts", "2", "--global", "--stats", "@stats"), "same expert count"),
    Case("merge-refit-damp-inf", (*MG, "--num-experts", "2", "--stats", "@stats", "--refit-damp", "inf"), "--refit-damp"),
    Case("merge-stats-of-another-model", (*MG, "--num-experts", "2", "--stats", "@stats_other"), "collect statistics on this model"),
    Case("merge-quantized-model", ("merge", "@native", "@out", "--num-experts", "2", "--calib", "sample", *SMALL),
         "run merge on the unquantized model"),
    Case("merge-top-k-0", ("merge", "@topk0", "@out", "--num-experts", "2", "--stats", "@stats"), "num_experts_per_tok"),
    # ---------------------------------------------------------------- compress-experts
    Case("ce-n-ce-equal-top-k", (*CE, "--n-ce", "2", "--calib", "@calib", *SMALL), "--n-ce 2 must be smaller than top-k"),
    Case("ce-n-ce-negative", (*CE, "--n-ce", "-1", "--calib", "@calib", *SMALL), "--n-ce"),
    Case("ce-n-ce-0-without-dynamic-skip", (*CE, "--n-ce", "0", "--calib", "@calib", *SMALL), "--n-ce 0"),
    Case("ce-protect-tokens-1.5", (*CE, "--dynamic-skip", "--protect-tokens", "1.5", "--calib", "@calib", *SMALL), "--protect-tokens"),
    Case("ce-protect-tokens-nan", (*CE, "--dynamic-skip", "--protect-tokens", "nan", "--calib", "@calib", *SMALL), "--protect-tokens"),
    Case("ce-lr-0", (*CE, "--lr", "0", "--calib", "@calib", *SMALL), "--lr"),
    Case("ce-fit-batch-tokens-0", (*CE, "--fit-batch-tokens", "0", "--calib", "@calib", *SMALL), "--fit-batch-tokens"),
    Case("ce-distill-without-ces", (*CE, "--n-ce", "0", "--dynamic-skip", "--distill-steps", "2", "--calib", "@calib", *SMALL), "--distill-steps"),
    Case("ce-eval-data-missing", (*CE, "--calib", "@calib", *SMALL, "--eval-data", "@tmp/nope.txt"), "--eval-data"),
    Case("ce-eval-max-tokens-below-seqlen", (*CE, "--calib", "@calib", *SMALL, "--eval-data", "@evaltext", "--eval-seqlen", "16",
                                             "--eval-max-tokens", "8"), "--eval-max-tokens"),
    Case("ce-no-tokenizer", ("compress-experts", "@bare", "@out", "--calib", "@calib", *SMALL), "no tokenizer files"),
    Case("ce-native-missing-tensor", ("compress-experts", "@holed", "@out", "--calib", "sample", *SMALL), "is incomplete"),
    Case("ce-seed-negative", (*CE, "--calib", "@calib", *SMALL, "--seed", "-3"), "--seed"),
    Case("ok-ce-dynamic-skip-only", (*CE, "--n-ce", "0", "--dynamic-skip", "--calib", "@calib", *SMALL, "--fit-steps", "2", "--json"),
         None, check=check_dynamic_skip),
    # ---------------------------------------------------------------- lint
    Case("lint-missing-folder", ("lint", "@tmp/nope"), "is not a folder"),
    Case("lint-a-file", ("lint", "@textfile"), "is not a folder"),
    Case("lint-dense-original-model", ("lint", "@moe"), "not a compressed-tensors checkpoint"),
    Case("lint-native-checkpoint", ("lint", "@native"), "not a compressed-tensors checkpoint"),
    Case("lint-corrupt-config", ("lint", "@corrupt"), "config.json"),
    # ---------------------------------------------------------------- run (YAML pipelines)
    Case("yaml-file-missing", ("run", "@tmp/nope.yaml"), "does not exist"),
    Case("yaml-is-a-folder", ("run", "@tmp"), "is a folder"),
    yaml_case("yaml-empty-file", "", "is empty"),
    yaml_case("yaml-only-comments", "# nothing here\n", "is empty"),
    yaml_case("yaml-not-yaml", "model: [unclosed\npasses: {\n", "not valid YAML"),
    Case("yaml-not-utf8", ("run", "@tmp/p.yaml"), "UTF-8", setup=lambda tmp, p: (tmp / "p.yaml").write_bytes(b"model: \xff\xfe\x00\n")),
    yaml_case("yaml-two-documents", pipe() + "---\n" + pipe(), "not valid YAML"),
    yaml_case("yaml-undefined-alias", pipe(passes="passes: *steps\n"), "not valid YAML"),
    yaml_case("yaml-tab-indentation", "model: @moe\npasses:\n\t- quantize: {}\n" + EXPORT, "not valid YAML"),
    yaml_case("yaml-model-a-number", pipe(model="model: 5\n"), "model folder 5 does not exist"),
    yaml_case("yaml-top-level-list", "- model: x\n", "must be a mapping"),
    yaml_case("yaml-top-level-scalar", "just some words\n", "must be a mapping"),
    yaml_case("yaml-unknown-top-key", pipe(extra="exports: {}\n"), "unknown key 'exports'"),
    yaml_case("yaml-missing-model", pipe(model=""), "missing 'model'"),
    yaml_case("yaml-model-missing-folder", pipe(model="model: @tmp/nope\n"), "does not exist"),
    yaml_case("yaml-model-is-a-list", pipe(model="model: [@moe]\n"), "model must be a string, got a list"),
    yaml_case("yaml-model-is-a-mapping", pipe(model="model: {path: @moe}\n"), "model must be a string, got a mapping"),
    yaml_case("yaml-model-dense", pipe(model="model: @dense\n"), "llama"),
    yaml_case("yaml-duplicate-export", pipe(extra="export: {output: @tmp/other}\n"), "given twice"),
    yaml_case("yaml-duplicate-field-in-pass", pipe(passes="passes:\n  - quantize: {method: rtn, method: gptq}\n"), "given twice"),
    yaml_case("yaml-passes-missing", pipe(passes=""), "missing 'passes'"),
    yaml_case("yaml-passes-empty-list", pipe(passes="passes: []\n"), "non-empty list"),
    yaml_case("yaml-passes-a-mapping", pipe(passes="passes: {quantize: {}}\n"), "non-empty list"),
    yaml_case("yaml-pass-two-names", pipe(passes="passes:\n  - {quantize: {}, prune: {}}\n"), "exactly one pass name"),
    yaml_case("yaml-unknown-pass", pipe(passes="passes:\n  - squash: {}\n"), "unknown pass 'squash'"),
    yaml_case("yaml-unknown-field", pipe(passes="passes:\n  - quantize: {bitz: 4}\n"), "unknown field 'bitz'"),
    yaml_case("yaml-cli-spelling-of-field", pipe(passes="passes:\n  - quantize: {group-size: 32}\n"), "unknown field 'group-size'"),
    yaml_case("yaml-pass-fields-a-list", pipe(passes="passes:\n  - quantize: [bits, 4]\n"), "must be a mapping"),
    yaml_case("yaml-int-field-a-word", pipe(passes="passes:\n  - quantize: {bits: four}\n"), "quantize.bits must be an integer"),
    yaml_case("yaml-int-field-a-float", pipe(passes="passes:\n  - quantize: {method: rtn, group_size: 32.5}\n"), "must be an integer"),
    yaml_case("yaml-int-field-a-bool", pipe(passes="passes:\n  - quantize: {method: rtn, bits: true}\n"), "must be an integer"),
    yaml_case("yaml-bool-field-a-word", pipe(passes="passes:\n  - quantize: {method: rtn, symmetric: maybe}\n"), "true or false"),
    yaml_case("yaml-float-field-nan", pipe(passes="passes:\n  - quantize: {damp: .nan}\n"), "--damp"),
    yaml_case("yaml-string-field-a-list", pipe(passes="passes:\n  - quantize: {method: [rtn, gptq]}\n"), "quantize.method must be a string, got a list"),
    yaml_case("yaml-string-field-a-one-item-list", pipe(passes="passes:\n  - quantize: {method: [rtn], group_size: 32}\n"),
              "quantize.method must be a string, got a list"),
    yaml_case("yaml-string-field-a-mapping", pipe(passes="passes:\n  - quantize: {method: {name: rtn}}\n"), "quantize.method must be a string, got a mapping"),
    yaml_case("yaml-bits-5", pipe(passes="passes:\n  - quantize: {method: rtn, group_size: 32, bits: 5}\n"), "bits must be one of"),
    yaml_case("yaml-bits-null", pipe(passes="passes:\n  - quantize: {method: rtn, group_size: 32, bits: null}\n"), "bits"),
    yaml_case("yaml-unknown-method", pipe(passes="passes:\n  - quantize: {method: awq}\n"), "unknown method 'awq'"),
    yaml_case("yaml-prune-keep-ratio-1.5", pipe(passes="passes:\n  - prune: {keep_ratio: 1.5}\n"), "--keep-ratio"),
    yaml_case("yaml-merge-without-num-experts", pipe(passes="passes:\n  - merge: {router: standard}\n"), "num-experts"),
    yaml_case("yaml-merge-num-experts-above-e", pipe(passes="passes:\n  - merge: {num_experts: 9}\n"), "exceeds the model's 4 experts"),
    yaml_case("yaml-stats-coverage-layer-not-moe", pipe(passes="passes:\n  - stats: {coverage_layer: 9}\n"
                                                              "  - quantize: {method: rtn, group_size: 32}\n"), "is not an MoE layer"),
    yaml_case("yaml-second-pass-bad-value", pipe(passes="passes:\n  - prune: {num_experts: 2, refit: false}\n"
                                                        "  - quantize: {method: rtn, group_size: 128}\n"), "group size 128"),
    yaml_case("yaml-ce-n-ce-above-top-k", pipe(passes="passes:\n  - compress_experts: {n_ce: 3}\n"), "--n-ce 3 must be smaller"),
    yaml_case("yaml-calibration-unknown-key", pipe(calib="calibration: {source: @calib, samples: 4}\n"), "unknown key 'samples'"),
    yaml_case("yaml-calibration-nsamples-0", pipe(calib="calibration: {source: @calib, nsamples: 0, seqlen: 16}\n"), "nsamples"),
    yaml_case("yaml-calibration-seqlen-a-word", pipe(calib="calibration: {source: @calib, seqlen: long}\n"), "calibration.seqlen must be an integer"),
    yaml_case("yaml-calibration-missing-file", pipe(calib="calibration: {source: @tmp/nope.jsonl, nsamples: 4, seqlen: 16}\n",
                                                    passes="passes:\n  - quantize: {group_size: 32}\n"), "nope.jsonl"),
    yaml_case("yaml-calibration-a-list", pipe(calib="calibration: [mixed]\n"), "calibration must be a mapping"),
    yaml_case("yaml-calibration-source-a-list", pipe(calib="calibration: {source: [prose, code]}\n"), "calibration.source must be a string, got a list"),
    yaml_case("yaml-export-missing", pipe(export=""), "missing 'export'"),
    yaml_case("yaml-export-without-output", pipe(export="export: {format: native}\n"), "needs 'output'"),
    yaml_case("yaml-export-unknown-format", pipe(export="export: {format: gguf, output: @out}\n"), "export.format 'gguf' unknown"),
    yaml_case("yaml-export-unknown-key", pipe(export="export: {output: @out, compress: true}\n"), "unknown key 'compress'"),
    yaml_case("yaml-export-overwrite-a-word", pipe(export="export: {output: @out, overwrite: please}\n"), "true or false"),
    yaml_case("yaml-export-output-is-model", pipe(export="export: {output: @moe, overwrite: true}\n"), "is the model itself"),
    yaml_case("yaml-export-output-inside-model", pipe(export="export: {output: @moe/out}\n"), "lies inside the model"),
    yaml_case("yaml-export-output-empty", pipe(export="export: {output: ''}\n"), "output"),
    yaml_case("yaml-export-hf-after-quantize", pipe(export="export: {format: hf, output: @out}\n"), "export.format hf"),
    yaml_case("yaml-export-hf-after-compress-experts", pipe(passes="passes:\n  - compress_experts: {n_ce: 1}\n",
                                                           export="export: {format: hf, output: @out}\n"), "export.format hf"),
    yaml_case("yaml-export-overwrite-null", pipe(export="export: {output: @out, overwrite: null}\n"), "export.overwrite must be true or false, got null"),
    yaml_case("yaml-calibration-nsamples-null", pipe(calib="calibration: {source: @calib, nsamples: null}\n"), "calibration.nsamples must be an integer, got null"),
    yaml_case("yaml-pass-field-null", pipe(passes="passes:\n  - quantize: {method: rtn, group_size: ~}\n"), "quantize.group_size must be an integer, got null"),
    yaml_case("yaml-pass-field-empty", pipe(passes="passes:\n  - quantize: {method: rtn, damp: }\n"), "quantize.damp must be a number, got null"),
    yaml_case("yaml-pass-without-colon", pipe(passes="passes:\n  - quantize\n"), "quantize"),
    yaml_case("yaml-bit-choices-nested-list", pipe(passes="passes:\n  - quantize: {method: rtn, bits_budget: 3, bit_choices: [[2, 4]]}\n"),
              "must be a string"),
    yaml_case("yaml-export-ct-without-quantize", pipe(passes="passes:\n  - prune: {num_experts: 2}\n",
                                                      export="export: {format: compressed-tensors, output: @out}\n"), "needs a quantize pass"),
    yaml_case("yaml-eval-unknown-key", pipe(extra="eval: {data: [@evaltext], chunk: 16}\n"), "unknown key 'chunk'"),
    yaml_case("yaml-eval-data-missing", pipe(extra="eval: {data: [@tmp/nope.txt], seqlen: 16}\n"), "is not a file"),
    yaml_case("yaml-eval-max-tokens-below-seqlen", pipe(extra="eval: {data: [@evaltext], seqlen: 16, max_tokens: 8}\n"), "eval.max_tokens must hold at least one chunk"),
    yaml_case("yaml-eval-seqlen-1", pipe(extra="eval: {data: [@evaltext], seqlen: 1}\n"), "eval.seqlen must be an integer >= 2"),
    yaml_case("yaml-eval-without-data", pipe(extra="eval: {seqlen: 16}\n"), "eval needs 'data'"),
    yaml_case("yaml-eval-data-a-number", pipe(extra="eval: {data: 5, seqlen: 16}\n"), "eval data 5 is not a file"),
    yaml_case("yaml-eval-max-tokens-a-word", pipe(extra="eval: {data: [@evaltext], max_tokens: all}\n"), "eval.max_tokens must be an integer"),
    yaml_case("yaml-eval-data-a-mapping", pipe(extra="eval: {data: {file: @evaltext}}\n"), "eval.data must be a list"),
    yaml_case("yaml-prune-after-quantize", pipe(passes="passes:\n  - quantize: {method: rtn, group_size: 32}\n  - prune: {num_experts: 2}\n"),
              "cannot run after quantize"),
    yaml_case("yaml-quantize-twice", pipe(passes="passes:\n  - quantize: {method: rtn}\n  - quantize: {method: rtn}\n"), "quantize appears twice"),
    yaml_case("yaml-only-stats", pipe(passes="passes:\n  - stats: {}\n"), "no pass writes a model"),
    yaml_case("yaml-prune-after-exact-merge", pipe(passes="passes:\n  - merge: {num_experts: 2, router: exact}\n  - prune: {num_experts: 2}\n"),
              "cannot read the expert -> group map"),
    yaml_case("ok-yaml-bit-choices-as-a-list",
              pipe(passes="passes:\n  - quantize: {method: rtn, group_size: 32, bits_budget: 4.5, bit_choices: [2, 4]}\n"),
              None, check=check_bit_choices_list),
]

NUM_CASES = len(CASES)


# --------------------------------------------------------------------------------------------------
# Fixtures: every model, statistics folder and file the table names, built once
# --------------------------------------------------------------------------------------------------


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _copy_with_config(src: Path, dest: Path, edit) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text())
    edit(config)
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _stats_of(model: Path, dest: Path) -> Path:
    from moecompress.calibration.collect import collect_stats
    from moecompress.calibration.types import CalibrationSet
    from moecompress.model.loading import LayerwiseModel

    ids = torch.randint(3, 200, (4, 16), generator=torch.Generator().manual_seed(0))
    collect_stats(LayerwiseModel(model), CalibrationSet(ids, None, "random"), batch_size=4).save(dest)
    return dest


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad_inputs")
    p: dict[str, Path] = {"root": root}

    p["moe"] = root / "moe"  # qwen3_moe: 3 MoE layers, 4 experts, top-2, H = I = 64, with a tokenizer
    save_tiny_model("qwen3_moe", p["moe"])
    save_tiny_tokenizer(p["moe"])
    p["bare"] = root / "bare"  # mixtral without tokenizer files
    save_tiny_model("mixtral", p["bare"])

    from transformers import AutoModelForCausalLM, LlamaConfig

    dense = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256))
    p["dense"] = root / "dense"
    dense.save_pretrained(str(p["dense"]))
    save_tiny_tokenizer(p["dense"])

    p["corrupt"] = root / "corrupt"
    shutil.copytree(p["moe"], p["corrupt"])
    (p["corrupt"] / "config.json").write_text('{"model_type": "qwen3_moe", "num_experts": 4,')
    p["topk0"] = _copy_with_config(p["moe"], root / "topk0", lambda c: c.update(num_experts_per_tok=0))
    p["baddtype"] = _copy_with_config(p["moe"], root / "baddtype", lambda c: c.update(dtype="float13"))
    p["noconfig"] = root / "noconfig"
    shutil.copytree(p["moe"], p["noconfig"])
    (p["noconfig"] / "config.json").unlink()
    p["noweights"] = root / "noweights"
    p["noweights"].mkdir()
    shutil.copy(p["moe"] / "config.json", p["noweights"] / "config.json")

    p["nan"] = root / "nan"
    shutil.copytree(p["moe"], p["nan"])
    tensors = load_file(str(p["nan"] / "model.safetensors"))
    key = next(k for k in sorted(tensors) if ".layers.1." in k and "experts" in k)
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] = float("nan")
    save_file(tensors, str(p["nan"] / "model.safetensors"), metadata={"format": "pt"})

    from moecompress.api.quantize import QuantizeOptions, quantize

    p["native"] = root / "native"
    quantize(p["bare"], p["native"], QuantizeOptions(method="rtn", group_size=32))
    p["holed"] = root / "holed"
    shutil.copytree(p["native"], p["holed"])
    shard = next(f for f in sorted(p["holed"].glob("*.safetensors")) if any("experts" in k for k in load_file(str(f))))
    tensors = load_file(str(shard))
    del tensors[next(k for k in sorted(tensors) if "experts" in k)]
    save_file(tensors, str(shard), metadata={"format": "pt"})

    p["holeddense"] = root / "holeddense"  # a plain checkpoint lacking layer 1's query projection
    shutil.copytree(p["moe"], p["holeddense"])
    tensors = load_file(str(p["holeddense"] / "model.safetensors"))
    del tensors[next(k for k in sorted(tensors) if ".layers.1." in k and "q_proj" in k)]
    save_file(tensors, str(p["holeddense"] / "model.safetensors"), metadata={"format": "pt"})

    p["stats"] = _stats_of(p["moe"], root / "stats")
    other = root / "other8"
    save_tiny_model("qwen3_moe", other, num_experts=8)
    p["stats_other"] = _stats_of(other, root / "stats_other")
    shutil.rmtree(other)

    p["calib"] = root / "calib.jsonl"
    p["calib"].write_text("".join(
        json.dumps({"text": f"The quick brown fox jumps over the lazy dog {i}. def add(a, b): return a + b * {i}"}) + "\n"
        for i in range(40)))
    p["emptytxt"] = root / "empty.txt"
    p["emptytxt"].write_text("")
    p["shorttxt"] = root / "short.txt"
    p["shorttxt"].write_text("The fox.")
    p["csvfile"] = root / "calib.csv"
    p["csvfile"].write_text("text\nthe quick brown fox\n")
    p["textfile"] = root / "file.txt"
    p["textfile"].write_text("a plain file, not a folder\n")
    p["evaltext"] = root / "eval.txt"
    p["evaltext"].write_text("The quick brown fox jumps over the lazy dog. " * 3)
    return p


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``folder`` (hidden ones included) -> (size, mtime_ns)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        st = path.lstat()
        out[str(path.relative_to(folder))] = (0 if path.is_dir() else st.st_size, st.st_mtime_ns)
    return out


# --------------------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------------------


def test_the_table_is_large_and_ids_are_unique():
    assert NUM_CASES >= 70
    assert len({c.id for c in CASES}) == NUM_CASES
    assert all((c.error is None) == c.id.startswith("ok-") for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, inputs: dict, tmp_path: Path):
    paths = {**{k: str(v) for k, v in inputs.items()}, "tmp": str(tmp_path), "out": str(tmp_path / "out")}
    if case.setup is not None:
        case.setup(tmp_path, paths)
    before_inputs, before_tmp = snapshot(inputs["root"]), snapshot(tmp_path)
    args = [fill(a, paths) for a in case.args]

    result = runner.invoke(app, args)

    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"traceback for {args}:\n{result.output}\n{result.exc_info}"
    )
    assert snapshot(inputs["root"]) == before_inputs, "an input (model, statistics, calibration file) was changed"
    if case.error is None:
        assert result.exit_code == 0, result.output
        assert case.check is not None
        case.check(result, tmp_path, paths)
        assert not list(tmp_path.glob(".*moecompress-stage-*")), "staging folder left behind"
        return
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if case.midway:
        progress = [line for line in lines[:-1] if PROGRESS.match(line)]
        assert progress, "a midway case whose error came before any work: drop midway"
        lines = lines[len(progress):]
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    assert len(lines) == 1, f"not one line:\n{result.stderr}"
    assert lines[0].startswith("error:"), lines[0]
    assert fill(case.error, paths) in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before_tmp, "OUT, a staging folder or a changed input was left in the case's folder"
