"""A Llama-architecture decoder, written from scratch and readable top to bottom.

RMSNorm -> grouped-query attention with rotary embeddings -> SwiGLU MLP, pre-norm residual blocks.
Parameter names are exactly Hugging Face's `LlamaForCausalLM` names, so exporting is a plain
state-dict save plus a `LlamaConfig` (see pretrain/export.py), and importing is the reverse.

Shapes: B batch, T sequence length, C hidden size, nh query heads, nkv key/value heads, hs head size.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class LlamaShape:
    """The architecture hyper-parameters; names follow `transformers.LlamaConfig`."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    max_position_embeddings: int = 512
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise ValueError when the shape cannot build a model."""
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head size {self.head_dim} must be even for rotary embeddings")


# Size presets. Parameter counts (tied embeddings, vocab as given) are printed by `python -m pretrain.model`.
PRESETS: dict[str, dict] = {
    # a few hundred thousand parameters: unit tests
    "test": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256),
    # ~2M non-embedding: the tiny demo recipe on CPU
    "tiny": dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=6,
                 num_key_value_heads=2, max_position_embeddings=512),
    # ~10M: CPU runs on real text
    "10m": dict(hidden_size=320, intermediate_size=864, num_hidden_layers=6, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=1024),
    # GPT-2-small-like ~125M with a 32k vocabulary
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=4, max_position_embeddings=2048),
    # ~1B (TinyLlama shape)
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, max_position_embeddings=2048),
}


def shape_from_preset(name: str, vocab_size: int, **overrides) -> LlamaShape:
    """Build a LlamaShape from a preset name, a vocabulary size and field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    shape = LlamaShape(vocab_size=vocab_size, **{**PRESETS[name], **overrides})
    shape.validate()
    return shape


class RMSNorm(nn.Module):
    """Root-mean-square norm: x / rms(x) * weight, computed in fp32 like Llama."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cache(shape: LlamaShape, T: int, device, dtype=torch.float32):
    """cos and sin tables for positions 0..T-1, each (T, hs), in HF's half-rotation layout."""
    hs = shape.head_dim
    inv_freq = 1.0 / (shape.rope_theta ** (torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs))  # (hs/2,)
    t = torch.arange(T, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)  # (T, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """Rotate pairs (i, i + hs/2) of x (B, h, T, hs) by position-dependent angles."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.nh, self.nkv, self.hs = s.num_attention_heads, s.num_key_value_heads, s.head_dim
        self.q_proj = nn.Linear(s.hidden_size, self.nh * self.hs, bias=False)
        self.k_proj = nn.Linear(s.hidden_size, self.nkv * self.hs, bias=False)
        self.v_proj = nn.Linear(s.hidden_size, self.nkv * self.hs, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hs, s.hidden_size, bias=False)

    def forward(self, x, cos, sin, attn_mask=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hs).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.nkv, self.hs).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # grouped-query attention: each key/value head serves nh/nkv query heads
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=attn_mask,
            is_causal=attn_mask is None,
            enable_gqa=self.nkv != self.nh,
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).reshape(B, T, self.nh * self.hs)  # (B, T, C)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, s: LlamaShape):
        super().__init__()
        self.gate_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.up_proj = nn.Linear(s.hidden_size, s.intermediate_size, bias=False)
        self.down_proj = nn.Linear(s.intermediate_size, s.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, s: LlamaShape):
        super().__init__()
        self.input_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.hidden_size, s.rms_norm_eps)
        self.mlp = MLP(s)

    def forward(self, x, cos, sin, attn_mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attn_mask)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class LlamaTrunk(nn.Module):
    """Embeddings, blocks and final norm: HF's `LlamaModel` (the `model.` prefix)."""

    def __init__(self, s: LlamaShape):
        super().__init__()
        self.embed_tokens = nn.Embedding(s.vocab_size, s.hidden_size)
        self.layers = nn.ModuleList(Block(s) for _ in range(s.num_hidden_layers))
        self.norm = RMSNorm(s.hidden_size, s.rms_norm_eps)


