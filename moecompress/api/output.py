"""The output contract, written once, for every command that writes a folder.

1. OUT is never an input, inside an input, or a folder that holds an input (the model, a statistics
   folder, a calibration file, ...): refused before any work, so no ``--overwrite`` can delete what
   the user gave us.
2. Everything (weights, config, report, figures, pipeline YAML) is written into a staging folder
   beside OUT (same filesystem, so renames are atomic), named ``.OUT.moecompress-stage-<pid>-<tag>``.
3. The swap is atomic. On Linux the staging folder and the old OUT are exchanged in one
   ``renameat2(RENAME_EXCHANGE)`` call: at every instant the path OUT holds either the old folder
   whole or the new one whole. Elsewhere (or on a filesystem without the call) the old OUT is
   renamed aside to ``.OUT.moecompress-old-<pid>-<tag>``, the staging folder renamed in, the old one
   deleted; a kill between the two renames leaves the old OUT whole under its aside name, and the
   next run puts it back before anything else.
4. Staging and aside folders of killed runs (their process is gone) are cleaned by the next run on
   the same OUT: staging folders are deleted, an aside folder is restored when OUT is missing and
   deleted otherwise. Each is reported.
5. A dry run validates everything, including that OUT's parent can be created and written, and
   writes nothing.

Determinism (same inputs and seed give the same bytes) is the writers' part: nothing they write
holds a time, a date or a path that depends on the staging folder's name.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

from moecompress.errors import MoeCompressError

log = logging.getLogger(__name__)

STAGE_TAG = "moecompress-stage"
ASIDE_TAG = "moecompress-old"

# Staging folders this process holds, removed by abort_all_staging() (the SIGTERM handler's last act).
_ACTIVE: set[Path] = set()


class OutputError(MoeCompressError):
    """OUT cannot be used: an input, not writable, exists without --overwrite, ..."""


def _resolved(path: str | Path) -> Path:
    return Path(os.path.abspath(os.path.expanduser(str(path)))).resolve()


def check_not_an_input(out: Path, inputs: Iterable[tuple[str, str | Path]]) -> None:
    """Refuse an OUT that is an input, lies inside one, or holds one."""
    target = _resolved(out)
    for role, given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if target == source:
            raise OutputError(f"output {out} is the {role} itself; write to another folder (the input is never overwritten)")
        if source in target.parents:
            raise OutputError(f"output {out} lies inside the {role} {given}; write to a folder outside it")
        if target in source.parents:
            raise OutputError(
                f"output {out} contains the {role} {given}; --overwrite would delete it; write to a folder that does not hold any input"
            )


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def can_write_in(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_parent_writable(out: Path) -> None:
    """OUT's parent exists (or can be created) and can be written."""
    parent = _resolved(out).parent
    existing = _nearest_existing(parent)
    if not existing.is_dir():
        raise OutputError(f"cannot create output {out}: {existing} is a file, not a folder; choose another output path")
    if not can_write_in(existing):
        raise OutputError(f"cannot write output {out}: no write permission in {existing}; choose a writable location")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def _owner_pid(name: str, tag: str) -> int | None:
    rest = name.split(f".{tag}-", 1)[-1]
    pid = rest.split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def leftovers(out: Path) -> list[Path]:
    """Staging and aside folders beside OUT whose process is gone."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return []
    found = []
    for tag in (STAGE_TAG, ASIDE_TAG):
        for path in sorted(parent.glob(f".{out.name}.{tag}-*")):
            pid = _owner_pid(path.name, tag)
            if pid is not None and not _pid_alive(pid):
                found.append(path)
    return found


def clean_leftovers(out: Path, echo=log.warning) -> list[str]:
    """Remove (or restore) what killed runs left beside OUT; returns one line per folder handled."""
    out = Path(out)
    done = []
    for path in leftovers(out):
        if f".{ASIDE_TAG}-" in path.name and not out.exists():
            os.rename(path, out)  # a kill landed between the two renames of a non-atomic swap
            done.append(f"restored {out} from {path.name}, left by a run that was killed while replacing it")
        else:
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"removed {path}, left by a run that was killed")
    for line in done:
        echo(line)
    return done


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


class OutputFolder:
    """OUT, checked against the inputs, written through a staging folder and swapped in atomically."""

    def __init__(self, out: str | Path, overwrite: bool = False, inputs: Iterable[tuple[str, str | Path | None]] = ()):
        self.out = Path(out)
        self.overwrite = overwrite
        self.inputs = [(role, path) for role, path in inputs if path is not None]
        self.stage_path: Path | None = None

    # ------------------------------------------------------------------ checks (before any work)

    def check(self) -> None:
        """Every refusal that does not need the work done: call before the first layer is read."""
        if self.out.name in ("", ".", ".."):
            raise OutputError(f"output {str(self.out)!r} must name a new folder, e.g. out/model")
        check_not_an_input(self.out, self.inputs)
        if self.out.exists() or self.out.is_symlink():
            if not self.out.is_dir() or self.out.is_symlink():
                raise OutputError(f"output {self.out} exists and is not a folder; choose another path")
            if not self.overwrite:
                raise OutputError(f"output {self.out} already exists; pass --overwrite to replace it, or choose another path")
        check_parent_writable(self.out)

    # ------------------------------------------------------------------ staging and the swap

    def open_stage(self) -> Path:
        self.check()
        parent = _resolved(self.out).parent
        parent.mkdir(parents=True, exist_ok=True)
        clean_leftovers(self.out)
        self.stage_path = parent / f".{self.out.name}.{STAGE_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
        self.stage_path.mkdir()
        _ACTIVE.add(self.stage_path)
        return self.stage_path

    def commit(self) -> Path:
        """Swap the finished staging folder in; the old OUT (if any) is deleted after."""
        stage = self.stage_path
        if stage is None:
            raise RuntimeError("commit() without open_stage()")
        out = _resolved(self.out.parent) / self.out.name
        if out.exists() and not self.overwrite:
            raise OutputError(f"output {self.out} appeared while running; not overwriting it (pass --overwrite)")
        if not out.exists():
            os.rename(stage, out)
        elif _exchange(stage, out):
            shutil.rmtree(stage)  # holds the old OUT now
        else:
            aside = out.parent / f".{out.name}.{ASIDE_TAG}-{os.getpid()}-{secrets.token_hex(4)}"
            os.rename(out, aside)
            os.rename(stage, out)
            shutil.rmtree(aside)
        _ACTIVE.discard(stage)
        self.stage_path = None
        return self.out

    def abort(self) -> None:
        if self.stage_path is not None:
            shutil.rmtree(self.stage_path, ignore_errors=True)
            _ACTIVE.discard(self.stage_path)
            self.stage_path = None

    @contextmanager
    def staged(self) -> Iterator[Path]:
        """``with output.staged() as stage: <write into stage>``; committed on success, removed on failure."""
        stage = self.open_stage()
        try:
            yield stage
        except BaseException:
            self.abort()
            raise
        self.commit()


@contextmanager
def scratch_folder(inside: Path, name: str) -> Iterator[Path]:
    """A working subfolder of a staging folder, removed when done (it goes with the stage on a kill)."""
    path = Path(inside) / name
    path.mkdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def abort_all_staging() -> None:
    """Remove every staging folder this process holds (the termination handler's last act)."""
    for path in list(_ACTIVE):
        shutil.rmtree(path, ignore_errors=True)
        _ACTIVE.discard(path)
