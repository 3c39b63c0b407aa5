"""Pretrain the from-scratch Llama on packed token shards: resumable, distributed, exported as a HF directory.

    align pretrain --config recipes/tiny/pretrain.yaml
    align pretrain --config recipes/tiny/pretrain.yaml --resume true          # continue from the last checkpoint
    torchrun --nproc_per_node 2 -m alignment.cli pretrain --config recipes/tiny/pretrain.yaml   # DDP (gloo on CPU)
    torchrun --nproc_per_node 4 -m alignment.cli pretrain --config recipes/gpu/fsdp/pretrain.yaml  # FSDP2

The loop, top to bottom: read the shards -> build the model from a preset -> AdamW (decay on matrices only,
fused on CUDA) -> per step: lr from warmup + cosine, grad_accum micro-batches, clip, step -> every N steps: val
loss and bits-per-byte, sampled continuations, a checkpoint -> at the end: loss-curve PNG, HF export.

Data order: the train split is cut into non-overlapping windows of seq_len + 1 tokens; each epoch visits them in
a seeded permutation. A step consumes the next `batch_size * grad_accum * world_size` windows, so the position
in the data is one number (samples seen), and 1 process with grad_accum=2 sees exactly the batches 2 processes
with grad_accum=1 see.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from alignment.config import config_dict, fingerprint_config, parse_config, save_config
from alignment.errors import UserError, exit_on_user_error
from alignment.io import StageRun, atomic_dir, atomic_write_text, check_output_dir, rng_state, set_rng_state
from pretrain.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from pretrain.model import PRESETS, Llama, LlamaShape, shape_from_preset


@dataclass
class PretrainConfig:
    """Pretraining: data, model size, optimization, evaluation, checkpoints, distribution."""

    data_dir: str = field(default="runs/tiny/packed", metadata={"help": "Packed shards from `align prepare` (meta.json inside)."})
    tokenizer: str = field(default="runs/tiny/tokenizer", metadata={"help": "Tokenizer directory; must be the one the shards were made with."})
    output_dir: str = field(default="runs/tiny/pretrain", metadata={"help": "Checkpoints, metrics.jsonl, loss_curve.png and config.yaml."})
    export_dir: str | None = field(default="runs/tiny/base", metadata={"help": "Where the final Hugging Face model is written (none = skip)."})
    preset: str = field(default="tiny", metadata={"help": f"Model size preset: {', '.join(PRESETS)}."})
    hidden_size: int | None = field(default=None, metadata={"help": "Override the preset's hidden size."})
    intermediate_size: int | None = field(default=None, metadata={"help": "Override the preset's MLP size."})
    num_hidden_layers: int | None = field(default=None, metadata={"help": "Override the preset's layer count."})
    num_attention_heads: int | None = field(default=None, metadata={"help": "Override the preset's query heads."})
    num_key_value_heads: int | None = field(default=None, metadata={"help": "Override the preset's key/value heads."})
    max_position_embeddings: int | None = field(default=None, metadata={"help": "Override the preset's context length."})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "Share input embeddings and output head."})
    seq_len: int = field(default=256, metadata={"help": "Training sequence length (at most max_position_embeddings)."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per micro-batch per process."})
    grad_accum: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    max_steps: int = field(default=1000, metadata={"help": "Optimizer steps (the cosine schedule ends here)."})
    max_minutes: float = field(default=0.0, metadata={"help": "Stop early after this much wall time (0 = no limit; a time budget "
                                                      "makes the run depend on the machine's speed, so no recipe sets it)."})
    lr: float = field(default=1e-3, metadata={"help": "Peak learning rate."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Final learning rate as a fraction of lr."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay on matrices (not norms)."})
    beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    beta2: float = field(default=0.95, metadata={"help": "AdamW beta2."})
    grad_clip: float = field(default=1.0, metadata={"help": "Clip the global gradient norm to this (0 = off)."})
    eval_interval: int = field(default=100, metadata={"help": "Steps between val loss / bits-per-byte evaluations and samples (0 = only at the "
                                                              "end)."})
    eval_batches: int = field(default=10, metadata={"help": "Val micro-batches per evaluation (spread over the val split)."})
    num_samples: int = field(default=2, metadata={"help": "Continuations sampled at each evaluation.", "range": (0, None, True, True, ())})
    sample_tokens: int = field(default=48, metadata={"help": "Tokens per sampled continuation."})
    sample_prompt: str = field(default="", metadata={"help": "Prompt of the samples (empty = start of a document)."})
    save_interval: int = field(default=200, metadata={"help": "Steps between checkpoints (0 = only at the end)."})
    keep_checkpoints: int = field(default=2, metadata={"help": "How many recent checkpoints to keep."})
    log_interval: int = field(default=10, metadata={"help": "Steps between metric log lines."})
    seed: int = field(default=0, metadata={"help": "Seed of the initialization and the data order."})
    device: str = field(default="auto", metadata={"help": "auto (CUDA when available), cuda or cpu."})
    dtype: str = field(default="auto", metadata={"help": "auto (bf16 autocast on CUDA, fp32 on CPU), float32 or bfloat16."})
    compile: bool = field(default=False, metadata={"help": "torch.compile the model."})
    fsdp: bool = field(default=False, metadata={"help": "Shard parameters, gradients and optimizer state with FSDP2 (under torchrun)."})
    peak_tflops: float = field(default=0.0, metadata={"help": "Peak TFLOP/s for the MFU estimate (0 = known GPU table, or a measured matmul on "
                                                              "CPU)."})
    report_to: list[str] = field(default_factory=list, metadata={"help": "Also log to: tensorboard, wandb."})
    resume: bool = field(default=False, metadata={"help": "Continue a finished run from the newest checkpoint in output_dir/ckpt "
                                                  "(e.g. with a larger max_steps). A killed run resumes by itself."})
    resume_from: str | None = field(default=None, metadata={"help": "Continue from this checkpoint file."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished output_dir and export_dir (ones the suite wrote)."})


# config keys a resumed run must share with its checkpoint: they decide the model, the data order and the batches
RESUME_KEYS = ("seq_len", "seed", "global_batch", "tokenizer_hash", "train_tokens")


# ---------------------------------------------------------------------------------------------- data

class PackedTokens:
    """One split of a packed corpus as windows of seq_len + 1 tokens that never cross a shard boundary."""

    def __init__(self, data_dir: Path, meta: dict, split: str, seq_len: int):
        self.seq_len = seq_len
        self.shards = [np.memmap(data_dir / s["file"], dtype=meta["dtype"], mode="r") for s in meta["splits"][split]["shards"]]
        counts = [max(0, (len(s) - 1) // seq_len) for s in self.shards]
        self.offsets = np.cumsum([0] + counts)
        self.n = int(self.offsets[-1])

    def window(self, i: int) -> np.ndarray:
        """Tokens of window i: seq_len + 1 of them (inputs and the next-token targets overlap by seq_len)."""
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        start = (i - int(self.offsets[k])) * self.seq_len
        return self.shards[k][start:start + self.seq_len + 1]

    def batch(self, indices, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and next-token targets, each (B, T)."""
        w = torch.from_numpy(np.stack([self.window(int(i)).astype(np.int64) for i in indices]))  # (B, T+1)
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        if device.type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)


