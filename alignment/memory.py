"""Peak device memory of a stage, estimated from the model's config.json alone (no weights are read).

    from alignment.memory import estimate, model_shape, render
    est = estimate("sft", {"use_peft": True, "load_in_4bit": True}, {"policy": model_shape("Qwen/Qwen2.5-1.5B")})
    print(render(est), est.peak / GiB)

`align memory --config recipes/<recipe>/<stage>.yaml` (recipes/memory.py) prints this breakdown and a verdict per card;
`preflight(stage, settings, free_bytes)` raises a one-line UserError at the start of a stage that will not fit.

How the estimate is built. A stage keeps some memory for its whole run (the *resident* terms: weights, LoRA adapters,
optimizer states, frozen extra models, gradients between micro-batches) and passes through *phases* that each add
their own transient memory (a training micro-batch, a generation, a scoring pass, the optimizer step). The peak is
resident + the largest phase + the CUDA context and allocator overhead. Each term is one function below whose comment
gives the formula and where it comes from: the tensors PyTorch, transformers, peft, bitsandbytes and TRL 1.16 keep.
benchmarks/memory_trace.py runs the real training step on fake tensors and compares the traced peak with these terms.

Units: sizes are binary (1 GB = 2**30 bytes), the way nvidia-smi and PyTorch report card memory.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import UserError

GiB = 1 << 30
MiB = 1 << 20

# TRL 1.16's fused LM head (trl/kernels/chunked_logprob.py): logits are computed in tiles of this many tokens by
# this many vocabulary entries, never as a whole (tokens, vocab) tensor.
TOKEN_TILE = 4096
VOCAB_TILE = 32768
# alignment.modeling.LORA_TARGETS (not imported: that module pulls in torch); tests check they stay equal.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# CUDA context (driver, cuBLAS/cuDNN handles and kernels loaded lazily) and the caching allocator's fragmentation.
# Typical values for PyTorch 2.x on Ampere/Hopper cards; not calibrated on a GPU here (none was available).
CUDA_CONTEXT = 512 * MiB
ALLOCATOR_SLACK = 0.07
# peft.prepare_model_for_kbit_training (called by alignment.modeling.load_model for 8/4-bit models) casts every
# non-quantized bf16/fp16 parameter -- embeddings, lm_head, norms, biases -- to fp32.
KBIT_UPCASTS_TO_FP32 = True

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo2", "granite")

# The keys each stage reads, with the defaults of its config classes (TRL 1.16's SFTConfig/DPOConfig/RewardConfig/
# RLOOConfig/GRPOConfig and ModelConfig, alignment.ppo.PPOHyper + recipes/ppo.py, recipes/pairs.py, evals/harness.py,
# pretrain/train.py). tests/test_memory.py checks them against the real dataclasses.
_MODEL = {
    "dtype": "float32",
    "use_peft": False,
    "lora_r": 16,
    "lora_dropout": 0.05,
    "lora_target_modules": None,
    "load_in_8bit": False,
    "load_in_4bit": False,
    "bnb_4bit_quant_type": "nf4",
}
_TRL = {
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1,
    "gradient_checkpointing": True,
    "bf16": None,
    "fp16": False,
    "optim": "adamw_torch_fused",
    "use_liger_kernel": False,
}
STAGE_DEFAULTS: dict[str, dict] = {
    "sft": {**_MODEL, **_TRL, "max_length": 1024, "per_device_eval_batch_size": 8},
    "reward": {**_MODEL, **_TRL, "max_length": 1024, "score_batch_size": 16},
    "dpo": {**_MODEL, **_TRL, "max_length": 1024, "per_device_eval_batch_size": 8, "precompute_ref_batch_size": None},
    "rloo": {
        **_MODEL,
        **_TRL,
        "num_generations": 2,
        "max_completion_length": 512,
        "beta": 0.05,
        "steps_per_generation": None,
        "generation_batch_size": None,
        "reward_load_in_8bit": False,
        "reward_batch_size": 16,
    },
    "grpo": {
        **_MODEL,
        **_TRL,
        "num_generations": 8,
        "max_completion_length": 512,
        "beta": 0.0,
        "steps_per_generation": None,
        "generation_batch_size": None,
        "reward_load_in_8bit": False,
        "reward_batch_size": 16,
    },
    "ppo": {
        **_MODEL,
        "rollout_batch_size": 16,
        "mini_batch_size": 8,
        "gradient_accumulation_steps": 1,
        "response_length": 32,
        "reward_load_in_8bit": False,
        "reward_batch_size": 16,
        "value_model": "policy",
        "eval_prompts": 32,
    },
    "pairs": {"num_samples": 8, "max_new_tokens": 48, "batch_size": 16, "reward_model": None},
    "eval": {
        "load_in_8bit": False,
        "load_in_4bit": False,
        "tasks": ["perplexity", "mmlu"],
        "batch_size": 16,
        "num_samples": 1,
        "max_new_tokens": 64,
        "reward_model": None,
        "reference_model": None,
    },
    "pretrain": {"batch_size": 16, "seq_len": 256, "grad_accum": 1, "dtype": "auto", "fsdp": False},
    "serve": {"dtype": "auto", "max_parallel": 1, "max_n": 4, "max_tokens": 512, "model2": None, "draft_model": None},
    "generate": {"dtype": "auto", "load_in_8bit": False, "load_in_4bit": False, "batch_size": 8, "num_return_sequences": 1,
                 "max_new_tokens": 128, "draft_model": None},
    "chat": {"dtype": "auto", "load_in_8bit": False, "load_in_4bit": False, "max_new_tokens": 256, "draft_model": None},
    "distill": {"batch_size": 16, "seq_len": 128, "sample_tokens": 64, "samples_per_prompt": 1, "hidden_size": 64,
                "num_hidden_layers": 1, "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 2,
                "init": None},
}
STAGES = tuple(STAGE_DEFAULTS)
# Prompt tokens assumed where a stage's config does not bound them (RL prompts, pairs, eval documents).
DEFAULT_PROMPT_LENGTH = 512


# ------------------------------------------------------------------------------------------------------------------
# the model, from config.json


@dataclass(frozen=True)
class ModelShape:
    """The architecture numbers of a decoder-only transformer (transformers' config names)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: biases on q/k/v
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3, OLMo2: RMSNorm on q and k
    max_position_embeddings: int = 4096
    torch_dtype: str | None = None  # the dtype the checkpoint is stored in (what dtype "auto" loads)

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) features of each linear layer of one decoder layer, by its Hugging Face name."""
        H, I = self.hidden_size, self.intermediate_size
        return {
            "q_proj": (H, self.q_dim),
            "k_proj": (H, self.kv_dim),
            "v_proj": (H, self.kv_dim),
            "o_proj": (self.q_dim, H),
            "gate_proj": (H, I),
            "up_proj": (H, I),
            "down_proj": (I, H),
        }

    @property
    def linear_params(self) -> int:
        """Weights of all decoder linear layers (what bitsandbytes quantizes)."""
        return self.num_hidden_layers * sum(i * o for i, o in self.linears().values())

    @property
    def small_params(self) -> int:
        """Norm gains and biases of all layers plus the final norm (kept in a float dtype when quantized)."""
        per_layer = 2 * self.hidden_size
        per_layer += (self.q_dim + 2 * self.kv_dim) * self.qkv_bias + self.hidden_size * self.o_bias
        per_layer += (2 * self.intermediate_size + self.hidden_size) * self.mlp_bias
        per_layer += 2 * self.head_dim * self.qk_norm
        return self.num_hidden_layers * per_layer + self.hidden_size

    @property
    def embed_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self, kind: str = "causal") -> int:
        """The output head: lm_head (none when tied to the embeddings), or a reward model's 1-output `score`."""
        if kind == "reward":
            return self.hidden_size
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def params(self, kind: str = "causal") -> int:
        """All parameters of the causal LM (or of the 1-output sequence classifier for kind='reward')."""
        return self.linear_params + self.small_params + self.embed_params + self.head_params(kind)


def shape_from_config(config: dict, where: str = "config.json") -> ModelShape:
    """Read a ModelShape from a transformers config.json mapping; an architecture we do not model is a UserError."""
    cfg = dict(config.get("text_config") or config)
    mt = cfg.get("model_type")
    if mt not in ARCHITECTURES:
        raise UserError(
            f"{where}: model_type {mt!r} is not a supported architecture; expected one of {', '.join(ARCHITECTURES)}"
        )
    need = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    missing = [k for k in need if not isinstance(cfg.get(k), int) or cfg[k] <= 0]
    if missing:
        raise UserError(f"{where}: missing or invalid {', '.join(missing)}; expected positive integers")
    nh = cfg["num_attention_heads"]
    tie_default = mt in ("gemma", "gemma2")
    return ModelShape(
        model_type=mt,
        vocab_size=cfg["vocab_size"],
        hidden_size=cfg["hidden_size"],
        intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"],
        num_attention_heads=nh,
        num_key_value_heads=cfg.get("num_key_value_heads") or nh,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // nh,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", tie_default)),
        qkv_bias=mt == "qwen2" or bool(cfg.get("attention_bias")),
        o_bias=mt != "qwen2" and bool(cfg.get("attention_bias")),
        mlp_bias=bool(cfg.get("mlp_bias")),
        qk_norm=mt in ("qwen3", "olmo2"),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
    )


def shipped_models_dir() -> Path:
    """recipes/models/: config.json files of the hub models the GPU recipes use (data, not code)."""
    return Path(__file__).resolve().parent.parent / "recipes" / "models"


