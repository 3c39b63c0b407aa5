"""Models for post-training: load (optionally 8-bit / 4-bit), add LoRA, and save adapter + merged outputs.

Every post-training stage reads a plain Hugging Face directory and writes two things:
- `<output_dir>/adapter/`: the LoRA adapter (only when LoRA is used);
- `<output_dir>/merged/`: the adapter merged into a fresh, UNQUANTIZED copy of the input model, saved as a plain
  Hugging Face directory with the tokenizer. This is what the next stage and the evals load.

Merging into a fresh copy (instead of dequantizing the trained 8/4-bit model) keeps the merged weights exact: the
base weights are the original ones, plus the low-rank update.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import torch

from .errors import UserError
from .io import atomic_dir

# Llama attention and MLP projections: LoRA on all of them is what QLoRA found to match full fine-tuning best.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = ("causal", "reward")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(model_args) -> torch.dtype | str:
    """The torch dtype named by `model_args.dtype` ("auto" passes through; None means float32)."""
    name = getattr(model_args, "dtype", None) or "float32"
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise UserError(f"config: dtype {name!r}; expected one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def quantization_config(model_args):
    """A BitsAndBytesConfig for `load_in_8bit` or `load_in_4bit` (nf4 with double quantization), else None."""
    from transformers import BitsAndBytesConfig

    if model_args.load_in_8bit and model_args.load_in_4bit:
        raise UserError("config: load_in_8bit and load_in_4bit are both set; expected at most one")
    if model_args.load_in_4bit:
        dtype = torch_dtype(model_args)
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type or "nf4",
            # double quantization saves ~0.4 bit/param at no measurable quality cost (QLoRA paper), so always on
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32 if dtype == "auto" else dtype,
            bnb_4bit_quant_storage=model_args.bnb_4bit_quant_storage,
        )
    if model_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def check_model_dir(path, where: str = "model") -> Path:
    """A local model directory must exist and hold config.json (hub names are passed through untouched)."""
    p = Path(str(path))
    looks_local = p.is_absolute() or str(path).startswith((".", "runs/", "runs\\")) or p.exists() or str(path).count("/") != 1
    if looks_local and not (p / "config.json").is_file():
        if not p.exists():
            raise UserError(f"{where}: {path}: model directory not found; expected the output of the previous stage (e.g. runs/tiny/sft/merged)")
        raise UserError(f"{where}: {path}: no config.json; expected a Hugging Face model directory")
    return p


def load_tokenizer(path, chat_template_path: str | None = None):
    """Load the tokenizer saved with a model; optionally replace its chat template with a .jinja file.

    A hub model's own template usually lacks `{% generation %}` markers (no assistant mask): give ours
    (recipes/templates/chatml.jinja) for ChatML-vocabulary models such as Qwen2.5. A missing pad token becomes eos."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    if chat_template_path:
        p = Path(chat_template_path)
        if not p.is_file() or p.suffix not in (".jinja", ".j2"):
            raise UserError(f"chat_template_path: {p}: expected an existing .jinja file")
        tok.chat_template = p.read_text()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(path, model_args, kind: str = "causal", tokenizer=None, gradient_checkpointing: bool = False):
    """Load a causal LM or a 1-output sequence-classification reward model from `path`.

    Sets `pad_token_id` (the reward model reads its score at the last non-pad token), applies 8-bit/4-bit
    quantization from `model_args`, and calls `prepare_model_for_kbit_training` when quantized."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    check_model_dir(path)
    qconfig = quantization_config(model_args)
    if qconfig is not None and not model_args.use_peft:
        raise UserError("config: load_in_8bit/load_in_4bit need use_peft: true (quantized weights cannot be trained directly)")
    tokenizer = tokenizer or load_tokenizer(path)
    kwargs = dict(dtype=torch_dtype(model_args), revision=getattr(model_args, "model_revision", "main"))
    if getattr(model_args, "attn_implementation", None):
        kwargs["attn_implementation"] = model_args.attn_implementation
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": _device()}  # bitsandbytes quantizes while placing weights on the device
    if kind == "reward":
        model = AutoModelForSequenceClassification.from_pretrained(str(path), num_labels=1, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if qconfig is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return model


def _device() -> str:
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    return "cpu"


def lora_config(model_args, task_type: str = "CAUSAL_LM"):
    """A peft LoraConfig from `model_args` (lora_r/alpha/dropout), on attention and MLP projections by default."""
    from peft import LoraConfig

    targets = model_args.lora_target_modules or LORA_TARGETS
    return LoraConfig(
        task_type=task_type,
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=model_args.lora_modules_to_save,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        bias="none",
    )


def add_lora(model, model_args, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with a LoRA adapter (SEQ_CLS also trains the reward head `score`)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model_args, task_type))


def is_peft(model) -> bool:
    """True when `model` is a peft model (has a LoRA adapter)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def save_stage_outputs(model, tokenizer, input_model_path, output_dir, kind: str = "causal", overwrite: bool = True,
                       extra_files: dict | None = None) -> dict:
    """Write `<output_dir>/adapter/` (when LoRA) and `<output_dir>/merged/` (plain, unquantized HF directory).

    `extra_files` maps a file name to a JSON-able object written into merged/ (e.g. reward_stats.json).
    Returns {"adapter": path or None, "merged": path}."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    adapter_dir = None
    if is_peft(model):
        adapter_dir = out / "adapter"
        with atomic_dir(adapter_dir, overwrite=overwrite) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
    with atomic_dir(out / "merged", overwrite=overwrite) as tmp:
        if adapter_dir is not None:
            from peft import PeftModel

            # a fresh full-precision copy of the input: the merge is exact whatever the training quantization was
            cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
            kw = {"num_labels": 1} if kind == "reward" else {}
            base = cls.from_pretrained(str(input_model_path), dtype=model.get_base_model().dtype if not _quantized(model) else torch.float32, **kw)
            base.config.pad_token_id = tokenizer.pad_token_id
            merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
        else:
            merged = model
        merged.config.pad_token_id = tokenizer.pad_token_id
        merged.save_pretrained(str(tmp), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        src_gen = Path(str(input_model_path)) / "generation_config.json"
        if src_gen.is_file():  # keep the stop ids (end of text, end of turn) of the input model
            shutil.copy(src_gen, tmp / "generation_config.json")
        _stop_at_end_of_turn(tmp, tokenizer)
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    return {"adapter": adapter_dir, "merged": out / "merged"}


def _stop_at_end_of_turn(model_dir: Path, tokenizer) -> None:
    """Make generation stop at <|im_end|> too: a hub base model's generation config knows only its end of text."""
    from transformers import GenerationConfig

    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if not isinstance(im_end, int) or im_end == tokenizer.unk_token_id or not (model_dir / "generation_config.json").is_file():
        return
    gen = GenerationConfig.from_pretrained(str(model_dir))
    eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id] if gen.eos_token_id is not None else []
    if im_end not in eos:
        gen.eos_token_id = eos + [im_end]
        gen.save_pretrained(str(model_dir))


