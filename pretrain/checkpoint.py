"""Pretraining checkpoints: one file per step, written atomically, the last K kept, loaded without running code.

A checkpoint is a `torch.save`d dict of tensors and plain values only (loaded with weights_only=True):
    model       state_dict (Hugging Face parameter names)
    shape       LlamaShape fields, so the model can be rebuilt without the config
    optimizer   AdamW state_dict
    scheduler   {"name", "step", ...}: the learning rate is a pure function of the step
    rng         RNG states, one entry per process rank (alignment.io.rng_state)
    data        {"samples_seen", ...}: the position in the seeded sample order
    step, identity, config, metrics
`align export --checkpoint FILE` and `load_model_checkpoint` read only model and shape.
"""

from __future__ import annotations

import re
from pathlib import Path

from alignment.errors import UserError
from alignment.io import atomic_torch_save, clean_stale_temps, safe_torch_load
from pretrain.model import Llama, LlamaShape

_STEP_RE = re.compile(r"^step_(\d+)\.pt$")


def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    """The file name of the checkpoint taken after `step` optimizer steps."""
    return Path(ckpt_dir) / f"step_{step:07d}.pt"


def list_checkpoints(ckpt_dir: str | Path) -> list[Path]:
    """Checkpoint files in ckpt_dir, oldest step first (temporary files ignored)."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(state: dict, ckpt_dir: str | Path, step: int, keep: int) -> Path:
    """Write `state` as step_NNNNNNN.pt through a temporary file and rename, then keep only the newest `keep`."""
    path = checkpoint_path(ckpt_dir, step)
    atomic_torch_save(state, path)  # a reader (or a crash) sees the old file set or the complete new file
    if keep > 0:
        for old in list_checkpoints(ckpt_dir)[:-keep]:
            old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict:
    """Read a checkpoint dict; a missing, truncated, foreign or code-carrying file is a UserError naming it."""
    p = Path(path)
    clean_stale_temps(p)
    ckpt = safe_torch_load(p, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt or "shape" not in ckpt:
        raise UserError(f"{p}: not a pretraining checkpoint; expected keys 'model' and 'shape'")
    return ckpt


def load_model_checkpoint(path: str | Path) -> Llama:
    """A Llama from a checkpoint file holding {'model': state_dict, 'shape': LlamaShape fields, ...}."""
    ckpt = load_checkpoint(path)
    try:
        model = Llama(LlamaShape(**ckpt["shape"]))
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: the saved shape is not a model shape ({e})") from None
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{path}: weights do not match the saved shape ({str(e).splitlines()[0]})") from None
    return model