def find_model_config(name_or_path: str, search: list[Path] | None = None) -> Path | None:
    """config.json of a local model directory, a shipped hub config (recipes/models/<org>--<name>/) or the HF cache."""
    p = Path(str(name_or_path))
    if (p / "config.json").is_file():
        return p / "config.json"
    if str(name_or_path).count("/") == 1 and not p.exists():
        for d in search or [shipped_models_dir()]:
            shipped = Path(d) / str(name_or_path).replace("/", "--") / "config.json"
            if shipped.is_file():
                return shipped
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(str(name_or_path), "config.json")
            if isinstance(cached, str) and Path(cached).is_file():
                return Path(cached)
        except (ImportError, ValueError, OSError):  # an invalid repo id is simply not in the cache
            return None
    return None


def model_config(name_or_path: str, where: str = "model_name_or_path") -> dict:
    """The config.json mapping of a local model directory or a hub name (shipped config or HF cache)."""
    path = find_model_config(name_or_path)
    if path is None:
        raise UserError(
            f"{where}: {name_or_path}: no config.json (not a model directory, not shipped under "
            f"recipes/models/, not in the Hugging Face cache); expected a model with a config.json"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: expected a JSON object")
    return config


def model_shape(name_or_path: str, where: str = "model_name_or_path") -> ModelShape:
    """The ModelShape of a local model directory or a hub name; no weights are read."""
    return shape_from_config(model_config(name_or_path, where), f"{where}: {name_or_path}")


def parse_size(text) -> int:
    """'20GB', '20 GiB', '20G', '24000MB' or a plain number of GB -> bytes (binary units, as cards are sold)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(gib|gb|g|mib|mb|m|tib|tb|t)?\s*", str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--gpu_memory: {text!r} is not a size; expected e.g. 16GB, 20GiB or 24000MB")
    unit = (m.group(2) or "gb")[0]
    return int(float(m.group(1)) * {"g": GiB, "m": MiB, "t": 1024 * GiB}[unit])


def gb(n: float) -> str:
    """Bytes as 'x.xx GB' (binary GB)."""
    return f"{n / GiB:.2f} GB"


# ------------------------------------------------------------------------------------------------------------------
# the estimate: terms grouped into resident memory and phases


@dataclass
class Term:
    """One line of the breakdown. `kind` is the MemTracker category it corresponds to (for the trace comparison)."""

    label: str
    bytes: float
    kind: str  # weights | lora | grads | optimizer | activations | logits | kv | models | overhead


@dataclass
class Phase:
    """A part of a step whose transient memory adds to the resident memory (a micro-batch, a generation...)."""

    name: str
    terms: list[Term]

    @property
    def bytes(self) -> float:
        return sum(t.bytes for t in self.terms)


@dataclass
class Estimate:
    """Resident terms, phases and overhead of one stage; `peak` = resident + largest phase + overhead."""

    stage: str
    resident: list[Term]
    phases: list[Phase]
    notes: list[str] = field(default_factory=list)
    num_processes: int = 1
    sharding: str = "none"

    @property
    def peak_phase(self) -> Phase:
        return max(self.phases, key=lambda p: p.bytes) if self.phases else Phase("idle", [])

    @property
    def allocated(self) -> float:
        """Peak bytes held by tensors (what a tracer or torch.cuda.max_memory_allocated measures)."""
        return sum(t.bytes for t in self.resident) + self.peak_phase.bytes

    @property
    def overhead(self) -> list[Term]:
        return overhead_terms(self.allocated)

    @property
    def peak(self) -> float:
        """Peak device memory the stage needs per process (what must be free on the card)."""
        return self.allocated + sum(t.bytes for t in self.overhead)

    def by_kind(self) -> dict[str, float]:
        """Bytes per term kind at the peak (resident + peak phase, without overhead)."""
        out: dict[str, float] = {}
        for t in self.resident + self.peak_phase.terms:
            out[t.kind] = out.get(t.kind, 0.0) + t.bytes
        return out


def overhead_terms(allocated: float) -> list[Term]:
    """CUDA context (fixed) + caching-allocator slack (a fraction of the allocated peak: blocks split and cached)."""
    return [
        Term("CUDA context (driver, cuBLAS, kernels)", CUDA_CONTEXT, "overhead"),
        Term(f"allocator fragmentation ({ALLOCATOR_SLACK:.0%} of allocated)", ALLOCATOR_SLACK * allocated, "overhead"),
    ]


# ------------------------------------------------------------------------------------------------------------------
# how a model is held: storage and compute precision


@dataclass(frozen=True)
class Precision:
    """How a model's tensors are stored and computed.

    weight: storage of the decoder linear layers (float32 | bfloat16 | float16 | int8 | nf4 | nf4-dq);
    other: bytes per element of the other parameters (embeddings, norms, head); residual: bytes per element of the
    hidden states between layers (fp32 when the embeddings are fp32); compute: bytes of matmul outputs (2 under bf16
    autocast or with 16-bit weights); autocast: whether bf16 autocast is on (every matmul casts its inputs)."""

    weight: str
    other: int
    residual: int
    compute: int
    autocast: bool

    @property
    def quantized(self) -> bool:
        return self.weight in ("int8", "nf4", "nf4-dq")

    @property
    def mm(self) -> int:
        """Bytes of what an autocast-aware op makes (SDPA's q, k, v and output, the fused head's logit tiles): bf16
        under autocast, else the compute dtype. bitsandbytes' matmuls are not autocast-aware (see `compute`)."""
        return 2 if self.autocast else self.compute

    @property
    def logits(self) -> int:
        """Bytes of the head's output: the compute dtype under autocast, else the head weight's dtype."""
        return 2 if self.autocast else self.other

    @property
    def key(self) -> int:
        """Bytes of a cached key: RoPE multiplies by cos/sin in the residual dtype, which promotes 16-bit keys."""
        return max(self.compute, self.residual)


def precision(dtype: str, shape: ModelShape, quant: str | None = None, autocast: bool = False) -> Precision:
    """The Precision of a model loaded with `dtype` ("auto" = the checkpoint's dtype), optional 8/4-bit, optional
    bf16 autocast (TRL's default bf16=True on a GPU)."""
    if dtype == "auto":
        dtype = shape.torch_dtype if shape.torch_dtype in DTYPE_BYTES else "float32"
    if dtype not in DTYPE_BYTES:
        raise UserError(f"dtype: {dtype!r}; expected auto, float32, bfloat16 or float16")
    b = DTYPE_BYTES[dtype]
    if quant:
        other = 4 if KBIT_UPCASTS_TO_FP32 else b
        # bitsandbytes multiplies in bf16/fp16 but returns its input's dtype, which is the (fp32) residual's, so
        # linear outputs and the MLP stay in `other` even under autocast
        return Precision(quant, other, other, other, autocast)
    return Precision(dtype, b, b, 2 if autocast else b, autocast)


def quant_of(settings: dict, prefix: str = "") -> str | None:
    """'int8', 'nf4-dq' or None from load_in_8bit / load_in_4bit (our loader always double-quantizes 4-bit)."""
    if settings.get(prefix + "load_in_8bit") and settings.get(prefix + "load_in_4bit"):
        raise UserError("config: load_in_8bit and load_in_4bit are both set; expected at most one")
    if settings.get(prefix + "load_in_4bit"):
        return "nf4-dq"
    return "int8" if settings.get(prefix + "load_in_8bit") else None


@dataclass(frozen=True)
class Lora:
    """LoRA adapters: rank, target module names, dropout, and the bytes per adapter parameter."""

    r: int
    targets: tuple[str, ...]
    dropout: float
    param_bytes: int

    def params(self, shape: ModelShape) -> int:
        """r * (in + out) per targeted linear layer, over all layers."""
        lin = shape.linears()
        return shape.num_hidden_layers * sum(self.r * sum(lin[t]) for t in self.targets if t in lin)


def lora_of(settings: dict, prec: Precision) -> Lora | None:
    """The LoRA of a config with use_peft, else None. Adapter weights are fp32 (peft's autocast_adapter_dtype) on a
    16/32-bit base, bf16 on a quantized base (TRL casts QLoRA adapters to bf16, as the QLoRA paper does)."""
    if not settings.get("use_peft"):
        return None
    targets = settings.get("lora_target_modules") or LORA_TARGETS
    if isinstance(targets, str):
        targets = LORA_TARGETS if targets == "all-linear" else [targets]
    return Lora(
        int(settings.get("lora_r") or 16),
        tuple(targets),
        float(settings.get("lora_dropout") or 0.0),
        2 if prec.quantized else 4,
    )


# ------------------------------------------------------------------------------------------------------------------
# resident terms: weights, adapters, gradients, optimizer states


def weight_terms(shape: ModelShape, prec: Precision, kind: str = "causal", role: str = "") -> list[Term]:
    """Weights: decoder linears in their storage format, everything else in `prec.other` bytes.

    int8 (LLM.int8): 1 byte/weight + one fp32 scale per output row (SCB).
    nf4: 0.5 byte/weight + an absmax per 64-weight block: fp32 (4/64 byte/weight), or with double quantization 8-bit
    absmaxes (1/64) plus an fp32 scale per 256 blocks (4/16384). Embeddings and the head are never quantized."""
    who = f"{role}: " if role else ""
    rest = shape.small_params + shape.embed_params + shape.head_params(kind)
    lin = shape.linear_params
    if prec.weight in DTYPE_BYTES:
        return [
            Term(
                f"{who}weights {prec.weight} ({(lin + rest) / 1e9:.2f}B params)",
                (lin + rest) * DTYPE_BYTES[prec.weight],
                "weights",
            )
        ]
    if prec.weight == "int8":
        rows = shape.num_hidden_layers * sum(o for _, o in shape.linears().values())
        q = Term(f"{who}linear layers 8-bit ({lin / 1e9:.2f}B params + row scales)", lin * 1 + rows * 4, "weights")
    else:
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if prec.weight == "nf4-dq" else 4 / 64)
        label = "NF4 + double quant" if prec.weight == "nf4-dq" else "NF4"
        q = Term(f"{who}linear layers {label} ({lin / 1e9:.2f}B params, {per:.3f} B/param)", lin * per, "weights")
    dt = {4: "fp32", 2: "bf16"}[prec.other]
    return [q, Term(f"{who}embeddings, head, norms {dt} ({rest / 1e9:.2f}B params)", rest * prec.other, "weights")]