class SampleOrder:
    """Global sample number g -> window index: epoch g // n in a permutation seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._epoch, self._perm = n, seed, -1, None

    def __getitem__(self, g: int) -> int:
        epoch, pos = divmod(g, self.n)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=gen)
        return int(self._perm[pos])


def read_meta(data_dir: str) -> dict:
    """meta.json of a packed corpus (UserError when missing)."""
    p = Path(data_dir, "meta.json")
    if not p.is_file():
        raise UserError(f"data_dir: {data_dir}: no meta.json; expected a directory written by `align prepare`")
    try:
        meta = json.loads(p.read_bytes().decode("utf-8"))
        for split in ("train", "val"):
            for shard in meta["splits"][split]["shards"]:
                if not Path(data_dir, shard["file"]).is_file():
                    raise UserError(f"{p}: shard {shard['file']} is missing; expected the directory `align prepare` wrote, whole")
        np.dtype(meta["dtype"])
        meta["tokenizer_hash"], meta["splits"]["train"]["tokens"]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError):
        raise UserError(f"{p}: truncated or not the meta.json `align prepare` writes (splits, shards, dtype, tokenizer_hash); "
                        "re-run `align prepare`") from None
    return meta


def token_bytes(tokenizer) -> torch.Tensor:
    """UTF-8 bytes each token id stands for (0 for special tokens): byte-level BPE spells one byte per char."""
    special = set(tokenizer.all_special_ids)
    out = torch.zeros(len(tokenizer), dtype=torch.float64)
    for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
        out[i] = 0 if i in special or t is None else len(t)
    return out


# ---------------------------------------------------------------------------------------------- optimization

def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    min_lr = cfg.lr * cfg.min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig, device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, projections) and none on norm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = device.type == "cuda"  # one kernel per step on GPU; the foreach path is as fast on CPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused)


def peak_flops(cfg: PretrainConfig, device, dtype) -> float:
    """Peak FLOP/s for MFU: the config, a table of GPUs (dense bf16), or a measured fp32 matmul on CPU."""
    if cfg.peak_tflops > 0:
        return cfg.peak_tflops * 1e12
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, tf in (("H200", 989), ("H100", 989), ("A100", 312), ("L40S", 362), ("A10", 125), ("4090", 165), ("3090", 71),
                        ("V100", 125), ("T4", 65)):
            if key in name:
                return tf * 1e12
        return 100e12
    a = torch.randn(512, 512)
    a @ a
    t0, reps = time.perf_counter(), 20
    for _ in range(reps):
        a @ a
    return 2 * 512 ** 3 * reps / (time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- distribution

def setup_distributed(cfg: PretrainConfig):
    """(rank, world, device) from torchrun's environment; one process when there is none."""
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserError("device: cuda was asked for but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if want_cuda else "cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if want_cuda else "gloo")
    return rank, world, device


