"""Models: the one loader (causal LM or reward model; local directory or hub name; 8-bit / 4-bit; LoRA adapter),
LoRA for training, reward scoring, and the stage outputs (adapter + merged).

Every post-training stage reads a plain Hugging Face directory and writes two things:
- `<output_dir>/adapter/`: the LoRA adapter (only when LoRA is used);
- `<output_dir>/merged/`: the adapter merged into a fresh, UNQUANTIZED copy of the input model, saved as a plain
  Hugging Face directory with the tokenizer. This is what the next stage and the evals load.

Merging into a fresh copy (instead of dequantizing the trained 8/4-bit model) keeps the merged weights exact: the
base weights are the original ones, plus the low-rank update.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

from .errors import UserError

# Llama attention and MLP projections: LoRA on all of them is what QLoRA found to match full fine-tuning best.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = ("causal", "reward")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_device() -> torch.device:
    """CUDA (the current device) when available, else the CPU."""
    return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")


def local_model_dir(path, where: str = "model") -> Path:
    """A local directory holding `path`'s config.json: the directory itself, or a hub name's cached snapshot
    (downloaded first when the hub is reachable). One clear line when it is neither."""
    p = Path(str(path))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise UserError(f"{where}: {path}: no config.json; expected a Hugging Face model directory")
        try:
            cfg = json.loads((p / "config.json").read_bytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError) as e:
            raise UserError(f"{where}: {p / 'config.json'}: not valid JSON ({str(e).splitlines()[0][:100]}); expected a model config") from None
        if not isinstance(cfg, dict) or "model_type" not in cfg:
            raise UserError(f"{where}: {p / 'config.json'}: no model_type; expected a Hugging Face model config")
        return p
    if p.exists():
        raise UserError(f"{where}: {path}: not a directory; expected a Hugging Face model directory")
    if str(path).startswith((".", "/", "~", "runs/")) or str(path).count("/") != 1:
        raise UserError(f"{where}: {path}: model directory not found; expected a Hugging Face model directory "
                        "(e.g. the previous stage's output, runs/tiny/sft/merged) or a hub name (org/name)")
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    try:
        return Path(snapshot_download(str(path), allow_patterns=["*.json", "*.jinja", "*.txt", "*.model"], local_files_only=offline))
    except Exception as e:
        why = "HF_HUB_OFFLINE=1 is set and it is not in the local cache" if offline else f"not reachable on the hub ({type(e).__name__})"
        raise UserError(f"{where}: {path}: neither a local model directory nor a hub model that can be loaded: {why}") from None


def load_config(path, where: str = "model"):
    """The transformers config of a model directory or hub name (one clear line when it cannot be read)."""
    from transformers import AutoConfig

    local_model_dir(path, where)
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{where}: {path}: unreadable model config ({' '.join(str(e).split())[:160]}); expected a known architecture") from None


def check_model_dir(path, where: str = "model") -> str:
    """Validate a model reference (local directory with config.json, or a loadable hub name); returns it as a string."""
    local_model_dir(path, where)
    return str(path)


def load_tokenizer(path, chat_template_path: str | None = None):
    """Load the tokenizer saved with a model; optionally replace its chat template with a .jinja file.

    A hub model's own template usually lacks `{% generation %}` markers (no assistant mask): give ours
    (recipes/templates/chatml.jinja) for ChatML-vocabulary models such as Qwen2.5. A missing pad token becomes eos."""
    from transformers import AutoTokenizer

    d = local_model_dir(path)
    if not any((d / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise UserError(f"{path}: no tokenizer files (tokenizer.json); expected the tokenizer saved beside the model")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: no loadable tokenizer ({' '.join(str(e).split())[:160]}); expected tokenizer files "
                        "saved beside the model") from None
    if chat_template_path:
        p = Path(chat_template_path)
        if not p.is_file() or p.suffix not in (".jinja", ".j2"):
            raise UserError(f"chat_template_path: {p}: expected an existing .jinja file")
        tok.chat_template = p.read_text(encoding="utf-8")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str | None) -> torch.dtype | str:
    """The torch dtype named by a config's `dtype` ("auto" passes through; None means float32). Without CUDA, "auto"
    means float32 too: bf16/fp16 matmuls are ~25x slower than fp32 on AVX2 CPUs."""
    name = name or "float32"
    if name == "auto":
        return "auto" if torch.cuda.is_available() else torch.float32
    if name not in _DTYPES:
        raise UserError(f"dtype: {name!r}; expected one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def quantization_config(model_args):
    """The BitsAndBytesConfig of `load_in_8bit` / `load_in_4bit` (TRL's get_quantization_config), else None."""
    from .compat import get_quantization_config

    if getattr(model_args, "load_in_8bit", False) and getattr(model_args, "load_in_4bit", False):
        raise UserError("config: load_in_8bit and load_in_4bit are both set; expected at most one")
    if not (getattr(model_args, "load_in_8bit", False) or getattr(model_args, "load_in_4bit", False)):
        return None
    args = copy.copy(model_args)
    dtype = torch_dtype(getattr(model_args, "dtype", None))
    args.dtype = torch.float32 if dtype == "auto" else dtype  # the 4-bit compute dtype follows the weights' dtype
    for name, default in (("bnb_4bit_quant_type", "nf4"), ("use_bnb_nested_quant", False), ("bnb_4bit_quant_storage", None)):
        if not hasattr(args, name):
            setattr(args, name, default)
    return get_quantization_config(args)


class _Options:
    """The loading options a ModelConfig carries, for callers that have none (evals, generation, scoring)."""

    def __init__(self, **kw):
        self.dtype, self.load_in_8bit, self.load_in_4bit = "auto", False, False
        self.bnb_4bit_quant_type, self.use_bnb_nested_quant, self.bnb_4bit_quant_storage = "nf4", True, None
        self.attn_implementation, self.model_revision, self.use_peft = None, "main", False
        self.__dict__.update(kw)


def load_model(path, model_args=None, kind: str = "causal", tokenizer=None, *, adapter: str | None = None,
               training: bool = False, gradient_checkpointing: bool = False, device=None, **options):
    """The one model loader: a causal LM or a 1-output sequence-classification reward model from a local directory
    or a hub name, optionally 8-bit / 4-bit (bitsandbytes) and with a LoRA `adapter` applied.

    `model_args` is a TRL ModelConfig (dtype, load_in_8bit/4bit, bnb options, attn_implementation, revision);
    keyword `options` override its fields (e.g. load_in_4bit=True). For inference (`training=False`) the model is
    frozen in eval mode, and an adapter on unquantized weights is merged (same numbers, faster forward). For training
    a quantized model is prepared with peft's `prepare_model_for_kbit_training`. `pad_token_id` is set, so a reward
    model reads its score at the last real token."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    args = copy.copy(model_args) if model_args is not None else _Options()
    for k, v in options.items():
        setattr(args, k, v)
    local_model_dir(path)
    if adapter and not Path(adapter, "adapter_config.json").is_file():
        raise UserError(f"adapter: {adapter}: no adapter_config.json; expected a PEFT LoRA adapter directory")
    qconfig = quantization_config(args)
    if qconfig is not None and training and not getattr(args, "use_peft", False):
        raise UserError("config: load_in_8bit/load_in_4bit need use_peft: true (quantized weights cannot be trained directly)")
    tokenizer = tokenizer or load_tokenizer(path)
    device = torch.device(device) if device is not None else default_device()
    kwargs = dict(dtype=torch_dtype(getattr(args, "dtype", None)), revision=getattr(args, "model_revision", None) or "main")
    if getattr(args, "attn_implementation", None):
        kwargs["attn_implementation"] = args.attn_implementation
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        kwargs["device_map"] = {"": str(device)}  # bitsandbytes quantizes while placing weights on the device
    cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    if kind == "reward":
        kwargs["num_labels"] = 1
    try:
        model = cls.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: could not load the {kind} model ({' '.join(str(e).split())[:200]}); expected a "
                        "Hugging Face model directory with weights") from None
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if adapter:
        from peft import PeftModel

        check_adapter_base(adapter, model, path)
        model = PeftModel.from_pretrained(model, adapter, is_trainable=training)
        if qconfig is None and not training:
            model = model.merge_and_unload()
    if qconfig is None:
        model.to(device)
    if training:
        if qconfig is not None:
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        return model
    return model.eval().requires_grad_(False)


def check_adapter_base(adapter: str, model, path) -> None:
    """An adapter trained on another model does not fit this one: compare the LoRA target shapes it was saved with."""
    from safetensors import safe_open

    files = sorted(Path(adapter).glob("adapter_model.safetensors"))
    if not files:
        return
    params = dict(model.named_parameters())
    with safe_open(str(files[0]), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key:
                continue
            base = key.split(".lora_A.")[0].replace("base_model.model.", "", 1) + ".weight"
            shape = f.get_slice(key).get_shape()
            target = params.get(base)
            if target is None or target.shape[-1] != shape[-1]:
                raise UserError(f"adapter: {adapter} was trained for another base model than {path} "
                                f"({base}: {'missing' if target is None else tuple(target.shape)}); expected its own base model")


def lora_config(model_args, task_type: str = "CAUSAL_LM"):
    """A peft LoraConfig from `model_args` (TRL's get_peft_config), on every attention and MLP projection by default."""
    from .compat import get_peft_config

    args = copy.copy(model_args)
    args.lora_target_modules = model_args.lora_target_modules or LORA_TARGETS
    args.lora_task_type = task_type
    args.use_peft = True
    return get_peft_config(args)


def add_lora(model, model_args, task_type: str = "CAUSAL_LM"):
    """Wrap `model` with a LoRA adapter (SEQ_CLS also trains the reward head `score`)."""
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model_args, task_type))