def trainable_params(shape: ModelShape, lora: Lora | None, kind: str) -> tuple[int, int]:
    """(trainable parameter count, bytes per trainable parameter): the LoRA adapters (+ a reward model's score
    head, which peft trains in full), or every parameter for full fine-tuning (bytes set by the caller)."""
    if lora is None:
        return shape.params(kind), 0
    n = lora.params(shape) + (shape.hidden_size if kind == "reward" else 0)
    return n, lora.param_bytes


def optimizer_bytes(n: int, param_bytes: int, optim: str) -> float:
    """AdamW keeps two moments per trainable parameter in the parameter's dtype (torch's AdamW allocates them with
    zeros_like); bitsandbytes 8-bit AdamW (optim names with '8bit') keeps them as 1 byte each plus a negligible
    fp32 absmax per 2048-element block. Other optimizers are counted as AdamW."""
    if "8bit" in (optim or ""):
        return n * (2 + 2 * 4 / 2048)
    return 2 * n * param_bytes


def sharded(terms: list[Term], n: int, sharding: str) -> list[Term]:
    """FSDP / ZeRO-3 split weights, gradients and optimizer states evenly over the n processes."""
    if sharding not in ("fsdp", "zero3") or n <= 1:
        return terms
    return [replace(t, label=f"{t.label} / {n} processes", bytes=t.bytes / n) for t in terms]


# ------------------------------------------------------------------------------------------------------------------
# activations of a training micro-batch


def lora_saved_per_token(d_in: int, lora: Lora, prec: Precision, first_of_group: bool) -> float:
    """Bytes per token one LoRA adapter keeps for backward (peft's Linear casts x to the adapter dtype, applies
    dropout, lora_A, lora_B): the dropout mask (1 byte/element on CUDA's fused dropout, when dropout > 0); lora_A's
    input -- under autocast a bf16 copy made for this adapter alone; otherwise the dropout output or the cast in the
    adapter dtype, or, with neither, the shared input that q/k/v (or gate/up) read, counted once per group -- and
    lora_A's output (r values)."""
    a = lora.param_bytes
    mask = d_in if lora.dropout > 0 else 0
    if prec.autocast:
        x_in = 2 * d_in
    elif lora.dropout > 0 or a != prec.residual:
        x_in = a * d_in
    else:
        x_in = a * d_in if first_of_group else 0
    return mask + x_in + (2 if prec.autocast else a) * lora.r


def layer_saved_per_token(
    shape: ModelShape, prec: Precision, lora: Lora | None, T: int, liger: bool = False, padded: bool = True
) -> float:
    """Bytes one decoder layer keeps for backward per token of the micro-batch (no checkpointing).

    RMSNorm (x2): the fp32 copy of its input (4H) and 1/rms (4), plus its output for the gain's gradient when the gain
    trains (full fine-tuning). Linear layers of full fine-tuning keep their inputs: one copy shared by q/k/v and one by
    gate/up, or, when autocast casts an fp32 residual, a bf16 copy per layer (5). Attention (SDPA's fused kernels: no
    T x T scores): q, k and v after RoPE -- k and v repeated to all query heads, because a padding mask disables SDPA's
    native GQA -- the output and an fp32 log-sum-exp per head, plus the additive mask expanded to (B, 1, T, T) in
    compute dtype. SwiGLU MLP: gate, silu(gate), up and their product (4 x I; 3 x I with a frozen down projection).
    8/4-bit linear layers keep their compute-dtype input for the input gradient. LoRA adds lora_saved_per_token per
    adapter. Liger's fused RMSNorm keeps its input in the residual dtype only, and its fused SwiGLU recomputes silu
    in backward (3 x I). Verified against traced steps (benchmarks/memory_trace.py)."""
    H, I, Q, K = shape.hidden_size, shape.intermediate_size, shape.q_dim, shape.kv_dim
    s, r, sa = prec.compute, prec.residual, prec.mm
    full = lora is None
    norm = (r * H + 4) if liger else (4 * H + 4 + (r * H if full else 0))
    lin_inputs = 0
    if full:
        lin_inputs = (5 if r != s else 2) * s * H
    elif prec.weight == "int8":  # bitsandbytes' MatMul8bitLt keeps its input (q/k/v share one, gate/up another,
        lin_inputs = (2 * H + I) * r  # down reads the MLP product); 4-bit MatMul4Bit keeps only the packed weight
    kv = (2 * sa * Q) if padded else (2 * sa * K)
    attn = sa * Q + kv + sa * Q + 4 * shape.num_attention_heads + (sa * T if padded else 0)
    if shape.qk_norm:
        attn += 4 * (Q + K)
    mlp = (3 if liger or not full else 4) * s * I
    adapters = 0.0
    if lora is not None:
        lin = shape.linears()
        # k/v read q's input and up reads gate's; o's input is the attention output SDPA keeps already
        first = {"k_proj": False, "v_proj": False, "up_proj": False, "o_proj": lora.param_bytes != s}
        adapters = sum(
            lora_saved_per_token(lin[t][0], lora, prec, first.get(t, True)) for t in lora.targets if t in lin
        )
    return 2 * norm + lin_inputs + attn + mlp + adapters


def autocast_weight_copies(shape: ModelShape, prec: Precision) -> float:
    """bf16 copies of fp32 linear weights that bf16 autocast makes and the backward keeps (the weight a matmul needs
    for its input gradient): 2 bytes per decoder linear weight."""
    return 2 * shape.linear_params if prec.autocast and prec.weight == "float32" else 0.0


def layer_backward_temp_per_token(shape: ModelShape, prec: Precision, lora: Lora | None = None) -> float:
    """Gradient buffers alive while one layer runs backward: the incoming and outgoing hidden-state gradients
    (residual dtype) and the MLP's intermediate gradients (gate, up and their product, compute dtype). LoRA adds the
    gradient of the adapters' input in the adapter dtype (the down projection's I, and about 1.5 H for the others
    in flight), measured on traced steps."""
    H, I = shape.hidden_size, shape.intermediate_size
    temp = 2 * prec.residual * H + 3 * prec.compute * I
    if lora is not None:
        temp += lora.param_bytes * ((I if "down_proj" in lora.targets else 0) + 1.5 * H)
    return temp


def activation_terms(
    shape: ModelShape,
    prec: Precision,
    lora: Lora | None,
    B: int,
    T: int,
    checkpointing: bool,
    liger: bool = False,
    padded: bool = True,
) -> tuple[list[Term], list[Term]]:
    """Activations of one micro-batch of B sequences x T tokens: (kept at the start of backward, the extra peak of a
    layer's backward).

    Without checkpointing every layer keeps layer_saved_per_token, and a layer's backward adds its gradient buffers.
    With gradient checkpointing (transformers, non-reentrant) a layer keeps only its input (residual dtype); its
    backward first recomputes its forward, so the extra peak is one layer's saved tensors plus its gradient buffers.
    The embedding output and the final norm (its fp32 input copy, its output and the copy the head reads) are
    outside the checkpointed layers."""
    N = B * T
    L = shape.num_hidden_layers
    per_layer = layer_saved_per_token(shape, prec, lora, T, liger, padded)
    temp = layer_backward_temp_per_token(shape, prec, lora)
    copies = autocast_weight_copies(shape, prec)
    if checkpointing:
        kept = [
            Term(
                f"activations: {B} x {T} tokens, checkpointed layer inputs ({L} layers)",
                N * L * prec.residual * shape.hidden_size,
                "activations",
            )
        ]
        # full fine-tuning reaches its peak at the first layer, whose gradient buffers replace freed activations
        backward = [
            Term(
                f"one layer recomputed in backward ({per_layer / 1024:.1f} KiB/token) + gradient buffers",
                N * (per_layer + (temp if lora is not None else 0)) + copies / L,
                "activations",
            )
        ]
    else:
        kept = [
            Term(
                f"activations: {B} x {T} tokens x {L} layers ({per_layer / 1024:.1f} KiB/token/layer)",
                N * L * per_layer,
                "activations",
            )
        ]
        if copies:
            kept.append(Term("bf16 copies of the fp32 weights made by autocast", copies, "activations"))
        backward = [Term("a layer's gradient buffers in backward", N * temp, "activations")]
    return kept, backward


def final_norm_terms(shape: ModelShape, prec: Precision, N: int, full: bool) -> list[Term]:
    """The final RMSNorm's saved tensors (fp32 input copy, 1/rms, its output when its gain trains) and the copy of
    the hidden states the head reads; freed once the head's backward is done, before the layers' backward."""
    H, r = shape.hidden_size, prec.residual
    return [
        Term(
            "final norm and the hidden states the head reads",
            N * (4 * H + 4 + (r * H if full else 0) + r * H),
            "activations",
        )
    ]


# ------------------------------------------------------------------------------------------------------------------
# the output head: logits


