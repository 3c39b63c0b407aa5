"""Reading model weights out of a pretraining checkpoint (the training loop writes them; see pretrain/train.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from alignment.errors import UserError
from pretrain.model import Llama, LlamaShape


def load_model_checkpoint(path: str | Path) -> Llama:
    """A Llama from a checkpoint file holding {'model': state_dict, 'shape': LlamaShape fields, ...}."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{p}: checkpoint not found")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # truncated or not a torch file
        raise UserError(f"{p}: corrupted or truncated checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "shape" not in ckpt:
        raise UserError(f"{p}: not a pretraining checkpoint; expected keys 'model' and 'shape'")
    model = Llama(LlamaShape(**ckpt["shape"]))
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    return model
