"""The job skeleton every writing command runs through: validate everything, stage, write, swap.

A job is the work of one command (quantize, prune, merge, stats, compress-experts, a pipeline)
expressed as three things: the inputs it reads (for the output contract), a ``validate()`` that
refuses every bad request before any work, and a ``write(stage)`` that writes the whole output --
weights, config, report, figures -- into a staging folder. :func:`execute` owns the rest, once for
every command: the output contract (:mod:`moecompress.api.output`), the dry run, timings and peak
memory (printed and returned, never written into OUT: same inputs and seed give the same bytes).
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from moecompress.api.output import OutputFolder, check_not_an_input, check_parent_writable
from moecompress.errors import MoeCompressError
from moecompress.parallel import init_from_env
from moecompress.validation import check_choice, check_float, check_int

Progress = Callable[[int, int], None]


@dataclass
class JobResult:
    """What a command did. ``summary`` is JSON-able (the CLI's --json); ``run`` holds the timings
    and memory of this run, which are never written into OUT."""

    out: Path | None
    summary: dict = field(default_factory=dict)
    run: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # one-line messages for the console
    dry_run: bool = False

    def as_json(self) -> dict:
        return {**self.summary, **self.run}

    # The summary's common fields as attributes (benchmarks and tests read these).
    @property
    def details(self) -> dict:
        return self.summary

    @property
    def seconds(self) -> float:
        return self.run.get("seconds", 0.0)

    @property
    def output_bytes(self) -> int:
        return self.summary.get("output_bytes", 0)

    @property
    def input_bytes(self) -> int:
        return self.summary.get("input_bytes", 0)


class Job(Protocol):
    command: str

    def inputs(self) -> list[tuple[str, Path | str | None]]:
        """(role, path) of everything the job reads: OUT may be none of them, inside or above them."""

    def validate(self) -> None:
        """Refuse every bad request that can be known before the work starts (MoeCompressError)."""

    def write(self, stage: Path, progress: Progress | None) -> JobResult:
        """Do the work, writing every output file into ``stage``."""


def model_label(job) -> str:
    """How a job's reports name its model: the folder given, or a pipeline's label for a pass's input
    (a path inside the staging folder would make the bytes depend on its random name)."""
    return getattr(job, "model_label", None) or str(job.model)


class _Labelled:
    """A progress callback that reports under a label, and nests: a pipeline's "[2/2] quantize" and
    the quantize job's "profiling" show as "[2/2] quantize: profiling"."""

    def __init__(self, progress, label: str):
        self.parent, self.label = progress, label
        self.base = progress.base if isinstance(progress, _Labelled) else progress  # the real display

    def relabel(self, inner: str) -> None:
        self.parent.relabel(f"{self.label}: {inner}")

    def __call__(self, done: int, total: int) -> None:
        self.parent.relabel(self.label)
        self.base(done, total)


def labelled(progress: Progress | None, label: str) -> Progress | None:
    """``progress`` reporting under ``label``, where it can show labels (it has ``relabel``)."""
    if progress is None or getattr(progress, "relabel", None) is None:
        return progress
    return _Labelled(progress, label)


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# Jobs whose work is shared across torchrun processes (expert parallelism, parallel.py); the others
# would only repeat the same work on every rank.
DISTRIBUTED_COMMANDS = ("quantize", "run")  # run: pipelines whose models only quantize writes (pipeline.run)


def execute(job: Job, out: str | Path, overwrite: bool = False, dry_run: bool = False,
            progress: Progress | None = None, side_files: list[Path | str | None] = ()) -> JobResult:
    """Run ``job`` into ``out`` under the output contract.

    ``side_files``: other files the caller will write after the job (``--save-pipeline``); they are
    checked like OUT (not an input, parent writable) before any work.
    """
    ranks = init_from_env()  # under torchrun: join the job's process group (a plain launch: one process)
    if ranks.distributed and job.command not in DISTRIBUTED_COMMANDS:
        raise MoeCompressError(f"{job.command} runs in one process: launch it without torchrun "
                               f"(on several processes: {', '.join(DISTRIBUTED_COMMANDS)})")
    output = OutputFolder(out, overwrite, job.inputs())
    job.validate()
    if not ranks.is_writer and not dry_run:
        return _work_without_writing(job)
    output.check()
    for path in side_files:
        if path is not None:
            check_side_file(path, job.inputs())
    if dry_run:
        return JobResult(None, {"command": job.command, "out": str(out), "dry_run": True}, dry_run=True)
    start, cpu = time.perf_counter(), time.process_time()
    with output.staged() as stage:
        result = job.write(stage, progress)
    result.out = output.out
    result.summary["out"] = str(output.out)
    return _with_run_costs(result, start, cpu)


def _with_run_costs(result: JobResult, start: float, cpu: float) -> JobResult:
    """Wall and CPU seconds since (start, cpu) and the peak RSS, in the result's run record (never in OUT)."""
    result.run.update(
        seconds=round(time.perf_counter() - start, 2),
        cpu_seconds=round(time.process_time() - cpu, 2),
        peak_rss_bytes=peak_rss_bytes(),
    )
    return result


def _work_without_writing(job: Job) -> JobResult:
    """A rank other than the writer under torchrun: the same work (its share of each layer's experts,
    parallel.py), into a scratch folder it never promotes; OUT, its staging and leftovers are the
    writer's alone. The jobs' checkpoint writers write nothing on these ranks."""
    import tempfile

    start, cpu = time.perf_counter(), time.process_time()
    with tempfile.TemporaryDirectory(prefix="moecompress-rank-") as scratch:
        result = job.write(Path(scratch), None)
    return _with_run_costs(result, start, cpu)


def check_side_file(path: str | Path, inputs) -> None:
    """A single file written beside the job (e.g. --save-pipeline): not an input, parent writable."""
    path = Path(path)
    if path.is_dir():
        raise MoeCompressError(f"{path} is a folder; give a file name such as pipeline.yaml")
    check_not_an_input(path, inputs)
    check_parent_writable(path)


def write_file_atomically(path: str | Path, text: str) -> None:
    """Write a small text file through a temporary name in the same folder (never half written)."""
    import os
    import secrets

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.moecompress-stage-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Option checks shared by the jobs (the config dataclasses check their own fields)
# ---------------------------------------------------------------------------------------------


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def require_int(name: str, value, low: int | None = None, high: int | None = None) -> None:
    """``value`` (None allowed: the option was not given) is an integer in [low, high]."""
    if value is not None:
        check_int(_flag(name), value, low, high)


def require_float(name: str, value, low: float | None = None, high: float | None = None, low_open: bool = False) -> None:
    """``value`` (None allowed) is a finite number in [low, high] ((low, high] with ``low_open``)."""
    if value is not None:
        check_float(_flag(name), value, low, high, low_open=low_open)


def require_choice(name: str, value, choices) -> None:
    check_choice(_flag(name), value, choices)