def all_reduce(t: torch.Tensor, world: int) -> torch.Tensor:
    """Sum over processes (identity for one process)."""
    if world > 1:
        torch.distributed.all_reduce(t)
    return t


def wrap_model(raw: Llama, cfg: PretrainConfig, world: int, device):
    """(train_model, eval_model): compiled, then DDP- or FSDP2-wrapped when running under torchrun."""
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        if world == 1 and not torch.distributed.is_initialized():
            raise UserError("fsdp: true needs torchrun (e.g. torchrun --nproc_per_node N -m alignment.cli pretrain ...)")
        for block in raw.model.layers:  # one all-gather per block keeps peak memory at a block's full weights
            fully_shard(block)
        fully_shard(raw)
    model = torch.compile(raw) if cfg.compile else raw
    if world > 1 and not cfg.fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None), model
    return model, model


def full_state(raw: Llama, optimizer, cfg: PretrainConfig) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (gathered to every rank under FSDP)."""
    if not cfg.fsdp:
        return raw.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(raw, options=opts), get_optimizer_state_dict(raw, optimizer, options=opts)


def load_full_state(raw: Llama, optimizer, ckpt: dict, cfg: PretrainConfig) -> None:
    """The reverse of full_state."""
    if not cfg.fsdp:
        raw.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(raw, ckpt["model"], options=opts)
    set_optimizer_state_dict(raw, optimizer, ckpt["optimizer"], options=opts)


# ---------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def evaluate(model, val: PackedTokens, tbytes: torch.Tensor, cfg: PretrainConfig, rank: int, world: int, device, autocast) -> dict:
    """Val loss (nats/token) and bits-per-byte over the same evenly spread windows at every evaluation."""
    model.eval()
    n = min(val.n, cfg.eval_batches * cfg.batch_size * world)
    idx = np.linspace(0, val.n - 1, n).round().astype(np.int64)
    tbytes = tbytes.to(device)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # nats, tokens, nats on text tokens, their bytes
    for i in range(rank * cfg.batch_size, n, world * cfg.batch_size):
        x, y = val.batch(idx[i:i + cfg.batch_size], device)  # (B, T)
        with autocast:
            logits = model(x)  # (B, T, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").double()  # (B*T,)
        nbytes = tbytes[y.flatten()]  # (B*T,)
        # bits-per-byte counts text only: special tokens (end of text) stand for no bytes, so their loss is left out
        sums += torch.stack([nll.sum(), torch.tensor(float(nll.numel()), dtype=torch.float64, device=device),
                             nll[nbytes > 0].sum(), nbytes.sum()])
    all_reduce(sums, world)
    model.train()
    nats, tokens, text_nats, nbytes = sums.tolist()
    return {"val_loss": nats / tokens, "val_bpb": text_nats / math.log(2) / nbytes if nbytes else float("nan")}


@torch.no_grad()
def sample_text(model: Llama, tokenizer, cfg: PretrainConfig, step: int, device, autocast) -> list[str]:
    """A few continuations of the sample prompt, from a fixed seed so that training RNG is untouched."""
    from alignment.tokens import encode_text

    ids = [tokenizer.eos_token_id] + (encode_text(tokenizer, cfg.sample_prompt) if cfg.sample_prompt else [])
    out = []
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(cfg.seed + step)
        for _ in range(cfg.num_samples):
            x = torch.tensor([ids], device=device)
            with autocast:
                y = model.generate(x, cfg.sample_tokens, temperature=0.8, top_k=50, eos_token_id=tokenizer.eos_token_id)
            out.append(tokenizer.decode(y[0, 1:].tolist(), skip_special_tokens=True))
    model.train()
    return out


# ---------------------------------------------------------------------------------------------- logging

def plot_curves(metrics_path: Path, png: Path) -> None:
    """Train and val loss (and val bits-per-byte) against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()] if metrics_path.exists() else []
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"], r["val_bpb"]) for r in rows if "val_loss" in r]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    if train:
        a.plot(*zip(*train), label="train loss", lw=1)
    if val:
        a.plot([v[0] for v in val], [v[1] for v in val], "o-", label="val loss")
        b.plot([v[0] for v in val], [v[2] for v in val], "o-", color="C2")
    a.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    a.legend()
    b.set(xlabel="step", ylabel="bits per byte", title="val bits-per-byte")
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png)