def fused_head_terms(shape: ModelShape, prec: Precision, N: int, head_trains: bool) -> list[Term]:
    """TRL 1.16's fused LM head (SFT, DPO, RLOO, GRPO): per-token log-probs from (4096 tokens x 32768 vocab) tiles,
    never the whole logits. Its backward holds one tile (compute dtype), the fp32 gradient of the hidden states
    (N x H) and its cast, a cast of the head's weight chunk when the head is stored wider than the compute dtype,
    and, when the head trains (full fine-tuning), an fp32 gradient of the whole head (V x H) plus its cast.
    The tile is allocated at full width even when the vocabulary is smaller than 32768."""
    H, V = shape.hidden_size, shape.vocab_size
    s = prec.mm
    tile = min(N, TOKEN_TILE) * VOCAB_TILE * s
    chunk_cast = (min(V, VOCAB_TILE) * H * s if prec.other != s else 0) + (
        min(N, TOKEN_TILE) * H * s if prec.residual != s else 0
    )
    terms = [
        Term(
            f"logits tile {min(N, TOKEN_TILE)} x {VOCAB_TILE} (TRL fused LM head; full logits never exist)",
            tile + chunk_cast,
            "logits",
        ),
        Term("hidden-state gradient from the head (fp32 + cast)", N * H * (4 + prec.residual), "logits"),
    ]
    if head_trains:
        w = prec.other
        terms.append(Term(f"head gradient fp32 ({V} x {H}) + cast", V * H * (4 + w), "logits"))
    return terms


def full_logits_terms(shape: ModelShape, prec: Precision, B: int, T: int, R: int, train: bool) -> list[Term]:
    """Logits of a plain forward over B x T tokens of which the last R are scored (alignment.ppo.forward_response):
    the (B, T, V) logits in compute dtype, an fp32 copy of the R scored positions divided by the temperature, and its
    fp32 log-softmax. In training the log-softmax is kept for backward, whose fp32 gradients (gather, log-softmax,
    division) and the zero-filled (B, T, V) gradient of the slice add up to 12 bytes x B x R x V + the slice's."""
    V, s = shape.vocab_size, prec.logits
    full = B * T * V * s
    if train:
        return [
            Term(
                f"logits {B} x {T} x {V} ({s * 8}-bit) + fp32 log-softmax of {R} positions and its backward",
                full + 12 * B * R * V,
                "logits",
            )
        ]
    return [
        Term(
            f"logits {B} x {T} x {V} ({s * 8}-bit) + fp32 copies of {R} positions (no grad)",
            full + 8 * B * R * V,
            "logits",
        )
    ]


# ------------------------------------------------------------------------------------------------------------------
# inference: generation and scoring passes


def kv_cache_bytes(shape: ModelShape, prec: Precision, B: int, T: int) -> float:
    """Keys and values of every layer for B sequences of T tokens: layers x kv_heads x head_dim x B x T each, as the
    attention computed them (transformers' DynamicCache): values in compute dtype, keys after RoPE (prec.key)."""
    return shape.num_hidden_layers * shape.kv_dim * B * T * (prec.key + prec.compute)


def forward_transient_per_token(shape: ModelShape, prec: Precision, T: int = 0, padded: bool = False) -> float:
    """Live tensors per token at the fullest moment of one layer of a no-grad forward over sequences of T tokens: the
    residual, the layer's input and output (3 x residual dtype) and an fp32 norm copy, the (B, 1, T, T) bool padding
    mask, and the larger of the MLP's silu(gate), up and their product (3 x I; without grad the gate is freed once
    activated) and attention's q, k, v repeated to all heads, output and the mask expanded to compute dtype."""
    H, I, s = shape.hidden_size, shape.intermediate_size, prec.compute
    attn = 4 * s * shape.q_dim + (s * T if padded else 0)
    return 3 * prec.residual * H + 4 * H + (T if padded else 0) + max(3 * s * I, attn)


def generation_terms(
    shape: ModelShape, prec: Precision, B: int, P: int, R: int, who: str, padded: bool = True
) -> list[Term]:
    """model.generate for B sequences of P prompt + R new tokens: the larger of the prefill (one layer's transients
    over B x P tokens, the (B, 1, P, P) mask of a left-padded batch, the KV cache of the prompt) and the last decoding
    step (the KV cache at P + R tokens and fp32 next-token scores, B x V; logits exist for the last position only)."""
    prefill = [
        Term(
            f"{who} prefill of {B} x {P} prompt tokens (one layer at a time)",
            B * P * forward_transient_per_token(shape, prec, P, padded),
            "activations",
        ),
        Term(f"{who} KV cache of the prompt ({B} x {P} tokens)", kv_cache_bytes(shape, prec, B, P), "kv"),
    ]
    last = [
        Term(f"{who} KV cache: {B} sequences x {P + R} tokens", kv_cache_bytes(shape, prec, B, P + R), "kv"),
        Term(
            f"{who} next-token scores ({B} x {shape.vocab_size}, fp32) and one layer's step",
            3 * B * shape.vocab_size * 4 + B * forward_transient_per_token(shape, prec),
            "logits",
        ),
    ]
    return max(prefill, last, key=lambda ts: sum(t.bytes for t in ts))


def scoring_terms(
    shape: ModelShape, prec: Precision, B: int, T: int, who: str, padded: bool = True, cache: bool = False
) -> list[Term]:
    """A no-grad forward of B x T tokens whose output is small (a reward model's score, a fused-head log-prob, the
    few scored positions of a multiple-choice prompt): one layer's transients at a time, plus the (B, 1, T, T)
    additive mask of a padded batch. `cache`: the forward does not pass use_cache=False, so transformers fills a
    KV cache it never uses (alignment.modeling.reward_scores)."""
    per_token = forward_transient_per_token(shape, prec, T, padded)
    terms = [Term(f"{who}: forward of {B} x {T} tokens (no grad)", B * T * per_token, "activations")]
    if cache:
        terms.append(
            Term(f"{who}: KV cache the forward fills (no use_cache=False)", kv_cache_bytes(shape, prec, B, T), "kv")
        )
    return terms


# ------------------------------------------------------------------------------------------------------------------
# stages


def _get(settings: dict, stage: str, key: str):
    v = settings.get(key)
    return STAGE_DEFAULTS[stage].get(key) if v is None else v


def _int(settings: dict, stage: str, key: str) -> int:
    v = _get(settings, stage, key)
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise UserError(f"{key}: {v!r}; expected an integer") from None
    if n < 0:
        raise UserError(f"{key}: {v!r}; expected a non-negative integer")
    return n


def _autocast(settings: dict, stage: str) -> bool:
    """TRL configs default to bf16=True (autocast) on a GPU unless fp16 is set."""
    bf16 = _get(settings, stage, "bf16")
    return bool(_get(settings, stage, "fp16")) or (bf16 is None or bool(bf16))


def _trainable(
    stage: str, settings: dict, shape: ModelShape, kind: str, autocast: bool, n: int, sharding: str
) -> tuple[Precision, Lora | None, list[Term], list[Term]]:
    """The trained model of a TRL-style stage: (precision, lora, resident terms, gradient terms)."""
    quant = quant_of(settings)
    if quant and not settings.get("use_peft"):
        raise UserError(
            "config: load_in_8bit/load_in_4bit need use_peft: true (quantized weights cannot be trained directly)"
        )
    prec = precision(str(_get(settings, stage, "dtype")), shape, quant, autocast)
    lora = lora_of(settings, prec)
    count, pbytes = trainable_params(shape, lora, kind)
    if lora is None:
        pbytes = DTYPE_BYTES[prec.weight]
    optim = str(_get(settings, stage, "optim") or "adamw_torch_fused")
    label = (
        f"LoRA r={lora.r} ({count / 1e6:.1f}M params, {'bf16' if lora.param_bytes == 2 else 'fp32'})"
        if lora
        else "full fine-tuning"
    )
    opt_label = (
        "8-bit AdamW states (2 x 1 byte)"
        if "8bit" in optim
        else f"AdamW states (2 x {'fp32' if pbytes == 4 else 'bf16'})"
    )
    resident = weight_terms(shape, prec, kind)
    if lora is not None:
        resident.append(
            Term(
                f"LoRA adapters r={lora.r} on {len(lora.targets)} projections ({count / 1e6:.1f}M params)",
                count * pbytes,
                "lora",
            )
        )
    resident.append(Term(f"{opt_label} for {label}", optimizer_bytes(count, pbytes, optim), "optimizer"))
    grads = [Term(f"gradients of the {count / 1e6:.1f}M trainable params", count * pbytes, "grads")]
    if sharding in ("fsdp", "zero3") and n > 1:
        resident = sharded(resident, n, sharding)
        grads = sharded(grads, n, sharding)
        gathered = 2 * (shape.linear_params / shape.num_hidden_layers) * prec.compute
        resident.append(Term(f"{sharding}: two layers gathered unsharded (current + prefetch)", gathered, "weights"))
        if sharding == "zero3" and pbytes == 2:
            resident.append(Term(f"zero3: fp32 master copy of trainable params / {n}", count * 4 / n, "optimizer"))
    elif n > 1:
        grads.append(Term(f"DDP gradient buckets ({n} processes replicate the model)", count * pbytes, "grads"))
    return prec, lora, resident, grads


