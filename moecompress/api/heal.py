"""``moecompress.heal``: a short knowledge distillation of a compressed model towards the original.

    from moecompress.api import heal, HealOptions
    result = heal("model-8of16", "model-8of16-healed", HealOptions(teacher="model"))

The student (MODEL: pruned, merged, compressed experts, or any dense model of the same architecture) is
trained towards the teacher (``--teacher``, the original) on calibration text; OUT has exactly the
student's format (adapters are merged into the weights), plus ``report.md`` and ``heal.json``. The
method is :mod:`moecompress.passes.heal`; this module is the job: checks, calibration, the work folder
(resume), writing, report.

Work folder: training state (hidden states of the calibration tokens on disk, per-layer results,
training checkpoints) lives in ``<OUT>.moecompress-heal-work/`` beside OUT (or ``--work-dir``), keyed by
the inputs and options (``moecompress-heal-work.json``). A run that is killed leaves it behind; rerunning the SAME command
continues from the last checkpoint, and gives the same bytes as an uninterrupted run. A different
command (other inputs or options) starts the folder over. It is removed after a successful run.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

import moecompress
from moecompress.api.calibration import CalibrationSpec, load_for_model, require_tokenizer
from moecompress.api.job import JobResult, Progress, execute, model_label, require_int
from moecompress.errors import MoeCompressError
from moecompress.export.writer import CheckpointWriter, outer_state
from moecompress.model.hub import resolve_model
from moecompress.model.loading import LayerwiseModel, read_config
from moecompress.modules.compressed_experts import MODULE_TYPE
from moecompress.passes import distill_ces
from moecompress.passes.heal import (
    GUARD_SEED_OFFSET,
    TRAINABLE,
    HealConfig,
    available_kinds,
    check_trainables,
    estimate_end_to_end_bytes,
    heal_blockwise,
    heal_end_to_end,
    teacher_targets_for,
)

WORK_SUFFIX = ".moecompress-heal-work"
SIDE_FILES = ("kept_experts.json",)  # the student's structure record, still true after healing


@dataclass
class HealOptions:
    teacher: str | None = None
    mode: str = "blockwise"
    train: str | None = None  # comma list; None: ces (when present), routers, lora, norms
    steps: int = 100
    lr: float = 1e-3
    lora_lr: float | None = None
    router_lr: float | None = None
    norm_lr: float | None = None
    lora_rank: int = 8
    batch_size: int = 8
    temperature: float = 1.0
    top_k: int = 1024
    holdout_fraction: float = 0.1
    checkpoint_every: int = 25
    work_dir: str | None = None
    calib: str = "mixed"
    nsamples: int = 128
    seqlen: int = 256
    seed: int = 0
    guard_samples: int = 16
    guard_z: float = 1.0
    schedule: str = "constant"
    eval_data: str | None = None
    eval_seqlen: int = 256
    eval_max_tokens: int | None = 40000

    def train_kinds(self) -> tuple[str, ...] | None:
        if self.train is None:
            return None
        if isinstance(self.train, (list, tuple)):
            return tuple(str(t).strip() for t in self.train)
        return tuple(t.strip() for t in str(self.train).split(",") if t.strip())

    def config(self) -> HealConfig:
        return HealConfig(
            mode=self.mode, train=self.train_kinds(), steps=self.steps, lr=self.lr, lora_lr=self.lora_lr, router_lr=self.router_lr,
            norm_lr=self.norm_lr, batch_size=self.batch_size,
            lora_rank=self.lora_rank, temperature=self.temperature, top_k=self.top_k,
            holdout_fraction=self.holdout_fraction, checkpoint_every=self.checkpoint_every, seed=self.seed,
            guard_samples=self.guard_samples, guard_z=self.guard_z, schedule=self.schedule,
        )

    def calibration(self) -> CalibrationSpec:
        return CalibrationSpec(self.calib, self.nsamples, self.seqlen, self.seed)

    def validate(self) -> None:
        if self.teacher is None or not str(self.teacher).strip():
            raise MoeCompressError("--teacher is required: the original (uncompressed) model the student was made from")
        if self.train is not None and not self.train_kinds():
            raise MoeCompressError(f"--train is empty; name one or more of {', '.join(TRAINABLE)}")
        self.config().validate()
        self.calibration().validate()
        require_int("eval_seqlen", self.eval_seqlen, 2)
        require_int("eval_max_tokens", self.eval_max_tokens, self.eval_seqlen)
        if self.eval_data is not None and not Path(self.eval_data).is_file():
            raise MoeCompressError(f"--eval-data {self.eval_data} is not a file")

    def result_fields(self) -> dict:
        """The options that change the output (the work folder's key); not where checkpoints go or how often."""
        skip = {"work_dir", "checkpoint_every", "eval_data", "eval_seqlen", "eval_max_tokens", "teacher"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------

_SAME = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")


def check_teacher(student_folder: Path, teacher_folder: Path) -> None:
    """The teacher must be the same architecture with the same vocabulary (one line otherwise)."""
    s, t = read_config(student_folder), read_config(teacher_folder)
    for key in _SAME:
        a, b = getattr(s, key, None), getattr(t, key, None)
        if a != b:
            raise MoeCompressError(
                f"the teacher {teacher_folder} has {key} {b!r} but the student {student_folder} has {a!r}; "
                "--teacher must be the original model the student was compressed from"
            )


def _router_paths(lm: LayerwiseModel, prefix: bool) -> list[str]:
    out = []
    for i, block in lm.view.blocks.items():
        path = f"{block.block_name}.{block.router_name}"
        out.append(f"{lm.view.layers_name}.{i}.{path}" if prefix else path)
    return out


def check_student(lm: LayerwiseModel, cfg: HealConfig) -> None:
    packed = [d for d in lm.packed_modules.values() if d.get("type") != MODULE_TYPE]
    if packed:
        raise MoeCompressError(
            f"{lm.folder} is a quantized moecompress checkpoint; heal the unquantized compressed model, then quantize it"
        )
    check_trainables(available_kinds(lm.model, _router_paths(lm, prefix=True)), cfg.train, f"student {lm.folder}")


def check_end_to_end_memory(lm: LayerwiseModel, cfg: HealConfig, seqlen: int) -> None:
    """Refuse end-to-end mode (before any work) when one float32 model + a batch's activations won't fit."""
    if cfg.mode != "end-to-end":
        return
    available = distill_ces.available_memory_bytes()
    if available is None:
        return
    c = lm.config
    blocks = list(lm.view.blocks.values())
    model_bytes = sum(p.numel() * 4 for p in lm.model.parameters())
    lora = sum(b.experts.num_experts * cfg.lora_rank * 4 * (3 * b.experts.hidden_size + 3 * b.experts.intermediate_size)
               for b in blocks)
    need = estimate_end_to_end_bytes(
        model_bytes, lora, cfg.batch_size * seqlen, c.num_hidden_layers, c.hidden_size,
        max((b.experts.intermediate_size for b in blocks), default=0), max((b.top_k for b in blocks), default=1),
        getattr(c, "num_attention_heads", 1), seqlen, c.vocab_size,
    )
    if need > available:
        raise MoeCompressError(
            f"--mode end-to-end holds the whole student in float32 plus one batch's activations (~{need / 2**30:.1f} GiB) "
            f"but only {available / 2**30:.1f} GiB is available; use --mode blockwise (one layer at a time) or a smaller --batch-size"
        )


# --------------------------------------------------------------------------------------------------
# Work folder
# --------------------------------------------------------------------------------------------------


def folder_fingerprint(folder: Path) -> list:
    """(name, size, mtime) of a model folder's files: changes when the checkpoint is rewritten, costs no read."""
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(Path(folder).iterdir()) if p.is_file()]


def work_key(student: Path, teacher: Path, options: HealOptions) -> str:
    doc = {"student": [str(student.resolve()), folder_fingerprint(student)],
           "teacher": [str(teacher.resolve()), folder_fingerprint(teacher)],
           "options": options.result_fields(), "version": moecompress.__version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_work_dir(out: Path) -> Path:
    out = Path(out).absolute()
    return out.parent / (out.name + WORK_SUFFIX)


WORK_MARKER = "moecompress-heal-work.json"  # names a folder as ours: only such a folder is ever removed


def _work_key(path: Path) -> str | None:
    """The run key a heal work folder holds; None when ``path`` is not one (no marker, or not ours)."""
    try:
        data = json.loads((path / WORK_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data.get("key") if isinstance(data, dict) else None


def open_work_dir(path: Path, key: str, announce=None) -> Path:
    """The work folder for ``key``: reused when it holds the same run (resume), otherwise started over.
    A folder without our marker is never emptied: a user's non-empty folder is refused."""
    if path.exists():
        old = _work_key(path)
        if old == key:
            if announce is not None:
                announce(f"resuming from the work folder {path}")
            return path
        if old is None and (not path.is_dir() or any(path.iterdir())):
            raise MoeCompressError(f"{path} exists and is not a heal work folder; remove it or pass another --work-dir")
        shutil.rmtree(path)
    path.mkdir(parents=True)
    (path / WORK_MARKER).write_text(json.dumps({"key": key}))
    return path


def remove_work_dir(path: Path) -> None:
    """After success: the training state is no longer needed (only a folder carrying our marker)."""
    if _work_key(path) is not None:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------


class HealJob:
    command = "heal"
    model_label: str | None = None

    def __init__(self, model: str | Path, options: HealOptions, out: str | Path | None = None, announce=None):
        # ``out``: where the default work folder goes (beside it); None (a pipeline's pass): beside the stage,
        # i.e. inside the pipeline's own staging folder, which a kill removes (no resume across pipeline runs).
        self.model, self.options, self.announce = Path(model), options, announce
        self.out = None if out is None else Path(out)

    @property
    def teacher(self) -> Path:
        return resolve_model(self.options.teacher)  # a folder, or a Hub id fetched into the cache

    def work_dir_for(self, stage: Path | None) -> Path | None:
        if self.options.work_dir:
            return Path(self.options.work_dir)
        if self.out is not None:
            return default_work_dir(self.out)
        return None if stage is None else default_work_dir(stage)

    @property
    def work_dir(self) -> Path | None:
        return self.work_dir_for(None)

    def inputs(self):
        o = self.options
        return [("model", self.model), ("teacher", o.teacher), ("calibration source", o.calibration().input_path()),
                ("evaluation data", o.eval_data)]

    def validate(self) -> None:
        o = self.options
        o.validate()
        cfg = o.config()
        check_teacher(self.model, self.teacher)
        lm = LayerwiseModel(self.model)
        check_student(lm, cfg)
        LayerwiseModel(self.teacher).require_dense("heal (as the teacher)")
        check_end_to_end_memory(lm, cfg, o.seqlen)
        require_tokenizer(self.teacher, o.calibration())
        from moecompress.api.output import check_not_an_input

        if self.work_dir is not None:
            check_not_an_input(self.work_dir, self.inputs())

    def write(self, stage: Path, progress: Progress | None) -> JobResult:
        o, cfg = self.options, self.options.config()
        calib, calibration = load_for_model(self.teacher, o.calibration(), self.announce)
        guard_ids = self._guard_sequences(calib.input_ids.shape[1])
        work = open_work_dir(self.work_dir_for(stage), work_key(self.model, self.teacher, o), self.announce)
        student = LayerwiseModel(self.model)
        storage = student.checkpoint_dtype
        writer = CheckpointWriter(stage, student.model, storage)
        if cfg.mode == "blockwise":
            records = self._blockwise(student, calib.input_ids, guard_ids, cfg, work, writer, storage, progress)
        else:
            records = self._end_to_end(student, calib.input_ids, guard_ids, cfg, work, writer, storage, progress)
        config = student.config
        config.dtype = storage
        writer.finish(config, self.model)
        for name in SIDE_FILES:
            if (self.model / name).is_file():
                shutil.copyfile(self.model / name, stage / name)
        # Timings go to the run record, never into OUT (same inputs and seed give the same bytes).
        seconds = [r.pop("seconds") for r in records]
        summary = self._summary(cfg, calibration, records, calib.input_ids)
        if o.eval_data is not None:
            summary["eval"] = self._evaluate(stage)
        (stage / "heal.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
        write_heal_report(stage / "report.md", summary)
        result = JobResult(None, summary)
        result.run["train_seconds"] = seconds
        result.notes.append(_loss_note(summary))
        if "eval" in summary:
            e = summary["eval"]
            result.notes.append(f"perplexity: teacher {e['teacher']:.4f}, student {e['student']:.4f} -> healed {e['healed']:.4f}")
        return result

    def _guard_sequences(self, seqlen: int) -> torch.Tensor:
        """``guard_samples`` sequences sampled from the teacher for the whole-model guard ([G, seqlen]; G may be 0).
        Seeded apart from the calibration seed, so with ``--calib sample`` they are never training text."""
        o = self.options
        if o.guard_samples == 0:
            return torch.zeros(0, seqlen, dtype=torch.long)
        spec = CalibrationSpec("sample", o.guard_samples, seqlen, o.seed + GUARD_SEED_OFFSET)
        if self.announce is not None:
            self.announce(f"guard: sampling {o.guard_samples} x {seqlen} tokens from the teacher")
        calib, _ = load_for_model(self.teacher, spec)
        return calib.input_ids

    def _blockwise(self, student, input_ids, guard_ids, cfg, work, writer, storage, progress):
        layers_dir = work / "layers"
        layers_dir.mkdir(exist_ok=True)
        layer_writer = CheckpointWriter(layers_dir, student.model, storage)
        name = student.view.layers_name

        def write_layer(i, layer):
            layer_writer.write_module(f"{name}.{i}", layer, f"layer-{i:05d}.safetensors")

        teacher = LayerwiseModel(self.teacher)
        records, guard = heal_blockwise(teacher, student, input_ids, cfg, work, write_layer, storage, progress, guard_ids)
        del teacher
        self.guard = None if guard is None else asdict(guard)
        for i in range(student.view.num_layers):
            if guard is None or guard.kept:
                adopt_shard(writer, layers_dir / f"layer-{i:05d}.safetensors")
            else:  # the healed model was not closer to the teacher on held-back text: write the student as it was
                writer.write_module(f"{name}.{i}", student.load_layer(i), f"layer-{i:05d}.safetensors")
                student.release_layer(i)
        student.load_outer()
        writer.write_tensors(outer_state(student.model, name), "outer.safetensors")
        student.release_outer()
        return [asdict(r) for r in records]

    def _end_to_end(self, student, input_ids, guard_ids, cfg, work, writer, storage, progress):
        from safetensors.torch import load_file, save_file

        from moecompress.passes.distill_ces import TeacherTargets

        targets_file = work / "teacher_targets.safetensors"
        all_ids = torch.cat([input_ids, guard_ids.to(input_ids.dtype)])  # guard rows last: scored, never trained on
        if not targets_file.is_file():
            # Teacher first, released before the student loads: one full model in memory at a time.
            teacher = LayerwiseModel(self.teacher).load_full()
            t = teacher_targets_for(teacher, all_ids, cfg)
            del teacher
            save_file({"logp": t.logp, "index": t.index, "tail_logp": t.tail_logp}, str(targets_file.with_suffix(".tmp")))
            targets_file.with_suffix(".tmp").rename(targets_file)
        saved = load_file(str(targets_file))
        targets = TeacherTargets(saved["logp"], saved["index"], saved["tail_logp"])
        model = student.load_full()
        record, guard = heal_end_to_end(model, student.view.layers_name, _router_paths(student, prefix=True), all_ids, targets,
                                        cfg, work, storage, progress, guard_count=guard_ids.shape[0])
        self.guard = None if guard is None else asdict(guard)
        name = student.view.layers_name
        for i in range(student.view.num_layers):
            writer.write_module(f"{name}.{i}", student.layers[i], f"layer-{i:05d}.safetensors")
        writer.write_tensors(outer_state(model, name), "outer.safetensors")
        return [asdict(record)]

    def _summary(self, cfg: HealConfig, calibration: dict, records: list[dict], input_ids: torch.Tensor) -> dict:
        o = self.options
        return {
            "command": "heal",
            "model": model_label(self),
            "teacher": str(o.teacher),
            "mode": cfg.mode,
            "train": list(cfg.train) if cfg.train else "default",
            "steps": cfg.steps,
            "lr": cfg.lr,
            "lora_lr": cfg.lora_lr,
            "router_lr": cfg.router_lr,
            "norm_lr": cfg.norm_lr,
            "batch_size": cfg.batch_size,
            "lora_rank": cfg.lora_rank,
            "temperature": cfg.temperature if cfg.mode == "end-to-end" else None,
            "top_k": cfg.top_k if cfg.mode == "end-to-end" else None,
            "holdout_fraction": cfg.holdout_fraction,
            "seed": cfg.seed,
            "schedule": cfg.schedule,
            "guard_samples": cfg.guard_samples,
            "guard_z": cfg.guard_z,
            "calibration": calibration,
            "train_tokens": _trained_tokens(cfg, input_ids, records),
            "records": records,
            "model_guard": getattr(self, "guard", None),
        }

    def _evaluate(self, stage: Path) -> dict:
        from moecompress.evaluate import evaluate

        o = self.options
        ppl = {name: evaluate(folder, o.eval_data, seqlen=o.eval_seqlen, max_tokens=o.eval_max_tokens).ppl
               for name, folder in (("teacher", self.teacher), ("student", self.model), ("healed", stage))}
        return {"data": str(o.eval_data), **ppl}


def _trained_tokens(cfg: HealConfig, input_ids: torch.Tensor, records: list[dict]) -> int:
    """Tokens the student was trained on (with repeats): steps x batch x seqlen per training run."""
    runs = sum(1 for r in records if r.get("steps"))
    return runs * cfg.steps * cfg.batch_size * input_ids.shape[1]


def adopt_shard(writer: CheckpointWriter, path: Path) -> None:
    """Copy a finished layer shard from the work folder into the stage and record it in the index."""
    from safetensors import safe_open

    shutil.copyfile(path, writer.folder / path.name)
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            if key in writer.weight_map:
                raise MoeCompressError(f"tensor {key} written twice; this is a bug in moecompress")
            t = f.get_slice(key)
            writer.weight_map[key] = path.name
            numel = 1
            for d in t.get_shape():
                numel *= d
            writer.total_bytes += numel * _dtype_bytes(t.get_dtype())


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}.get(name, 4)


def _loss_note(summary: dict) -> str:
    recs = [r for r in summary["records"] if r.get("steps")]
    kept = sum(1 for r in recs if r["kept"])
    what = "normalised block-output MSE" if summary["mode"] == "blockwise" else "T^2 KL per token"
    pairs = ", ".join(f"{r['heldout_before']:.4g}->{r['heldout_after']:.4g}" for r in recs)
    note = f"held-back calibration {what}: {pairs} ({kept} of {len(recs)} trained parts kept)"
    g = summary.get("model_guard")
    if g:
        note += f"; whole-model guard: {guard_line(g)}"
    return note


def guard_line(g: dict) -> str:
    """The whole-model guard in one line: KL per token, unhealed -> healed, on both sets, and the decision."""
    line = f"KL(teacher || model) held-back calibration {g['kl_student']:.5f} -> {g['kl_healed']:.5f}"
    if g.get("kl_student_sampled") == g.get("kl_student_sampled"):  # not nan: there were guard samples
        line += f", teacher-sampled {g['kl_student_sampled']:.5f} -> {g['kl_healed_sampled']:.5f}"
    verdict = ("healed model written" if g["kept"] else
               f"not lower by {g.get('z', 0):g} standard errors on both: the student is written unchanged")
    return f"{line}; {verdict}"


def heal(model: str | Path, out: str | Path, options: HealOptions | None = None, *, overwrite: bool = False,
         dry_run: bool = False, progress: Progress | None = None, announce=None, side_files=()) -> JobResult:
    """Heal ``model`` (the compressed student) towards ``options.teacher`` into ``out`` (same format as ``model``)."""
    model = resolve_model(model)
    options = options or HealOptions()
    job = HealJob(model, options, out, announce)
    result = execute(job, out, overwrite, dry_run, progress, side_files)
    if not dry_run and job.work_dir is not None:
        remove_work_dir(job.work_dir)  # OUT is complete: the training state is no longer needed
    return result


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def write_heal_report(path: Path, s: dict) -> None:
    from moecompress.report import markdown_table

    blockwise = s["mode"] == "blockwise"
    lines = [
        "# moecompress heal",
        "",
        f"- student: `{s['model']}`; teacher: `{s['teacher']}`",
        f"- mode: {s['mode']}" + (" (each decoder layer trained on the student's own propagated input to reproduce the "
                                  "teacher layer's output; normalised MSE)" if blockwise else
                                  f" (all layers jointly; T^2 KL(teacher || student) at temperature {s['temperature']}, "
                                  f"teacher top-{s['top_k']} + tail)"),
        f"- trained: {', '.join(s['train']) if isinstance(s['train'], list) else 'ces (if present), routers, LoRA rank ' + str(s['lora_rank']) + ' on the experts (merged), norms'}; "
        f"{s['steps']} Adam steps{' per layer' if blockwise else ''}, lr {s['lr']}"
        + "".join(f" ({what} {s[key]})" for what, key in (("LoRA", "lora_lr"), ("routers", "router_lr"), ("norms", "norm_lr"))
                  if s.get(key) is not None)
        + f", {s.get('schedule', 'constant')} schedule, {s['batch_size']} sequences per step, seed {s['seed']}",
        f"- calibration: {s['calibration']}; {s['holdout_fraction']:.0%} of the sequences held back (never trained on)",
        f"- training tokens (with repeats): {s['train_tokens']:,}",
        "",
    ]
    if s.get("eval"):
        e = s["eval"]
        lines += [f"Perplexity on {e['data']}: teacher {e['teacher']:.4f}, student {e['student']:.4f}, healed {e['healed']:.4f}", ""]
    headers = (["layer"] if blockwise else []) + ["trained tensors", "trained params", "loss first step", "loss last step",
                                                  "held-back before", "held-back after", "kept"]
    rows = []
    for r in s["records"]:
        trained = ", ".join(f"{k} {v}" for k, v in r["trained"].items()) or "-"
        row = ([r["layer"]] if blockwise else []) + [trained, r["trained_params"], r["loss_first"], r["loss_last"],
                                                     r["heldout_before"], r["heldout_after"], "yes" if r["kept"] else "no (original weights)"]
        rows.append(row)
    g = s.get("model_guard")
    if g:
        lines += [f"Whole-model guard ({s.get('guard_samples', 0)} sequences sampled from the teacher + the held-back calibration "
                  f"sequences; the healed model is kept only if its KL drops by more than {g.get('z', 0):g} standard errors of the "
                  f"paired per-sequence decrease on both): {guard_line(g)}.", ""]
    lines += ["A part whose held-back loss did not improve keeps its original weights.", "", markdown_table(headers, rows), "",
              "LoRA adapters are merged into the expert weights: the checkpoint has the student's format and loads like it."]
    Path(path).write_text("\n".join(lines) + "\n")