# ---------------------------------------------------------------------------------------------- the stage

def build_shape(cfg: PretrainConfig, vocab_size: int) -> LlamaShape:
    """The model shape: preset plus overrides, vocabulary from the tokenizer."""
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
    overrides = {k: getattr(cfg, k) for k in names if getattr(cfg, k) is not None}
    try:
        return shape_from_preset(cfg.preset, vocab_size, tie_word_embeddings=cfg.tie_word_embeddings, **overrides)
    except ValueError as e:
        raise UserError(f"preset: {e}") from None


def check_config(cfg: PretrainConfig) -> None:
    """Reject values that cannot train, before anything is written."""
    for name in ("seq_len", "batch_size", "grad_accum", "max_steps"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name}: {getattr(cfg, name)}; expected a positive integer")
    if cfg.warmup_steps < 0 or cfg.lr <= 0:
        raise UserError("lr/warmup_steps: expected lr > 0 and warmup_steps >= 0")
    if cfg.dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"dtype: {cfg.dtype!r}; expected auto, float32 or bfloat16")
    if cfg.device not in ("auto", "cpu", "cuda"):
        raise UserError(f"device: {cfg.device!r}; expected auto, cpu or cuda")


def find_resume(cfg: PretrainConfig, work: Path, resumed: bool) -> Path | None:
    """The checkpoint to continue from: --resume_from; a killed run's newest in the work directory; with --resume,
    the finished run's newest; else None (a fresh run)."""
    if cfg.resume_from:
        return Path(cfg.resume_from)
    in_work = list_checkpoints(work / "ckpt")
    if resumed and in_work:
        return in_work[-1]
    if cfg.resume:
        done = list_checkpoints(Path(cfg.output_dir) / "ckpt")
        if not done:
            raise UserError(f"resume: no checkpoint in {Path(cfg.output_dir) / 'ckpt'}; expected one from an earlier run")
        return done[-1]
    return None