def _train_phase(
    name: str,
    shape: ModelShape,
    prec: Precision,
    lora: Lora | None,
    B: int,
    T: int,
    ckpt: bool,
    liger: bool,
    head: str,
    grads: list[Term],
    accumulate: bool,
) -> Phase:
    """A training micro-batch: the activations kept for backward, then the larger of the head's backward (which
    runs first) and one layer's backward; plus the gradients when they live across micro-batches."""
    kept, layer_bwd = activation_terms(shape, prec, lora, B, T, ckpt, liger)
    N = B * T
    head_terms = final_norm_terms(shape, prec, N, lora is None)
    if head == "fused":
        head_terms += fused_head_terms(shape, prec, N, lora is None)
    else:
        head_terms += [Term("score head outputs (B x T x 1)", N * 4 * 3, "logits")]
    if lora is None and not accumulate:
        # full fine-tuning: gradients pile up while backward frees activations. Checkpointed layers keep little, so
        # the peak comes at the first layer, with every gradient made; without checkpointing it comes at the start,
        # with the head's and the last layer's.
        w = DTYPE_BYTES.get(prec.weight, 4)
        first = shape.head_params("causal") or shape.embed_params
        layer = shape.linear_params / shape.num_hidden_layers * w
        made = sum(t.bytes for t in grads) - layer if ckpt else first * w + layer
        layer_bwd = layer_bwd + [Term("gradients made so far in backward", made, "grads")]
    terms = kept + max(head_terms, layer_bwd, key=lambda ts: sum(t.bytes for t in ts))
    if accumulate:
        terms += grads
    return Phase(name, terms)


def _optimizer_phase(grads: list[Term]) -> Phase:
    """The optimizer step: every gradient is alive (fused AdamW needs no other temporaries)."""
    return Phase("optimizer step", list(grads))


def _sft_like(stage: str, settings: dict, shapes: dict, n: int, sharding: str) -> Estimate:
    """sft / reward / dpo: one trained model, micro-batches of fixed length, no extra models (DPO's reference
    log-probs are always precomputed and cached by recipes/dpo.py, so no reference model is held)."""
    shape = shapes["policy"]
    kind = "reward" if stage == "reward" else "causal"
    autocast = _autocast(settings, stage)
    prec, lora, resident, grads = _trainable(stage, settings, shape, kind, autocast, n, sharding)
    B = _int(settings, stage, "per_device_train_batch_size")
    T = _int(settings, stage, "max_length") or shape.max_position_embeddings
    seqs = 2 * B if stage in ("reward", "dpo") else B  # chosen and rejected run as one concatenated batch
    ckpt = bool(_get(settings, stage, "gradient_checkpointing"))
    liger = bool(_get(settings, stage, "use_liger_kernel"))
    accumulate = _int(settings, stage, "gradient_accumulation_steps") > 1
    head = "score" if stage == "reward" else "fused"
    phases = [
        _train_phase(
            f"training micro-batch ({seqs} sequences x {T} tokens)",
            shape,
            prec,
            lora,
            seqs,
            T,
            ckpt,
            liger,
            head,
            grads,
            accumulate,
        ),
        _optimizer_phase(grads),
    ]
    notes = []
    if stage == "dpo":
        eb = _int(settings, stage, "per_device_eval_batch_size")
        # recipes/dpo.py completion_logps: model(...).logits.float() on the device for held-out pairs
        phases.append(
            Phase(
                f"held-out log-probs after training ({eb} sequences, full logits)",
                [
                    Term(
                        f"logits {eb} x {T} x {shape.vocab_size} + fp32 copy (recipes/dpo.py completion_logps)",
                        eb * T * shape.vocab_size * (prec.other + (4 if prec.other != 4 else 0)),
                        "logits",
                    )
                ]
                + scoring_terms(shape, prec, eb, T, "policy"),
            )
        )
        notes.append("DPO: reference log-probs are precomputed and cached (no reference model in memory)")
    if stage == "reward":
        sb = _int(settings, stage, "score_batch_size")
        phases.append(
            Phase(
                f"held-out accuracy scoring ({sb} sequences)",
                scoring_terms(shape, prec, sb, T, "reward model", cache=True),
            )
        )
    return Estimate(stage, resident, phases, notes, n, sharding)


def uses_reward_model(settings: dict) -> bool:
    """Whether the online RL stages' `rewards` (default: model, ends_at_end_of_turn) include the reward model
    (alignment.rewards.needs_reward_model; not imported: that module pulls in torch)."""
    specs = settings.get("rewards") or ["model"]
    return any(str(spec).split("@")[0].split(":")[0] == "model" for spec in specs)


def _reward_model_terms(settings: dict, stage: str, shape: ModelShape) -> tuple[Precision, list[Term]]:
    """The frozen reward model of PPO/RLOO/GRPO: fp32 (alignment.ppo.load_reward_model) or 8-bit (fp16 rest)."""
    if _get(settings, stage, "reward_load_in_8bit"):
        prec = Precision("int8", 2, 2, 2, False)
    else:
        prec = precision("float32", shape)
    return prec, weight_terms(shape, prec, "reward", "reward model")