def is_peft(model) -> bool:
    """True when `model` is a peft model (has a LoRA adapter)."""
    from peft import PeftModel

    return isinstance(model, PeftModel)


def is_quantized(model) -> bool:
    """True when the (base) model holds bitsandbytes 8-bit or 4-bit weights."""
    base = model.get_base_model() if is_peft(model) else model
    return bool(getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False))


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


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


def save_stage_outputs(model, tokenizer, input_model_path, output_dir, kind: str = "causal",
                       extra_files: dict | None = None) -> dict:
    """Write `<output_dir>/adapter/` (when LoRA) and `<output_dir>/merged/` (plain, unquantized HF directory).

    output_dir is the stage's work directory (alignment.io.StageRun), swapped into place only when the stage has
    finished, so these directories are written in place. `extra_files` maps a file name to a JSON-able object written
    into merged/ (e.g. reward_stats.json). Returns {"adapter": path or None, "merged": path}."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    out = Path(output_dir)
    adapter_dir, merged_dir = out / "adapter", out / "merged"
    for d in (adapter_dir, merged_dir):  # left by an interrupted earlier attempt of this same run
        shutil.rmtree(d, ignore_errors=True)
    if is_peft(model):
        model.save_pretrained(str(adapter_dir))
        tokenizer.save_pretrained(str(adapter_dir))
        from peft import PeftModel

        # a fresh full-precision copy of the input: the merge is exact whatever the training quantization was
        cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
        kw = {"num_labels": 1} if kind == "reward" else {}
        dtype = torch.float32 if is_quantized(model) else model.get_base_model().dtype
        base = cls.from_pretrained(str(input_model_path), dtype=dtype, **kw)
        base.config.pad_token_id = tokenizer.pad_token_id
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    else:
        merged = model
    merged.config.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(str(merged_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(merged_dir))
    src_gen = local_model_dir(input_model_path) / "generation_config.json"
    if src_gen.is_file():  # keep the stop ids (end of text, end of turn) of the input model
        shutil.copy(src_gen, merged_dir / "generation_config.json")
    _stop_at_end_of_turn(merged_dir, tokenizer)
    for name, obj in (extra_files or {}).items():
        (merged_dir / name).write_text(json.dumps(obj, indent=2) + "\n")
    return {"adapter": adapter_dir if is_peft(model) else None, "merged": merged_dir}


def gathered_model(trainer, input_model_path, kind: str = "causal"):
    """The model a Hugging Face Trainer trained, whole, on the main process (None on the others). Every process
    calls it: under FSDP or DeepSpeed the gathering is collective.

    One process or DDP: the trainer's own model (each process holds all of it). FSDP or DeepSpeed: the weights may be
    split over the processes, so the Trainer gathers them into a directory (`save_model`) that the main process loads
    back as a plain model (with LoRA: a fresh copy of the input model with the saved adapter) and then removes."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from . import distributed

    if not (getattr(trainer, "is_fsdp_enabled", False) or getattr(trainer, "is_deepspeed_enabled", False)):
        return trainer.model if distributed.is_main() else None
    gathered = Path(trainer.args.output_dir) / "gathered"
    trainer.save_model(str(gathered))
    model = None
    if distributed.is_main():
        cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
        kw = {"num_labels": 1} if kind == "reward" else {}
        if (gathered / "adapter_config.json").is_file():
            from peft import PeftModel

            base = cls.from_pretrained(str(input_model_path), dtype=torch.float32, **kw)
            base.config.pad_token_id = trainer.processing_class.pad_token_id
            model = PeftModel.from_pretrained(base, str(gathered))
        else:
            model = cls.from_pretrained(str(gathered), **kw)
        shutil.rmtree(gathered)
    distributed.barrier()
    return model


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