def _quantized(model) -> bool:
    base = model.get_base_model() if is_peft(model) else model
    return bool(getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False))


def _local_dir(path) -> Path:
    """A local directory for `path`: itself, or the cached hub snapshot of a hub name (named by its commit)."""
    p = Path(str(path))
    if p.is_dir():
        return p
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), local_files_only=True, allow_patterns=["*.json"]))
    except Exception:
        raise UserError(f"{path}: not a local model directory and not in the hub cache; expected a model directory") from None


def model_hash(path) -> str:
    """A short content hash of a model directory's config and weight files (keys caches of model outputs).

    For a hub model the snapshot's commit id (its directory name) stands for the content."""
    p = _local_dir(path)
    if not Path(str(path)).is_dir():
        return hashlib.sha256(f"{path}@{p.name}".encode()).hexdigest()[:16]
    h = hashlib.sha256()
    files = sorted(list(p.glob("config.json")) + list(p.glob("*.safetensors")) + list(p.glob("*.bin")))
    if not files:
        raise UserError(f"{p}: no config.json or weights to hash; expected a Hugging Face model directory")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def resume_or_start(output_dir, overwrite: bool, resume: bool = True) -> str | None:
    """The checkpoint to resume from (the last `checkpoint-*` in output_dir), or None to start fresh.

    A finished stage (merged/ exists) is an error unless overwrite is set; overwrite also discards old checkpoints."""
    from transformers.trainer_utils import get_last_checkpoint

    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: output path exists and is not a directory")
    if not out.exists():
        return None
    if overwrite:
        for d in list(out.glob("checkpoint-*")) + [out / "merged", out / "adapter"]:
            shutil.rmtree(d, ignore_errors=True)
        return None
    if (out / "merged").exists():
        raise UserError(f"{out}: stage already finished (merged/ exists); pass --overwrite true to train again")
    last = get_last_checkpoint(str(out)) if resume else None
    if last:
        print(f"resuming from {last}", file=sys.stderr)
    return last


def adapters_fp32(model) -> int:
    """On CPU, cast trainable (LoRA) weights back to fp32; returns how many tensors were cast.

    TRL casts QLoRA adapter weights to bf16 (the QLoRA paper's GPU recipe); without CUDA bf16 matmuls run ~25x
    slower than fp32 on AVX2 CPUs, so we undo it there."""
    if torch.cuda.is_available():
        return 0
    n = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype in (torch.bfloat16, torch.float16):
            p.data = p.data.float()
            n += 1
    return n


def trainable_snapshot(model) -> dict[str, torch.Tensor]:
    """Copies of the trainable parameters (to report how many changed after training)."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def changed_parameters(model, snapshot: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(number of trainable tensors that changed since `snapshot`, number of trainable tensors)."""
    now = dict(model.named_parameters())
    changed = sum(not torch.equal(now[n].detach().float().cpu(), v) for n, v in snapshot.items() if n in now)
    return changed, len(snapshot)


@torch.no_grad()
def reward_scores(model, sequences: list[list[int]], pad_token_id: int, padding_side: str = "right",
                  batch_size: int = 16) -> torch.Tensor:
    """Scalar rewards of token sequences, read at each sequence's last real token.

    Pads on `padding_side` and passes explicit position ids, so the score of a sequence does not depend on the
    padding side or on its batch neighbours. A sequence longer than the model's context keeps its end (the response,
    where the score is read). Returns a float32 tensor (N,)."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    ctx = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if ctx:
        sequences = [s[-ctx:] for s in sequences]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(sequences), batch_size):
        batch = sequences[i : i + batch_size]
        T = max(len(s) for s in batch)
        ids = torch.full((len(batch), T), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for j, s in enumerate(batch):
            sl = slice(T - len(s), T) if padding_side == "left" else slice(0, len(s))
            ids[j, sl] = torch.tensor(s, dtype=torch.long)
            mask[j, sl] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T): 0.. over real tokens whatever the padding side
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device)).logits
        out.append(logits.float().reshape(len(batch), -1)[:, 0].cpu())
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def tokenizer_hash(path) -> str:
    """A short content hash of a model directory's tokenizer files."""
    p = _local_dir(path)
    files = sorted(f for f in p.glob("*") if f.name in ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt",
                                                         "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"))
    if not files:
        raise UserError(f"{p}: no tokenizer files to hash; expected tokenizer.json (or tokenizer.model)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]