class Llama(nn.Module):
    """Decoder-only language model. forward(idx (B, T)) -> logits (B, T, V) [, loss]."""

    def __init__(self, shape: LlamaShape):
        super().__init__()
        shape.validate()
        self.shape = shape
        self.model = LlamaTrunk(shape)
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if shape.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) for every matrix; residual output projections scaled by 1/sqrt(2 * n_layers)
        so the residual stream's variance does not grow with depth (GPT-2 paper, sec. 2.3)."""
        std = self.shape.initializer_range
        for name, p in self.named_parameters():
            if p.dim() == 2:
                scale = 1.0 / math.sqrt(2 * self.shape.num_hidden_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 1.0
                nn.init.normal_(p, mean=0.0, std=std * scale)
            else:  # RMSNorm gains
                nn.init.ones_(p)

    def forward(self, idx, targets=None, attention_mask=None):
        """idx (B, T) token ids; targets (B, T) with -100 ignored; attention_mask (B, T) 1 = real token.

        With an attention_mask (left or right padding) positions count real tokens only, as in HF."""
        B, T = idx.shape
        if T > self.shape.max_position_embeddings:
            raise ValueError(f"sequence length {T} exceeds max_position_embeddings {self.shape.max_position_embeddings}")
        x = self.model.embed_tokens(idx)  # (B, T, C)
        mask = None
        if attention_mask is None:
            cos, sin = rope_cache(self.shape, T, idx.device, x.dtype)  # (T, hs)
        else:
            pos = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)
            cos_t, sin_t = rope_cache(self.shape, self.shape.max_position_embeddings, idx.device, x.dtype)
            cos, sin = cos_t[pos].unsqueeze(1), sin_t[pos].unsqueeze(1)  # (B, 1, T, hs)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()  # (T, T)
            mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
            mask = mask | torch.eye(T, dtype=torch.bool, device=idx.device)  # padded rows attend to themselves, not NaN
        for block in self.model.layers:
            x = block(x, cos, sin, mask)
        x = self.model.norm(x)
        logits = self.lm_head(x)  # (B, T, V)
        if targets is None:
            return logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def num_parameters(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tied weights counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.model.embed_tokens.weight.numel()
            if not self.shape.tie_word_embeddings:
                n -= self.lm_head.weight.numel()
        return n

    def flops_per_token(self, T: int) -> float:
        """Training FLOPs per token (6N plus attention, PaLM appendix B) for the MFU estimate."""
        s = self.shape
        return 6 * self.num_parameters(non_embedding=True) + 12 * s.num_hidden_layers * s.hidden_size * T

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, eos_token_id=None):
        """Sample continuations of idx (B, T) without a KV cache (short samples during training)."""
        for _ in range(max_new_tokens):
            ctx = idx[:, -self.shape.max_position_embeddings:]
            logits = self(ctx)[:, -1, :]  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
                    logits[logits < v[:, [-1]]] = -float("inf")
                nxt = torch.multinomial(F.softmax(logits, dim=-1), 1)  # (B, 1)
            idx = torch.cat((idx, nxt), dim=1)
            if eos_token_id is not None and idx.size(0) == 1 and nxt.item() == eos_token_id:
                break
        return idx


def to_hf_config(shape: LlamaShape, **token_ids):
    """The `transformers.LlamaConfig` describing this shape (token ids: bos/eos/pad_token_id)."""
    from transformers import LlamaConfig

    kw = {f.name: getattr(shape, f.name) for f in fields(shape)}
    return LlamaConfig(**kw, head_dim=shape.head_dim, attention_bias=False, mlp_bias=False, hidden_act="silu", **token_ids)


def shape_from_hf_config(cfg) -> LlamaShape:
    """Read a LlamaShape back from a `LlamaConfig` (or its dict); rejects features we do not implement."""
    d = cfg if isinstance(cfg, dict) else cfg.to_dict()
    if d.get("model_type") not in (None, "llama"):
        raise ValueError(f"model_type {d.get('model_type')!r} is not 'llama'")
    rope_scaling = d.get("rope_parameters") or d.get("rope_scaling")  # transformers 5 / 4 spelling
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default"):
        raise ValueError(f"rope_scaling {rope_scaling} is not supported by the from-scratch model")
    if d.get("attention_bias") or d.get("mlp_bias"):
        raise ValueError("attention_bias/mlp_bias are not supported by the from-scratch model")
    theta = d.get("rope_theta") or (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    kw = {f.name: d[f.name] for f in fields(LlamaShape) if f.name in d and d[f.name] is not None}
    kw["rope_theta"] = float(theta)
    shape = LlamaShape(**kw)
    if d.get("head_dim") not in (None, shape.head_dim):
        raise ValueError(f"head_dim {d['head_dim']} differs from hidden_size/num_attention_heads = {shape.head_dim}")
    return shape


if __name__ == "__main__":
    for name in PRESETS:
        for vocab in (4096, 32768):
            m = Llama(shape_from_preset(name, vocab)) if name in ("test", "tiny", "10m") or vocab == 32768 else None
            if m is not None:
                print(f"{name:5s} vocab={vocab:6d} params={m.num_parameters() / 1e6:8.2f}M "
                      f"non-embedding={m.num_parameters(True) / 1e6:8.2f}M  {asdict(m.shape)}")
