"""Files and directories the suite writes: atomic, marked as ours, and never deleting what a user made.

- `atomic_write_bytes/text/json(path, ...)`: a file appears whole or not at all (temp sibling, fsync, rename).
- `atomic_dir(path, overwrite)`: a directory is built in a temp sibling and swapped into place at the end; a failed
  or interrupted run leaves the previous result byte-identical.
- Every directory the suite writes carries a marker file (`MARKER`). `overwrite` replaces only a marked directory,
  never one the suite did not make, and never a parent of other outputs.
- Temp siblings of an interrupted write carry the writer's pid; `clean_stale_temps` removes those of dead processes.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from .errors import UserError

MARKER = ".align-suite.json"  # "this directory was made by the suite": overwrite may replace it


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_prefix(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}-"


_TEMP_RE = None


def clean_stale_temps(path: str | os.PathLike, recursive: bool = False) -> int:
    """Remove the temp files and directories (`.NAME.tmp-PID-*`, `.NAME.old-PID-*`) that writers which died left
    beside `path` (or, for a directory with `recursive`, anywhere inside it too); returns how many were removed."""
    import re

    global _TEMP_RE
    _TEMP_RE = _TEMP_RE or re.compile(r"^\..+\.(tmp|old)-(\d+)-")
    p = Path(path)
    places = [p.parent] + ([d for d in [p, *p.rglob("*")] if d.is_dir()] if recursive and p.is_dir() else [])
    n = 0
    for place in places:
        if not place.is_dir():
            continue
        for t in list(place.iterdir()):
            m = _TEMP_RE.match(t.name)
            if m and int(m.group(2)) != os.getpid() and not _pid_alive(int(m.group(2))):
                shutil.rmtree(t, ignore_errors=True) if t.is_dir() else t.unlink(missing_ok=True)
                n += 1
    return n


def check_writable_file(path: str | os.PathLike, suffix: str | None = None) -> Path:
    """Refuse an output file path that cannot be written (a directory, an unwritable parent) before any work."""
    p = Path(path)
    if suffix and p.suffix != suffix:
        raise UserError(f"{p}: the output path must end in {suffix}")
    if p.is_dir():
        raise UserError(f"{p}: is a directory; expected an output file path")
    parent = p.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise UserError(f"{p}: cannot write there ({parent} is not a writable directory)")
    return p


def check_checkpoint_files(checkpoint_dir: str | os.PathLike) -> None:
    """Before a trainer resumes from `checkpoint_dir`, make sure every .pt / .pth / .bin file in it holds only tensors
    and plain values (a crafted pickle is refused with one line instead of running)."""
    for f in sorted(Path(checkpoint_dir).glob("*")):
        # training_args.bin is a pickle transformers writes but never reads back on resume: it is not loaded here either
        if f.suffix in (".pt", ".pth", ".bin") and f.name != "training_args.bin":
            safe_torch_load(f, "checkpoint file", allow_numpy=True)


def is_suite_dir(path: str | os.PathLike) -> bool:
    """True when `path` is a directory the suite wrote (it holds the marker file)."""
    return Path(path, MARKER).is_file()


def write_marker(directory: str | os.PathLike, stage: str = "") -> None:
    """Mark `directory` as made by the suite (what stage, when)."""
    Path(directory, MARKER).write_text(json.dumps({"stage": stage, "written": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an output path that exists and holds something, unless overwrite is set and the suite made it.

    A directory the suite did not make (no marker) is never replaced, with or without overwrite: it may hold a
    user's files. Empty directories are fine either way."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{p}: output path exists and is not a directory")
    if p.exists() and any(p.iterdir()):
        if not overwrite:
            raise UserError(f"{p}: output directory exists; pass --overwrite true to replace it")
        if not is_suite_dir(p):
            raise UserError(f"{p}: output directory exists and was not written by this suite (no {MARKER}); "
                            "expected a new path or one of the suite's own outputs, so nothing of yours is deleted")
    return p


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False, stage: str = ""):
    """Yield a temporary sibling directory; on success it replaces `path` (marked as the suite's), on error it goes.

    The previous `path` stays byte-identical until the very end, when it is swapped out in two renames."""
    final = check_output_dir(path, overwrite)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(final)
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(final.name, "tmp"), dir=final.parent))
    except OSError as e:
        raise UserError(f"{final}: cannot write the output ({e.strerror}); expected a writable location") from None
    try:
        yield tmp
        write_marker(tmp, stage)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, final)


def replace_dir(src: Path, final: Path) -> None:
    """Move directory `src` to `final`, replacing an existing `final` (two renames; the old copy removed last)."""
    if final.exists():
        old = final.with_name(f"{_temp_prefix(final.name, 'old')}{os.urandom(3).hex()}")
        os.replace(final, old)
        os.replace(src, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, final)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a file through a temporary sibling and rename, so readers never see half a file."""
    p = Path(path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(p)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(p.name, "tmp"), dir=p.parent)
    except OSError as e:
        raise UserError(f"{p}: cannot write the file ({e.strerror}); expected a writable location") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Text version of atomic_write_bytes (UTF-8)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    """JSON version of atomic_write_bytes."""
    atomic_write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save through a temporary sibling (tensors and plain containers only: loaded with weights_only=True)."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def safe_torch_load(path: str | os.PathLike, what: str = "file", allow_numpy: bool = False):
    """torch.load with weights_only=True: tensors and plain containers load (numpy arrays too with `allow_numpy`, as
    transformers' trainer checkpoints hold them), a pickle that would run code is refused."""
    import pickle

    import torch

    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: {what} not found")
    try:
        if allow_numpy:
            from .compat import numpy_safe_globals

            with numpy_safe_globals():
                return torch.load(p, map_location="cpu", weights_only=True)
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        blocked = [ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln]
        if blocked:  # a pickle that names a function or class to call: never run it
            raise UserError(f"{p}: refused to load: the {what} would run code or build objects other than tensors "
                            f"({blocked[0][:120]}); expected a file written by this suite") from None
        raise UserError(f"{p}: corrupted or truncated {what} (not a torch file of tensors); expected a file written by "
                        "this suite") from None
    except Exception as e:  # truncated zip, random bytes
        raise UserError(f"{p}: corrupted or truncated {what} ({type(e).__name__}); expected a file written by this suite") from None


def _identity(path: str) -> list:
    """A cheap identity of an input file or directory: (relative name, size, mtime) of its files, not their bytes."""
    p = Path(path)
    if p.is_file():
        st = p.stat()
        return [[p.name, st.st_size, st.st_mtime_ns]]
    if p.is_dir():
        out = []
        for f in sorted(p.rglob("*")):
            if f.is_file() and not f.name.startswith("."):
                st = f.stat()
                out.append([str(f.relative_to(p)), st.st_size, st.st_mtime_ns])
        return out
    return [[str(path), None, None]]  # a hub name: identified by its name


class StageRun:
    """The output directory of one stage run: nothing a user made is lost, and a killed run resumes.

    The run works in a partial sibling `.NAME.partial/`; the finished output `NAME/` is replaced only when the run
    has finished (`commit`), so a failed or interrupted run leaves the previous result byte-identical. The partial
    directory records a fingerprint of the resolved config and of the inputs (file sizes and times): a later run
    with the same fingerprint resumes from its checkpoints, a run with another fingerprint discards it and starts
    over. `overwrite` is needed to replace a finished output, and only one the suite made."""

    def __init__(self, output_dir: str | os.PathLike, overwrite: bool, config: dict, inputs: list[str] = (), stage: str = ""):
        self.final = Path(output_dir)
        self.stage = stage
        self.fingerprint = {"config": config, "inputs": {str(i): _identity(str(i)) for i in inputs}}
        self.overwrite = overwrite
        self.work = self.final.with_name(f".{self.final.name}.partial")
        self.resumed = False
        for i in inputs:  # never write over (or later replace) a directory that holds this run's own inputs
            ip = Path(str(i)).resolve()
            fp = self.final.resolve()
            if ip == fp or fp in ip.parents:
                raise UserError(f"output_dir: {self.final} contains the input {i}; expected an output path outside the inputs")

    def matching_partial(self) -> bool:
        """True when a partial work directory of a run with this fingerprint exists (start() will resume it)."""
        try:
            old = json.loads((self.work / MARKER).read_text()).get("fingerprint")
        except (OSError, ValueError):
            return False
        return old == json.loads(json.dumps(self.fingerprint, default=str))

    def start(self) -> Path:
        """Check the output path, then return the work directory (resumed when its fingerprint matches).

        Under a launcher every process checks and decides alike (the same resume answer everywhere); only the main
        process then creates or cleans the work directory, while the others wait."""
        from . import distributed

        if self.final.exists() and any(self.final.iterdir()):
            if not self.final.is_dir():
                raise UserError(f"{self.final}: output path exists and is not a directory")
            if not self.overwrite:
                raise UserError(f"{self.final}: output directory exists (a finished run); pass --overwrite true to replace it")
            if not is_suite_dir(self.final):
                raise UserError(f"{self.final}: output directory exists and was not written by this suite (no {MARKER}); "
                                "expected a new path or one of the suite's own outputs, so nothing of yours is deleted")
        elif self.final.exists() and not self.final.is_dir():
            raise UserError(f"{self.final}: output path exists and is not a directory")
        state = self.work / MARKER
        resume = self.work.is_dir() and self.matching_partial()
        if self.work.is_dir() and not resume and not state.is_file():
            raise UserError(f"{self.work}: exists and was not written by this suite; expected to use it for the run in progress")
        distributed.barrier()  # every process has looked before the main one changes anything
        if distributed.is_main():
            self._prepare_work(resume)
        distributed.barrier()
        self.resumed = resume
        return self.work

    def trainer_checkpoint(self) -> str | None:
        """After start(): the newest Trainer checkpoint of a resumed run (its files checked), or None."""
        if not self.resumed:
            return None
        from transformers.trainer_utils import get_last_checkpoint

        from . import distributed

        checkpoint = get_last_checkpoint(str(self.work))
        if checkpoint:
            check_checkpoint_files(checkpoint)
            if distributed.is_main():
                print(f"{self.stage}: resuming the interrupted run from {checkpoint}", file=sys.stderr)
        return checkpoint

    def _prepare_work(self, resume: bool) -> None:
        clean_stale_temps(self.final)
        if resume:
            clean_stale_temps(self.work, recursive=True)  # half-written files of the killed run
            return
        if self.work.is_dir():
            shutil.rmtree(self.work)  # ours, from a run with another config or inputs: its checkpoints do not apply
        try:
            self.work.mkdir(parents=True)
            (self.work / MARKER).write_text(json.dumps({"stage": self.stage, "fingerprint": self.fingerprint,
                                                        "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, default=str) + "\n")
        except OSError as e:
            raise UserError(f"output_dir: {self.final}: cannot write beside it ({e.strerror}); expected a writable location") from None

    def discard(self) -> None:
        """Remove the work directory (a run that finished but was rejected: nothing in it is worth resuming)."""
        shutil.rmtree(self.work, ignore_errors=True)

    def commit(self) -> Path:
        """Swap the finished work directory into place as the output (the previous output is removed last)."""
        write_marker(self.work, self.stage)
        replace_dir(self.work, self.final)
        return self.final


def rng_state() -> dict:
    """This process's RNG states (python, numpy, torch CPU and CUDA) as tensors and plain values, so a checkpoint
    holding them loads with weights_only=True."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    """Restore what rng_state returned."""
    import random

    import numpy as np
    import torch

    try:
        py = state["python"]
        random.setstate((py[0], tuple(py[1]), py[2]))
        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        torch.set_rng_state(state["torch"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise UserError("checkpoint: the RNG state is not the one this suite writes; expected a checkpoint of this version") from None
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