def model_hash(path) -> str:
    """A short content hash of a model directory's config and weight files (keys caches of model outputs and
    identifies models in eval reports). For a hub model the snapshot's commit id (its directory name) stands for it."""
    p = local_model_dir(path)
    if not Path(str(path)).is_dir():
        return hashlib.sha256(f"{path}@{p.name}".encode()).hexdigest()[:16]
    h = hashlib.sha256()
    files = sorted(list(p.glob("config.json")) + list(p.glob("*.safetensors")) + list(p.glob("*.bin")))
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def context_length(model_or_config) -> int:
    """The model's context length (max_position_embeddings, n_positions or n_ctx; 2048 when none is set)."""
    config = getattr(model_or_config, "config", model_or_config)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        v = getattr(config, attr, None)
        if v:
            return int(v)
    return 2048


def same_tokenizer(a, b) -> bool:
    """Two tokenizers give the same ids for every text: same vocabulary and special tokens."""
    return a.get_vocab() == b.get_vocab() and a.all_special_tokens == b.all_special_tokens


@torch.no_grad()
def reward_scores(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 16) -> torch.Tensor:
    """Scalar rewards of token sequences, read at each sequence's last real token. Returns float32 (N,).

    Identical sequences are scored once, so two identical responses tie exactly; longest first, so batches carry
    little padding. Explicit position ids make a score independent of its batch neighbours. A sequence longer than
    the model's context keeps its end (the response, where the score is read)."""
    ctx = context_length(model)
    unique = sorted(dict.fromkeys(tuple(s[-ctx:]) for s in sequences), key=len, reverse=True)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scores: dict[tuple, float] = {}
    for i in range(0, len(unique), batch_size):
        batch = unique[i: i + batch_size]
        T = len(batch[0])
        ids = torch.full((len(batch), T), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(batch), T), dtype=torch.long)
        for j, s in enumerate(batch):
            ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[j, : len(s)] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device)).logits
        scores.update(zip(batch, logits.float().reshape(len(batch), -1)[:, 0].cpu().tolist()))
    model.train(was_training)
    return torch.tensor([scores[tuple(s[-ctx:])] for s in sequences], dtype=torch.float32)