def _ppo(settings: dict, shapes: dict, n: int, sharding: str) -> Estimate:
    """Our PPO (alignment/ppo.py): the policy (LoRA; the reference is the same weights with the adapter disabled, or
    a full copy without LoRA), a value head on the policy trunk (or a separate fp32 value trunk), the reward model,
    torch AdamW over the trainable parameters; no autocast and no gradient checkpointing. Phases: sampling the whole
    rollout batch with a KV cache, the experience forward over the whole rollout batch (full logits and all hidden
    states), reward scoring, and training micro-batches of mini_batch_size / gradient_accumulation_steps."""
    stage = "ppo"
    shape = shapes["policy"]
    quant = quant_of(settings)
    prec = precision(str(_get(settings, stage, "dtype")), shape, quant, autocast=False)
    lora = lora_of(settings, prec)
    if lora is not None:
        lora = replace(lora, param_bytes=4)  # our loop does not cast adapters to bf16
    resident = weight_terms(shape, prec, "causal", "policy")
    count, pbytes = trainable_params(shape, lora, "causal")
    pbytes = pbytes or DTYPE_BYTES[prec.weight]
    if lora is not None:
        resident.append(
            Term(f"policy LoRA adapters r={lora.r} ({count / 1e6:.1f}M params, fp32)", count * pbytes, "lora")
        )
    else:
        resident += [
            replace(t, label=t.label.replace("policy", "reference (frozen copy)"), kind="models")
            for t in weight_terms(shape, prec, "causal", "reference")
        ]
    value = shapes.get("value")
    vcount = shape.hidden_size + 1
    if value is not None:
        vprec = precision("float32", value)
        resident += [replace(t, kind="models") for t in weight_terms(value, vprec, "causal", "value trunk")]
        vcount += value.params("causal") - value.head_params("causal")
    resident.append(
        Term(
            f"value head{' + trunk' if value is not None else ''} ({vcount / 1e6:.2f}M params, fp32)",
            vcount * 4 if value is None else (shape.hidden_size + 1) * 4,
            "lora",
        )
    )
    resident.append(
        Term(
            f"AdamW states (2 x fp32) for {(count + vcount) / 1e6:.1f}M trainable params",
            2 * (count * pbytes + vcount * 4),
            "optimizer",
        )
    )
    rm_prec, rm_terms = (_reward_model_terms(settings, stage, shapes["reward"]) if "reward" in shapes
                         else (None, []))
    resident += [replace(t, kind="models") for t in rm_terms]
    grads = [Term("gradients of the trainable params", count * pbytes + vcount * 4, "grads")]

    P = _int(settings, stage, "prompt_length") if settings.get("prompt_length") else DEFAULT_PROMPT_LENGTH
    R = _int(settings, stage, "response_length")
    Bro = _int(settings, stage, "rollout_batch_size")
    accum = max(1, _int(settings, stage, "gradient_accumulation_steps"))
    micro = max(1, _int(settings, stage, "mini_batch_size") // accum)
    T = P + R
    phases = [
        Phase(f"rollout: sampling {Bro} responses", generation_terms(shape, prec, Bro, P, R, "policy")),
        Phase(
            f"experience forward over the whole rollout batch ({Bro} x {T} tokens)",
            [
                Term(
                    f"hidden states of {shape.num_hidden_layers + 1} layers (output_hidden_states)",
                    Bro * T * (shape.num_hidden_layers + 1) * prec.residual * shape.hidden_size,
                    "activations",
                )
            ]
            + max(
                full_logits_terms(shape, prec, Bro, T, R, train=False),
                scoring_terms(shape, prec, Bro, T, "policy"),
                key=lambda ts: sum(t.bytes for t in ts),
            ),
        ),
        Phase(
            f"reward scoring ({_int(settings, stage, 'reward_batch_size')} sequences)",
            scoring_terms(shapes["reward"], rm_prec, _int(settings, stage, "reward_batch_size"), T, "reward model", cache=True)
            if "reward" in shapes else [],  # rewards without a model (a checker, a function) hold no tensors
        ),
    ]
    kept, _ = activation_terms(shape, prec, lora, micro, T, checkpointing=False)
    # output_hidden_states keeps every layer's output; in fp32 the norms keep those very tensors already
    hs = 0 if prec.residual == 4 else micro * T * (shape.num_hidden_layers + 1) * prec.residual * shape.hidden_size
    train = kept + [
        Term(
            f"hidden states of all {shape.num_hidden_layers + 1} layers returned (output_hidden_states)",
            hs,
            "activations",
        )
    ]
    train += final_norm_terms(shape, prec, micro * T, lora is None) + full_logits_terms(
        shape, prec, micro, T, R, train=True
    )
    if value is not None:
        train += activation_terms(value, precision("float32", value), None, micro, T, checkpointing=False)[0]
    if accum > 1:
        train += grads
    phases.append(Phase(f"training micro-batch ({micro} x {T} tokens)", train))
    phases.append(_optimizer_phase(grads))
    if _int(settings, stage, "eval_prompts") > 0:
        # PPO.evaluate: held-out prompts 16 at a time, sampled and scored by policy and reference (no hidden states)
        Be = min(16, _int(settings, stage, "eval_prompts"))
        phases.append(
            Phase(
                f"held-out evaluation ({Be} prompts at a time)",
                max(
                    generation_terms(shape, prec, Be, P, R, "policy"),
                    full_logits_terms(shape, prec, Be, T, R, train=False),
                    key=lambda ts: sum(t.bytes for t in ts),
                ),
            )
        )
    notes = [
        f"prompts assumed {P} tokens (--prompt_length N to change)",
        "the experience forward runs the whole rollout batch at once; rollout_batch_size bounds it",
    ]
    return Estimate(stage, resident, [p for p in phases if p.terms], notes, n, sharding)


def _online(stage: str, settings: dict, shapes: dict, n: int, sharding: str) -> Estimate:
    """TRL RLOO / GRPO: the policy (LoRA, the reference via the disabled adapter when beta > 0; a full reference
    copy without LoRA), the reward model, generation of per_device_train_batch_size x steps_per_generation
    completions with the HF sampler, then training micro-batches with the fused head."""
    shape = shapes["policy"]
    autocast = _autocast(settings, stage)
    prec, lora, resident, grads = _trainable(stage, settings, shape, "causal", autocast, n, sharding)
    beta = float(_get(settings, stage, "beta") or 0.0)
    if lora is None and beta > 0:
        resident += [replace(t, kind="models") for t in weight_terms(shape, prec, "causal", "reference (frozen copy)")]
    rm_prec, rm_terms = (_reward_model_terms(settings, stage, shapes["reward"]) if "reward" in shapes
                         else (None, []))
    resident += [replace(t, kind="models") for t in rm_terms]
    B = _int(settings, stage, "per_device_train_batch_size")
    steps = settings.get("steps_per_generation") or _int(settings, stage, "gradient_accumulation_steps")
    gen = settings.get("generation_batch_size")
    G = int(gen) // n if gen else B * int(steps)
    P = _int(settings, stage, "prompt_length") if settings.get("prompt_length") else DEFAULT_PROMPT_LENGTH
    C = _int(settings, stage, "max_completion_length")
    T = P + C
    ckpt = bool(_get(settings, stage, "gradient_checkpointing"))
    liger = bool(_get(settings, stage, "use_liger_kernel"))
    accumulate = _int(settings, stage, "gradient_accumulation_steps") > 1
    phases = [
        Phase(
            f"generation: {G} completions ({_int(settings, stage, 'num_generations')} per prompt)",
            generation_terms(shape, prec, G, P, C, "policy"),
        ),
        Phase(
            f"reward scoring ({_int(settings, stage, 'reward_batch_size')} sequences)",
            scoring_terms(shapes["reward"], rm_prec, _int(settings, stage, "reward_batch_size"), T, "reward model", cache=True)
            if "reward" in shapes else [],  # rewards without a model (a checker, a function) hold no tensors
        ),
        _train_phase(
            f"training micro-batch ({B} x {T} tokens)", shape, prec, lora, B, T, ckpt, liger, "fused", grads, accumulate
        ),
        _optimizer_phase(grads),
    ]
    notes = [f"prompts assumed {P} tokens (--prompt_length N to change)"]
    return Estimate(stage, resident, [p for p in phases if p.terms], notes, n, sharding)


def _pairs(settings: dict, shapes: dict, n: int, sharding: str) -> Estimate:
    """align pairs: inference only. The policy loads in its checkpoint dtype (evals.scoring.load_model, dtype auto),
    the reward model in fp32; each prompt is sampled num_samples times in one generate call."""
    stage = "pairs"
    shape = shapes["policy"]
    prec = precision("auto", shape)
    resident = weight_terms(shape, prec, "causal", "policy")
    phases = []
    P = _int(settings, stage, "prompt_length") if settings.get("prompt_length") else DEFAULT_PROMPT_LENGTH
    R = _int(settings, stage, "max_new_tokens")
    k = _int(settings, stage, "num_samples")
    # evals.preference.sample_responses: one prompt, num_return_sequences=k, no padding
    phases.append(
        Phase(f"sampling {k} answers per prompt", generation_terms(shape, prec, k, P, R, "policy", padded=False))
    )
    if "reward" in shapes:
        rprec = precision("float32", shapes["reward"])
        resident += [replace(t, kind="models") for t in weight_terms(shapes["reward"], rprec, "reward", "reward model")]
        bs = _int(settings, stage, "batch_size")
        phases.append(
            Phase(
                f"reward scoring ({bs} sequences)",
                scoring_terms(shapes["reward"], rprec, bs, P + R, "reward model", cache=True),
            )
        )
    return Estimate(stage, resident, phases, [f"prompts assumed {P} tokens (--prompt_length N to change)"], n, sharding)


def _eval(settings: dict, shapes: dict, n: int, sharding: str) -> Estimate:
    """align eval: inference only. The model in its checkpoint dtype (or 8/4-bit), the reference model (dpo,
    winrate tasks) in its checkpoint dtype, the reward model in fp32. Perplexity scores every position of each
    window (head output and fp32 log-softmax for B x T positions); MMLU scores a few positions per prompt; the
    win rate samples num_samples answers per prompt."""
    stage = "eval"
    shape = shapes["policy"]
    quant = "int8" if settings.get("load_in_8bit") else "nf4" if settings.get("load_in_4bit") else None
    prec = precision("auto", shape, quant)
    if quant:  # the eval loader does not call prepare_model_for_kbit_training: the rest stays in the checkpoint dtype
        b = DTYPE_BYTES.get(shape.torch_dtype or "float32", 4)
        prec = replace(prec, other=b, residual=b, compute=b if quant != "int8" else 2)
    tasks = settings.get("tasks") or STAGE_DEFAULTS["eval"]["tasks"]
    tasks = [
        t.strip() for item in ([tasks] if isinstance(tasks, str) else tasks) for t in str(item).split(",") if t.strip()
    ]
    B = _int(settings, stage, "batch_size")
    T = min(
        shape.max_position_embeddings, _int(settings, stage, "prompt_length") if settings.get("prompt_length") else 2048
    )
    resident = weight_terms(shape, prec, "causal", "model")
    phases = []
    if "perplexity" in tasks or "mmlu" in tasks:
        phases.append(
            Phase(f"scoring forward: {B} x {T} tokens", scoring_terms(shape, prec, B, T, "model", padded=False))
        )
    if "perplexity" in tasks:
        # evals/scoring.py: the head and an fp32 log-softmax at every scored position (all of them for perplexity);
        # the head's 16-bit output is freed once cast, so an fp32 copy and the log-softmax coexist
        N = B * T
        phases.append(
            Phase(
                f"perplexity head: {N} positions x {shape.vocab_size} vocab",
                [
                    Term(
                        "final hidden states + the scored positions' copy",
                        2 * N * prec.residual * shape.hidden_size,
                        "activations",
                    ),
                    Term(
                        f"head output as fp32 + fp32 log-softmax ({N} x {shape.vocab_size})",
                        N * shape.vocab_size * 8,
                        "logits",
                    ),
                ],
            )
        )
    if {"dpo", "winrate"} & set(tasks) and "reference" in shapes:
        rp = precision("auto", shapes["reference"])
        resident += [
            replace(t, kind="models") for t in weight_terms(shapes["reference"], rp, "causal", "reference model")
        ]
    if {"preference", "winrate"} & set(tasks) and "reward" in shapes:
        rm = precision("float32", shapes["reward"])
        resident += [replace(t, kind="models") for t in weight_terms(shapes["reward"], rm, "reward", "reward model")]
        phases.append(
            Phase(
                f"reward scoring ({B} sequences)", scoring_terms(shapes["reward"], rm, B, T, "reward model", cache=True)
            )
        )
    if "winrate" in tasks:
        k = _int(settings, stage, "num_samples")
        phases.append(
            Phase(
                f"win rate: sampling {k} answers",
                generation_terms(shape, prec, k, T, _int(settings, stage, "max_new_tokens"), "model", padded=False),
            )
        )
    notes = [f"documents/prompts assumed {T} tokens (--prompt_length N; perplexity windows are min(document, context))"]
    return Estimate(stage, resident, phases, notes, n, sharding)


def _pretrain(settings: dict, shapes: dict, n: int, sharding: str) -> Estimate:
    """align pretrain (pretrain/train.py): fp32 weights, bf16 autocast on CUDA (dtype auto), fused AdamW fp32 states,
    fp32 gradients, full logits and fp32 cross-entropy over every position; DDP, or FSDP2 with fsdp: true."""
    stage = "pretrain"
    shape = shapes["policy"]
    dtype = str(_get(settings, stage, "dtype"))
    autocast = dtype in ("auto", "bfloat16")
    prec = Precision("float32", 4, 4, 2 if autocast else 4, autocast)
    if _get(settings, stage, "fsdp") and sharding == "none":
        sharding = "fsdp"
    count = shape.params("causal")
    resident = [
        Term(f"weights fp32 ({count / 1e9:.3f}B params)", count * 4, "weights"),
        Term("AdamW states (2 x fp32)", count * 8, "optimizer"),
    ]
    grads = [Term(f"gradients fp32 ({count / 1e9:.3f}B params)", count * 4, "grads")]
    if sharding in ("fsdp", "zero3") and n > 1:
        resident, grads = sharded(resident, n, sharding), sharded(grads, n, sharding)
        resident.append(
            Term(
                f"{sharding}: two layers gathered unsharded",
                2 * shape.linear_params / shape.num_hidden_layers * 4,
                "weights",
            )
        )
    elif n > 1:
        grads.append(Term(f"DDP gradient buckets ({n} processes)", count * 4, "grads"))
    B, T = _int(settings, stage, "batch_size"), _int(settings, stage, "seq_len")
    # pretrain/model.py: causal SDPA without a padding mask, native GQA (no repeated k/v, no (B, 1, T, T) mask)
    terms = activation_terms(shape, prec, None, B, T, checkpointing=False, padded=False)[0]
    terms += final_norm_terms(shape, prec, B * T, True)
    if autocast:  # the head's fp32 weight is cast too (a plain linear here, not TRL's fused head)
        terms.append(
            Term(
                "bf16 copy of the head weight made by autocast", 2 * shape.vocab_size * shape.hidden_size, "activations"
            )
        )
    V = shape.vocab_size
    # pretrain/train.py keeps the returned logits (`_, loss = model(x, y)`) through backward; the cross-entropy
    # keeps its fp32 log-softmax, and its backward adds two fp32 gradients of the same size
    terms.append(
        Term(
            f"logits {B} x {T} x {V} ({prec.compute * 8}-bit) + fp32 log-softmax + its 2 fp32 gradients",
            B * T * V * (prec.compute + 12),
            "logits",
        )
    )
    if _int(settings, stage, "grad_accum") > 1:
        terms += grads
    else:
        terms.append(
            Term("head gradient (first produced in backward)", shape.vocab_size * shape.hidden_size * 4, "grads")
        )
    phases = [Phase(f"training micro-batch ({B} x {T} tokens)", terms), _optimizer_phase(grads)]
    notes = [
        "torch.compile (compile: true) fuses elementwise ops and needs less activation memory than this eager estimate"
    ]
    return Estimate(stage, resident, phases, notes, n, sharding)


def _inference(stage: str, settings: dict, shapes: dict, n: int, sharding: str) -> Estimate:
    """align serve / generate / chat: inference only. Each model (the first, serve's second, a draft) loads in its
    dtype (auto: the checkpoint's; fp32 without CUDA) or 8/4-bit; the peak is the largest set of sequences sampled at
    once: serve runs max_parallel requests of up to max_n answers and max_tokens each, generate batch_size prompts x
    num_return_sequences (one prompt at a time with a draft), chat one answer."""
    quant = "nf4" if settings.get("load_in_4bit") else "int8" if settings.get("load_in_8bit") else None
    resident, phases = [], []
    P = _int(settings, stage, "prompt_length") if settings.get("prompt_length") else DEFAULT_PROMPT_LENGTH
    if stage == "serve":
        B, R = _int(settings, stage, "max_parallel") * _int(settings, stage, "max_n"), _int(settings, stage, "max_tokens")
    elif stage == "generate":
        per_call = 1 if settings.get("draft_model") else _int(settings, stage, "batch_size")
        B, R = per_call * _int(settings, stage, "num_return_sequences"), _int(settings, stage, "max_new_tokens")
    else:
        B, R = 1, _int(settings, stage, "max_new_tokens")
    for role, label in (("policy", "model"), ("second", "second model"), ("draft", "draft model")):
        if role not in shapes:
            continue
        prec = precision(str(_get(settings, stage, "dtype")), shapes[role], quant if role == "policy" else None)
        resident += [replace(t, kind="models") for t in weight_terms(shapes[role], prec, "causal", label)]
        if role != "second":  # the two arena models answer one after the other, not at once
            phases.append(Phase(f"{label}: sampling {B} sequences of {P} + {R} tokens",
                                generation_terms(shapes[role], prec, B, P, R, label)))
    # a draft and its target both hold their caches while decoding: the draft's transients add to the target's
    if len(phases) == 2:
        phases = [Phase(phases[0].name + " with its draft", phases[0].terms + phases[1].terms)]
    return Estimate(stage, resident, phases, [f"prompts assumed {P} tokens (--prompt_length N to change)"], n, sharding)


def _distill(settings: dict, shapes: dict, n: int, sharding: str) -> Estimate:
    """align distill: the target frozen in fp32 (no CUDA: fp32; on a GPU in its checkpoint dtype), the small draft
    trained in fp32 with AdamW. The larger of sampling the target's outputs (batch_size prompts x samples_per_prompt)
    and a training step: the target's full logits over batch_size x seq_len (the KL needs every position) beside the
    draft's forward, logits and backward."""
    stage = "distill"
    target, draft = shapes["policy"], shapes["draft"]
    tprec = precision("auto", target)
    dprec = precision("float32", draft)
    resident = [replace(t, kind="models") for t in weight_terms(target, tprec, "causal", "target (frozen)")]
    resident += weight_terms(draft, dprec, "causal", "draft")
    count = draft.params()
    grads = [Term(f"gradients of the draft ({count / 1e6:.1f}M params, fp32)", 4 * count, "grads")]
    resident.append(Term(f"AdamW states (2 x fp32) for {count / 1e6:.1f}M params", 8 * count, "optimizer"))
    B, T = _int(settings, stage, "batch_size"), _int(settings, stage, "seq_len")
    k = _int(settings, stage, "samples_per_prompt")
    kept, layer_bwd = activation_terms(draft, dprec, None, B, T, checkpointing=False)
    phases = [
        Phase(f"target sampling ({B * k} sequences)",
              generation_terms(target, tprec, B * k, T, _int(settings, stage, "sample_tokens"), "target")),
        Phase(f"training step ({B} x {T} tokens)",
              full_logits_terms(target, tprec, B, T, T, train=False) + kept + layer_bwd
              + full_logits_terms(draft, dprec, B, T, T, train=True) + grads),
    ]
    return Estimate(stage, resident, phases, [], n, sharding)


def estimate(
    stage: str, settings: dict, shapes: dict[str, ModelShape], num_processes: int = 1, sharding: str = "none"
) -> Estimate:
    """The memory estimate of `stage` with `settings` (a stage config as a mapping; missing keys take the stage's
    defaults) for models `shapes` (role -> ModelShape: policy, and reward / value / reference where used)."""
    if stage not in STAGE_DEFAULTS:
        raise UserError(f"stage: {stage!r} has no memory model; expected one of {', '.join(STAGES)}")
    if sharding not in ("none", "fsdp", "zero3"):
        raise UserError(f"--sharding: {sharding!r}; expected none, fsdp or zero3")
    if num_processes < 1:
        raise UserError(f"--num_processes: {num_processes}; expected 1 or more")
    if "policy" not in shapes:
        raise UserError(f"{stage}: no model; expected model_name_or_path (or model) in the config")
    if stage in ("sft", "reward", "dpo"):
        return _sft_like(stage, settings, shapes, num_processes, sharding)
    if stage in ("rloo", "grpo"):
        if "reward" not in shapes and uses_reward_model(settings):
            raise UserError(f"{stage}: no reward_model; expected a reward model directory in the config")
        return _online(stage, settings, shapes, num_processes, sharding)
    if stage == "ppo":
        if "reward" not in shapes and uses_reward_model(settings):
            raise UserError("ppo: no reward_model; expected a reward model directory in the config")
        return _ppo(settings, shapes, num_processes, sharding)
    if stage == "pairs":
        return _pairs(settings, shapes, num_processes, sharding)
    if stage == "eval":
        return _eval(settings, shapes, num_processes, sharding)
    if stage in ("serve", "generate", "chat"):
        return _inference(stage, settings, shapes, num_processes, sharding)
    if stage == "distill":
        return _distill(settings, shapes, num_processes, sharding)
    return _pretrain(settings, shapes, num_processes, sharding)


# ------------------------------------------------------------------------------------------------------------------
# what would make it fit


def knobs(stage: str, settings: dict, shapes: dict) -> list[tuple[str, dict]]:
    """Changes that lower the estimate, each as (command-line flags, settings overrides), in the order to try."""
    out: list[tuple[str, dict]] = []
    s = {**STAGE_DEFAULTS[stage], **{k: v for k, v in settings.items() if v is not None}}
    if stage in ("sft", "reward", "dpo", "rloo", "grpo"):
        B, acc = int(s["per_device_train_batch_size"]), int(s["gradient_accumulation_steps"])
        if not s.get("gradient_checkpointing"):
            out.append(("--gradient_checkpointing true", {"gradient_checkpointing": True}))
        while B > 1:
            B, acc = max(1, B // 2), acc * 2
            out.append(
                (
                    f"--per_device_train_batch_size {B} --gradient_accumulation_steps {acc}",
                    {"per_device_train_batch_size": B, "gradient_accumulation_steps": acc},
                )
            )
        if not s.get("use_peft"):
            out.append(("--use_peft true", {"use_peft": True}))
        if not s.get("load_in_4bit"):
            out.append(
                (
                    "--use_peft true --load_in_4bit true --load_in_8bit false",
                    {"use_peft": True, "load_in_4bit": True, "load_in_8bit": False},
                )
            )
        if "8bit" not in str(s.get("optim")) and not s.get("use_peft"):
            out.append(("--optim adamw_bnb_8bit", {"optim": "adamw_bnb_8bit"}))
        if stage == "dpo" and int(s.get("per_device_eval_batch_size") or 8) > 1:
            out.append(("--per_device_eval_batch_size 1", {"per_device_eval_batch_size": 1}))
        if stage in ("sft", "reward", "dpo"):
            T = int(s.get("max_length") or 1024)
            if T > 256:
                out.append((f"--max_length {T // 2}", {"max_length": T // 2}))
        else:
            C = int(s["max_completion_length"])
            if C > 64:
                out.append((f"--max_completion_length {C // 2}", {"max_completion_length": C // 2}))
            if not s.get("reward_load_in_8bit"):
                out.append(("--reward_load_in_8bit true", {"reward_load_in_8bit": True}))
    elif stage == "ppo":
        if int(s.get("eval_prompts") or 0) > 0:
            out.append(("--eval_prompts 0", {"eval_prompts": 0}))
        if not s.get("reward_load_in_8bit"):
            out.append(("--reward_load_in_8bit true", {"reward_load_in_8bit": True}))
        R = int(s["rollout_batch_size"])
        mb = int(s["mini_batch_size"])
        while R > 8 and R > mb:
            R //= 2
            out.append((f"--rollout_batch_size {R}", {"rollout_batch_size": R}))
        acc = int(s["gradient_accumulation_steps"])
        while mb // acc > 1 and mb % (acc * 2) == 0:
            acc *= 2
            out.append((f"--gradient_accumulation_steps {acc}", {"gradient_accumulation_steps": acc}))
        if not s.get("load_in_4bit"):
            out.append(
                (
                    "--use_peft true --load_in_4bit true --load_in_8bit false",
                    {"use_peft": True, "load_in_4bit": True, "load_in_8bit": False},
                )
            )
        if int(s["response_length"]) > 64:
            out.append(
                (
                    f"--response_length {int(s['response_length']) // 2}",
                    {"response_length": int(s["response_length"]) // 2},
                )
            )
    elif stage == "pretrain":
        B, acc = int(s["batch_size"]), int(s["grad_accum"])
        while B > 1:
            B, acc = B // 2, acc * 2
            out.append((f"--batch_size {B} --grad_accum {acc}", {"batch_size": B, "grad_accum": acc}))
    elif stage in ("eval", "pairs"):
        key = "batch_size" if stage == "eval" else "num_samples"
        v = int(s[key])
        while v > 1:
            v //= 2
            out.append((f"--{key} {v}", {key: v}))
        if stage == "eval" and not (s.get("load_in_8bit") or s.get("load_in_4bit")):
            out.append(("--load_in_4bit true", {"load_in_4bit": True}))
    return out


def suggestions(
    stage: str,
    settings: dict,
    shapes: dict,
    budget: float,
    num_processes: int = 1,
    sharding: str = "none",
    limit: int = 6,
) -> list[tuple[str, float]]:
    """Settings that bring the estimate under `budget`, as (command-line flags, new peak).

    Knobs are added one at a time in the order of `knobs` (each keeps the previous ones) until the estimate fits;
    then any knob the fit does not need is dropped again. Returns the steps tried; when the last one fits, it is the
    smallest change found."""

    def peak(changes: list[dict]) -> float:
        merged = dict(settings)
        for c in changes:
            merged.update(c)
        return estimate(stage, merged, shapes, num_processes, sharding).peak

    chosen: list[tuple[str, dict]] = []
    out: list[tuple[str, float]] = []
    before = peak([])
    for flag, change in knobs(stage, settings, shapes):
        try:
            now = peak([c for _, c in chosen] + [change])
        except UserError:
            continue
        if now >= before - MiB:
            continue
        # a knob replaces an earlier one on the same keys (halving the batch again)
        chosen = [(f, c) for f, c in chosen if not set(c) & set(change)] + [(flag, change)]
        before = now
        out.append((" ".join(f for f, _ in chosen), now))
        if now <= budget or len(out) >= limit:
            break
    if out and out[-1][1] <= budget:
        for item in list(chosen):
            rest = [x for x in chosen if x is not item]
            if peak([c for _, c in rest]) <= budget:
                chosen = rest
        out.append((" ".join(f for f, _ in chosen), peak([c for _, c in chosen])))
    return out


def verdict(est: Estimate, budget: float, name: str) -> str:
    """'fits' / 'does not fit' on a card of `budget` bytes, with the margin."""
    if est.peak <= budget:
        return f"{name}: fits ({gb(budget - est.peak)} to spare)"
    return f"{name}: does NOT fit (needs {gb(est.peak - budget)} more)"


def render(est: Estimate, title: str = "") -> str:
    """The breakdown as text: resident terms, the peak phase's terms, overhead, the peak; other phases after it."""
    width = 86
    lines = [title] if title else []
    rows = [(t.label, t.bytes) for t in est.resident if t.bytes]
    peak = est.peak_phase
    rows += [(f"[{peak.name}] {t.label}", t.bytes) for t in peak.terms if t.bytes]
    rows += [(t.label, t.bytes) for t in est.overhead]
    for label, b in rows:
        lines.append(f"  {label[:width]:<{width}} {b / GiB:8.2f} GB")
    lines.append(f"  {'peak per process (estimate)':<{width}} {est.peak / GiB:8.2f} GB")
    others = [p for p in est.phases if p is not peak]
    if others:
        lines.append(
            "  other phases (transient, not at the peak): "
            + "; ".join(f"{p.name} {p.bytes / GiB:.2f} GB" for p in others)
        )
    for note in est.notes:
        lines.append(f"  note: {note}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# at the start of a stage


def shapes_for(stage: str, settings: dict, config_of=None) -> dict[str, ModelShape]:
    """The models a stage's settings name (role -> ModelShape: policy, reward, value, reference).

    `config_of(name, where) -> dict` reads a model's config.json (default: model_config; `align memory` also follows
    a recipe back to the stage that will write a model). settings["model_shape"] (config.json numbers) stands for
    the policy of a model that has no directory, e.g. pretraining from a preset."""
    config_of = config_of or model_config

    def shape(key: str) -> ModelShape:
        return shape_from_config(config_of(str(settings[key]), key), f"{key}: {settings[key]}")

    shapes: dict[str, ModelShape] = {}
    key = {"eval": "model", "serve": "model", "generate": "model", "chat": "model", "distill": "target"}.get(stage, "model_name_or_path")
    if isinstance(settings.get("model_shape"), dict):
        shapes["policy"] = shape_from_config(settings["model_shape"], "model_shape")
    elif settings.get(key):
        shapes["policy"] = shape(key)
    else:
        raise UserError(f"{stage}: no {key}; expected the model the stage loads")
    if stage in ("ppo", "rloo", "grpo", "pairs", "eval") and settings.get("reward_model") and uses_reward_model(settings):
        shapes["reward"] = shape("reward_model")
    if stage == "ppo" and settings.get("value_model") not in (None, "", "policy"):
        shapes["value"] = shape("value_model")
    if stage == "eval" and settings.get("reference_model"):
        shapes["reference"] = shape("reference_model")
    if stage == "serve" and settings.get("model2"):
        shapes["second"] = shape("model2")
    if stage in ("serve", "generate", "chat") and settings.get("draft_model"):
        shapes["draft"] = shape("draft_model")
    if stage == "distill":
        if settings.get("init"):
            shapes["draft"] = shape("init")
        else:  # a fresh draft of the target's vocabulary (recipes/distill.py builds a Llama)
            head = int(_get(settings, stage, "hidden_size")) // int(_get(settings, stage, "num_attention_heads"))
            t = shapes["policy"]
            shapes["draft"] = ModelShape("llama", t.vocab_size, int(_get(settings, stage, "hidden_size")),
                                         int(_get(settings, stage, "intermediate_size")), int(_get(settings, stage, "num_hidden_layers")),
                                         int(_get(settings, stage, "num_attention_heads")), int(_get(settings, stage, "num_key_value_heads")),
                                         head, tie_word_embeddings=True, max_position_embeddings=t.max_position_embeddings)
    return shapes


def device_free_bytes() -> int | None:
    """Free memory of this process's CUDA device (None without CUDA)."""
    import torch

    if not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info()[0])


def launch_setup() -> tuple[int, str]:
    """(processes, sharding) of the accelerate / torchrun launch this process belongs to, from its environment."""
    import os

    n = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        return n, "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true") and os.environ.get(
            "ACCELERATE_DEEPSPEED_ZERO_STAGE", "") == "3":
        return n, "zero3"
    return n, "none"


def preflight_here(stage: str, settings: dict) -> None:
    """preflight against this process's device and launch. A model the estimator cannot read (not written yet, an
    architecture it does not model) skips the check: the stage itself then says what is wrong, or runs."""
    free = device_free_bytes()
    if free is None:
        return
    n, sharding = launch_setup()
    try:
        shapes_for(stage, settings)
    except UserError as e:
        print(f"note: memory check skipped ({e})", file=sys.stderr)
        return
    preflight(stage, settings, free, n, sharding)


def preflight(
    stage: str, settings: dict, device_free_bytes: int | None, num_processes: int = 1, sharding: str = "none"
) -> None:
    """Raise a one-line UserError when the stage's estimated peak exceeds the free device memory (None: no check).

    The message gives the estimate, the free memory and the first settings that would fit."""
    if device_free_bytes is None or stage not in STAGE_DEFAULTS:
        return
    shapes = shapes_for(stage, settings)
    est = estimate(stage, settings, shapes, num_processes, sharding)
    if est.peak <= device_free_bytes:
        return
    tips = suggestions(stage, settings, shapes, device_free_bytes, num_processes, sharding)
    fit = [f for f, p in tips if p <= device_free_bytes]
    hint = f"; try {fit[-1]}" if fit else f"; even {tips[-1][0]} needs {gb(tips[-1][1])}" if tips else ""
    raise UserError(
        f"{stage}: estimated peak {gb(est.peak)} exceeds the {gb(device_free_bytes)} free on the device"
        f"{hint} (align memory --config <yaml> shows the breakdown; --skip_memory_check true to run anyway)"
    )