def main(cfg: PretrainConfig) -> dict:
    """Train, evaluate, checkpoint, plot and export; returns the final metrics."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from alignment.tokens import tokenizer_hash
    from alignment.tracking import Trackers, check_report_to

    t_start = time.time()
    for name in ("export_dir", "resume_from"):  # `--export_dir none` on the command line means no value
        if getattr(cfg, name) is not None and getattr(cfg, name).strip().lower() in ("", "none", "null"):
            setattr(cfg, name, None)
    check_config(cfg)
    check_report_to(cfg.report_to)
    rank, world, device = setup_distributed(cfg)
    master = rank == 0

    # data and tokenizer must belong together
    meta = read_meta(cfg.data_dir)
    if not Path(cfg.tokenizer, "tokenizer.json").is_file():
        raise UserError(f"tokenizer: {cfg.tokenizer}: no tokenizer.json; expected a directory from `align tokenizer`")
    tok_hash = tokenizer_hash(cfg.tokenizer)
    if meta["tokenizer_hash"] != tok_hash:
        raise UserError(f"data_dir: {cfg.data_dir} was packed with another tokenizer (hash {meta['tokenizer_hash']}, "
                        f"{meta.get('tokenizer')}) than {cfg.tokenizer} (hash {tok_hash}); expected the same tokenizer, re-run `align prepare`")
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    shape = build_shape(cfg, len(tokenizer))
    if cfg.seq_len > shape.max_position_embeddings:
        raise UserError(f"seq_len: {cfg.seq_len} is longer than the model's max_position_embeddings {shape.max_position_embeddings}; "
                        "expected seq_len <= max_position_embeddings")
    train = PackedTokens(Path(cfg.data_dir), meta, "train", cfg.seq_len)
    val = PackedTokens(Path(cfg.data_dir), meta, "val", cfg.seq_len)
    for name, split in (("train", train), ("val", val)):
        if split.n == 0:
            raise UserError(f"data_dir: the {name} split has fewer than seq_len + 1 = {cfg.seq_len + 1} tokens; "
                            "expected more text or a shorter seq_len")
    global_batch = cfg.batch_size * cfg.grad_accum * world
    identity = {"seq_len": cfg.seq_len, "seed": cfg.seed, "global_batch": global_batch, "tokenizer_hash": tok_hash,
                "train_tokens": meta["splits"]["train"]["tokens"]}

    # resume or start over; nothing is written before these checks pass. The run works in a partial sibling of
    # output_dir (a killed run with the same config resumes there) and replaces output_dir only when it has finished.
    if cfg.resume_from:
        load_checkpoint(cfg.resume_from)
    if cfg.export_dir:
        check_output_dir(cfg.export_dir, cfg.overwrite or cfg.resume)
    run = StageRun(cfg.output_dir, cfg.overwrite or cfg.resume, fingerprint_config(cfg), [cfg.data_dir, cfg.tokenizer], "pretrain")
    resume_path = find_resume(cfg, run.work, run.matching_partial())
    ckpt = load_checkpoint(resume_path) if resume_path else None
    if ckpt is not None:
        saved = {**ckpt.get("identity", {}), "shape": ckpt["shape"]}
        now = {**identity, "shape": asdict(shape)}
        diff = [k for k in (*RESUME_KEYS, "shape") if saved.get(k) != now[k]]
        if diff:
            k = diff[0]
            raise UserError(f"resume: {resume_path} was made with {k}={saved.get(k)} but the config gives {k}={now[k]}; "
                            "expected the same model, data, seq_len, seed and global batch (batch_size * grad_accum * processes)")
    history: list[dict] = []
    if ckpt is not None:  # the metric lines up to the checkpoint's step (a killed run may have logged more)
        old = Path(resume_path).parent.parent / "metrics.jsonl"
        if old.is_file():
            history = [json.loads(ln) for ln in old.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= ckpt["step"]]
    out = run.start()  # every rank decides alike; rank 0 sets up the work directory while the others wait
    if master:
        save_config(out, cfg, overrides={"output_dir": cfg.output_dir})
        if ckpt is not None and resume_path.parent != out / "ckpt":  # continuing a finished run: its checkpoint comes along
            save_checkpoint(ckpt, out / "ckpt", ckpt["step"], cfg.keep_checkpoints)

    # model and optimizer
    torch.manual_seed(cfg.seed)
    raw = Llama(shape).to(device)
    use_bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()
    model, eval_model = wrap_model(raw, cfg, world, device)
    optimizer = make_optimizer(raw, cfg, device)
    step = 0
    if ckpt is not None:
        load_full_state(raw, optimizer, ckpt, cfg)
        step = ckpt["step"]
        rngs = ckpt["rng"]
        set_rng_state(rngs[rank % len(rngs)])
    order = SampleOrder(train.n, cfg.seed)
    tbytes = token_bytes(tokenizer)
    flops_per_step = raw.flops_per_token(cfg.seq_len) * global_batch * cfg.seq_len
    peak = peak_flops(cfg, device, torch.bfloat16 if use_bf16 else torch.float32)
    logs = Trackers(out, cfg.report_to, "align-pretrain", config_dict(cfg), history=history, active=master)
    say = tqdm.write if master else (lambda *a, **k: None)
    if master:
        say(f"pretrain: {raw.num_parameters() / 1e6:.2f}M parameters ({raw.num_parameters(True) / 1e6:.2f}M non-embedding), "
            f"{train.n} train windows of {cfg.seq_len} tokens, global batch {global_batch} ({world} process{'es' if world > 1 else ''}, "
            f"{device.type}, {'bf16 autocast' if use_bf16 else 'fp32'}){f', resuming at step {step} from {resume_path}' if ckpt else ''}")

    def checkpoint(metrics: dict) -> Path | None:
        model_sd, opt_sd = full_state(raw, optimizer, cfg)
        rngs = [None] * world
        if world > 1:
            torch.distributed.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        path = None
        if master:
            state = {"model": model_sd, "shape": asdict(shape), "optimizer": opt_sd,
                     "scheduler": {"name": "warmup_cosine", "step": step, "lr": cfg.lr, "warmup_steps": cfg.warmup_steps,
                                   "max_steps": cfg.max_steps, "min_lr_ratio": cfg.min_lr_ratio},
                     "rng": rngs, "data": {"samples_seen": step * global_batch, "windows": train.n},
                     "step": step, "identity": identity, "config": config_dict(cfg), "metrics": metrics}
            path = save_checkpoint(state, out / "ckpt", step, cfg.keep_checkpoints)
        if world > 1:
            torch.distributed.barrier()
        return path

    last_good = resume_path
    last: dict = {}
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not master, desc="pretrain", dynamic_ncols=True)
    t_log, tokens_since = time.time(), 0
    stop_early = False
    while step < cfg.max_steps and not stop_early:
        lr = lr_at(step, cfg)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loss_sum = torch.zeros((), device=device)
        g0 = step * global_batch
        for m in range(cfg.grad_accum):
            first = g0 + (m * world + rank) * cfg.batch_size  # this process's slice of the global batch
            x, y = train.batch([order[g] for g in range(first, first + cfg.batch_size)], device)  # (B, T)
            sync = m == cfg.grad_accum - 1 or world == 1 or cfg.fsdp
            ctx = contextlib.nullcontext() if sync else model.no_sync()  # all-reduce gradients once per step
            with ctx:
                with autocast:
                    _, loss = model(x, y)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach() / cfg.grad_accum
        grad_norm = torch.nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        loss_val = all_reduce(loss_sum, world).item() / world
        if not math.isfinite(loss_val) or not math.isfinite(float(grad_norm)):
            bar.close()
            what = f"loss is {loss_val}" if not math.isfinite(loss_val) else f"gradient norm is {float(grad_norm)}"
            raise UserError(f"step {step + 1}: {what}; stopped without applying this update. Last good checkpoint: "
                            f"{last_good or 'none'}; expected finite values (resume with --resume true and a lower --lr)")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_since += global_batch * cfg.seq_len
        bar.update(1)
        last = {"loss": loss_val}

        if step % cfg.log_interval == 0 or step == cfg.max_steps:
            if device.type == "cuda":
                torch.cuda.synchronize()
            dt = time.time() - t_log
            tps = tokens_since / dt
            mfu = flops_per_step * (tokens_since / (global_batch * cfg.seq_len)) / dt / peak
            logs.log({"loss": loss_val, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tps, "mfu": mfu}, step)
            bar.set_postfix(loss=f"{loss_val:.3f}", lr=f"{lr:.1e}", tok_s=f"{tps:,.0f}", mfu=f"{100 * mfu:.1f}%")
            t_log, tokens_since = time.time(), 0
        if cfg.max_minutes > 0:
            flag = torch.tensor([float(time.time() - t_start > cfg.max_minutes * 60)], device=device)
            stop_early = bool(all_reduce(flag, world).item())
        at_end = step == cfg.max_steps or stop_early
        if (cfg.eval_interval and step % cfg.eval_interval == 0) or at_end:
            ev = evaluate(eval_model, val, tbytes, cfg, rank, world, device, autocast)
            last.update(ev)
            logs.log(ev, step)
            say(f"step {step}: train loss {loss_val:.4f}, val loss {ev['val_loss']:.4f}, val bpb {ev['val_bpb']:.4f}")
            if cfg.num_samples:
                for s in sample_text(raw if not cfg.fsdp else eval_model, tokenizer, cfg, step, device, autocast):
                    say(f"  sample: {s[:200]!r}")
        if (cfg.save_interval and step % cfg.save_interval == 0) or at_end:
            last_good = checkpoint(last) or last_good
    bar.close()
    logs.close()

    # the base model, as every later stage loads it
    model_sd, _ = full_state(raw, optimizer, cfg) if cfg.fsdp else (raw.state_dict(), None)
    if master:
        plot_curves(out / "metrics.jsonl", out / "loss_curve.png")
        if cfg.export_dir:
            from pretrain.export import save_hf

            export = raw if not cfg.fsdp else Llama(shape)
            if cfg.fsdp:
                export.load_state_dict(model_sd)
            with atomic_dir(cfg.export_dir, overwrite=True, stage="pretrain") as tmp:
                save_hf(export.cpu() if cfg.fsdp else export, tokenizer, tmp)
                save_config(tmp, cfg)
        summary = {"steps": step, "tokens": step * global_batch * cfg.seq_len, "seconds": round(time.time() - t_start, 1), **last}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        run.commit()
        print(f"pretrain: {step} steps, {summary['tokens']:,} tokens in {summary['seconds']}s; final train loss "
              f"{last.get('loss', float('nan')):.4f}, val loss {last.get('val_loss', float('nan')):.4f}, val bits/byte "
              f"{last.get('val_bpb', float('nan')):.4f}; curve {Path(cfg.output_dir) / 'loss_curve.png'}"
              + (f"; model {cfg.export_dir}" if cfg.export_dir else ""), file=sys.stdout)
    else:
        summary = {"steps": step, **last}
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return summary


@exit_on_user_error
def cli(argv=None) -> None:
    (cfg,) = parse_config([PretrainConfig], argv)
    main(cfg)


if __name__ == "__main__":
    cli()
