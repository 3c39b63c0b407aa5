"""Estimate against trace: run a stage's real step on fake tensors and compare its peak with alignment.memory.

    nice -n 15 python -m benchmarks.memory_trace                          # every non-quantized stage YAML in recipes/
    nice -n 15 python -m benchmarks.memory_trace --config recipes/gpu24/ppo.yaml
    nice -n 15 python -m benchmarks.memory_trace --lora_vs_full           # LoRA-DPO vs full DPO, same model and batch

Under `torch._subclasses.fake_tensor.FakeTensorMode` every tensor has a shape, a dtype and a storage size but no
data, so the real transformers model of a full-size config (with peft LoRA where the recipe uses it) runs forward,
backward and the optimizer step on a CPU without allocating memory. `torch.distributed._tools.mem_tracker.MemTracker`
records the live bytes of every storage by category (parameters, gradients, optimizer states, activations,
temporaries) and their peak. Each phase of a stage is traced with all of its resident models alive:

- sft / reward / dpo / rloo / grpo: two optimizer steps of `gradient_accumulation_steps` (at most 2) micro-batches
  through the code path the TRL 1.16 trainer takes: TRL's fused LM head (trl.trainer.utils.add_fused_lm_head),
  gradient checkpointing as transformers enables it, bf16 autocast, fused AdamW;
- ppo: alignment.ppo.forward_response + policy_loss + value_loss on a micro-batch (the loop's own code), the
  no-grad experience forward over the rollout batch, and sampling (prefill + one step per response token);
- pairs / eval: sampling and the scoring forwards;
- pretrain: pretrain.model.Llama under bf16 autocast with fused AdamW.

What differs from a GPU run: the fold kernels of TRL's fused head are Triton kernels on a GPU that keep each tile in
registers; their CPU fallbacks make tile-sized fp32 temporaries, so the trace replaces them (and the fp32-output
matmul) with no-ops that allocate nothing, which is what the GPU path does. Attention runs PyTorch's fused SDPA
kernel on both devices (no T x T scores); the padding mask is materialised per layer on both (on CUDA because
padded batches disable the causal shortcut). bitsandbytes kernels cannot run on fake tensors, so 8-bit and 4-bit
configurations are not traced (docs/memory.md says how their terms are derived). Compares totals without the
CUDA-context / allocator overhead, which a tracer cannot see.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

from alignment import memory as mem
from alignment.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
CATS = {
    "PARAM": "weights",
    "BUFFER": "weights",
    "GRAD": "grads",
    "OPT": "optimizer",
    "ACT": "activations",
    "TEMP": "activations",
    "OTH": "inputs",
}
KIND_CAT = {
    "weights": "weights",
    "lora": "weights",
    "models": "weights",
    "grads": "grads",
    "optimizer": "optimizer",
    "activations": "activations",
    "logits": "activations",
    "kv": "activations",
}


# ------------------------------------------------------------------------------------------------------------------
# fake-tensor plumbing


MODE = None  # the FakeTensorMode of the running trace


class _InPlaceMM:
    """`torch` for trl.kernels.chunked_logprob, except that mm(a, b, out=t) leaves t as it is and allocates
    nothing: on a GPU cuBLAS writes into the strided tile, while a fake tensor's mm(out=) makes the product and
    copies it (a second tile)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def mm(a, b, *, out=None):
        return torch.mm(a, b) if out is None else out


@contextlib.contextmanager
def fake_gpu_like():
    """A FakeTensorMode, with the GPU memory behaviour of TRL's fused head (no tile-sized fp32 temporaries).

    Models are built on the meta device (Module.to() cannot swap fake parameters, which peft needs) and turned
    into fake tensors by `fakeify`."""
    global MODE
    import trl.kernels.chunked_logprob as ck
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved = (ck._forward_tile, ck._backward_tile, ck._addmm_fp32, ck.torch)
    ck.torch = _InPlaceMM()  # cuBLAS writes the tile into its strided slice of the buffer; fake mm(out=) copies
    ck._forward_tile = lambda *a, **k: None  # Triton: folds the tile in registers
    ck._backward_tile = lambda *a, **k: None  # Triton: turns the tile into its gradient in place
    ck._addmm_fp32 = lambda acc, a, b: None  # CUDA: addmm(out_dtype=float32) accumulates without a cast copy
    dropout = torch.nn.functional.dropout
    # CUDA's fused dropout keeps a bool mask; the CPU fallback keeps it as a float tensor
    torch.nn.functional.dropout = lambda x, p=0.5, training=True, inplace=False: (
        torch.native_dropout(x, p, True)[0] if training and 0 < p < 1 else x
    )
    MODE = FakeTensorMode(allow_non_fake_inputs=True)
    try:
        yield MODE
    finally:
        torch.nn.functional.dropout = dropout
        ck._forward_tile, ck._backward_tile, ck._addmm_fp32, ck.torch = saved
        MODE = None


def fakeify(model):
    """Replace the meta parameters and buffers of `model` by fake CPU tensors (tied weights stay tied)."""
    conv = MODE.fake_tensor_converter
    memo: dict[int, torch.Tensor] = {}
    for mod in model.modules():
        for n, p in list(mod._parameters.items()):
            if p is not None:
                if id(p) not in memo:
                    memo[id(p)] = torch.nn.Parameter(
                        conv.from_meta_and_device(MODE, p.data, torch.device("cpu")), requires_grad=p.requires_grad
                    )
                mod._parameters[n] = memo[id(p)]
        for n, b in list(mod._buffers.items()):
            if b is not None:
                memo.setdefault(id(b), conv.from_meta_and_device(MODE, b, torch.device("cpu")))
                mod._buffers[n] = memo[id(b)]
    return model


def meta(make):
    """make() on the meta device."""
    with torch.device("meta"):
        return make()


def hf_config(shape: mem.ModelShape, **extra):
    """A transformers config for a ModelShape (what the model's config.json says)."""
    from transformers import AutoConfig

    kw = dict(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim,
        tie_word_embeddings=shape.tie_word_embeddings,
        max_position_embeddings=shape.max_position_embeddings,
        pad_token_id=0,
        attn_implementation="sdpa",
        **extra,
    )
    if shape.model_type in ("llama", "mistral", "olmo2", "granite"):
        kw.update(attention_bias=shape.o_bias, mlp_bias=shape.mlp_bias)
    return AutoConfig.for_model(shape.model_type, **kw)


def build(shape: mem.ModelShape, dtype: torch.dtype, kind: str = "causal", fake: bool = True):
    """The transformers model of `shape` with fake weights in `dtype` (meta weights with fake=False)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = hf_config(shape, num_labels=1) if kind == "reward" else hf_config(shape)
    cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    return fakeify(model) if fake else model


def dtype_of(name: str, shape: mem.ModelShape) -> torch.dtype:
    if name == "auto":
        name = shape.torch_dtype if shape.torch_dtype in mem.DTYPE_BYTES else "float32"
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def lora_args(s: dict, **fields):
    """A TRL ModelConfig with the LoRA fields alignment.modeling.lora_config reads, from a settings mapping."""
    from alignment.compat import ModelConfig

    dropout = s.get("lora_dropout")
    return ModelConfig(model_name_or_path="x", use_peft=True, lora_r=int(s.get("lora_r") or 16),
                       lora_alpha=int(s.get("lora_alpha") or 32), lora_dropout=float(0.05 if dropout is None else dropout),
                       lora_target_modules=s.get("lora_target_modules"), **fields)


def snapshot(mt) -> dict[str, float]:
    """Peak bytes per category of a MemTracker (summed over devices)."""
    out: dict[str, float] = {}
    for snap in mt.get_tracker_snapshot("peak").values():
        for k, v in snap.items():
            name = getattr(k, "name", k)
            if name == "Total":
                out["total"] = out.get("total", 0.0) + v
            else:
                cat = CATS.get(name, "other")
                out[cat] = out.get(cat, 0.0) + v
    return out


class _NoHook:
    def remove(self) -> None:
        pass


def tracker_class():
    """MemTracker that accepts frozen parameters (it hooks every parameter for its gradient, which a parameter
    without requires_grad refuses): frozen ones are marked as already hooked."""
    from torch.distributed._tools.mem_tracker import MemTracker

    class Tracker(MemTracker):
        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            for p in module.parameters():
                if not p.requires_grad:
                    self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

    return Tracker


def track(*objs):
    """A MemTracker that already counts `objs` (models, optimizers, tensors made before it started)."""
    mt = tracker_class()()
    mt.track_external(*[o for o in objs if o is not None])
    return mt


# ------------------------------------------------------------------------------------------------------------------
# phases


def autocast_ctx(on: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if on else contextlib.nullcontext()


def train_model(stage: str, s: dict, shape: mem.ModelShape, kind: str):
    """The trained model as the stage builds it: dtype, LoRA (peft, via alignment.modeling), checkpointing, head."""
    from trl.trainer.utils import add_fused_lm_head

    from alignment.modeling import add_lora

    model = build(shape, dtype_of(str(mem._get(s, stage, "dtype")), shape), kind, fake=False)
    model.train()
    if kind == "causal" and stage != "ppo":
        outputs = {
            "sft": ("log_probs", "entropy", "is_top1"),
            "dpo": ("log_probs", "entropy", "mean_logits", "is_top1"),
            "rloo": ("log_probs", "entropy"),
            "grpo": ("log_probs", "entropy"),
        }[stage]
        add_fused_lm_head(model, outputs=outputs)
    if s.get("use_peft"):
        model = add_lora(model, lora_args(s), "SEQ_CLS" if kind == "reward" else "CAUSAL_LM")
    if stage != "ppo" and mem._get(s, stage, "gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if s.get("use_peft"):
            model.enable_input_require_grads()
    return fakeify(model)


def trace_trl_train(stage: str, s: dict, shapes: dict) -> dict:
    """Two optimizer steps of (up to 2) micro-batches, as TRL's trainer runs them (+ resident frozen models)."""
    shape = shapes["policy"]
    kind = "reward" if stage == "reward" else "causal"
    B = mem._int(s, stage, "per_device_train_batch_size")
    if stage in ("sft", "reward", "dpo"):
        T = mem._int(s, stage, "max_length") or shape.max_position_embeddings
    else:
        T = (int(s.get("prompt_length") or mem.DEFAULT_PROMPT_LENGTH)) + mem._int(s, stage, "max_completion_length")
    seqs = 2 * B if stage in ("reward", "dpo") else B
    accum = min(2, mem._int(s, stage, "gradient_accumulation_steps"))
    autocast = mem._autocast(s, stage)
    with fake_gpu_like():
        model = train_model(stage, s, shape, kind)
        extra = frozen_models(stage, s, shapes)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        ids = torch.randint(0, shape.vocab_size, (seqs, T))
        att = torch.randint(0, 2, (seqs, T))  # padded batches: transformers builds the (B, 1, T, T) mask
        mt = track(model, opt, ids, att, *extra)
        with mt:
            for _ in range(2):
                for _ in range(accum):
                    mt.reset_mod_stats()
                    with autocast_ctx(autocast):
                        if kind == "reward":
                            out = model(input_ids=ids, attention_mask=att)
                            c, r = out.logits.squeeze(-1).chunk(2)
                            loss = -torch.nn.functional.logsigmoid(c - r).mean()
                        else:
                            out = model(
                                input_ids=ids, attention_mask=att, labels=ids, fused_lm_head=True, use_cache=False
                            )
                            loss = out.loss
                            if stage == "dpo":
                                lp = out.log_probs.sum(1)
                                c, r = lp.chunk(2)
                                loss = -torch.nn.functional.logsigmoid(0.1 * (c - r)).mean()
                    (loss / accum).backward()
                    del out, loss
                opt.step()
                opt.zero_grad(set_to_none=True)
        return snapshot(mt)


def trace_dpo_heldout(s: dict, shapes: dict) -> dict:
    """recipes/dpo.py completion_logps after training: plain forwards of per_device_eval_batch_size sequences whose
    logits are cast to fp32 on the device (the trained model and its optimizer states still alive)."""
    shape = shapes["policy"]
    B = mem._int(s, "dpo", "per_device_eval_batch_size")
    T = mem._int(s, "dpo", "max_length") or shape.max_position_embeddings
    with fake_gpu_like():
        model = train_model("dpo", s, shape, "causal")
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
        for p in params:
            st = opt.state[p]
            st["step"], st["exp_avg"], st["exp_avg_sq"] = torch.tensor(0.0), torch.zeros_like(p), torch.zeros_like(p)
        ids, att = torch.randint(0, shape.vocab_size, (B, T)), torch.randint(0, 2, (B, T))
        model.eval()
        mt = track(model, opt, ids, att)
        with mt, torch.no_grad():
            logits = model(input_ids=ids, attention_mask=att).logits.float()  # (B, T, V), then .cpu() in the stage
            del logits
        return snapshot(mt)


def frozen_models(stage: str, s: dict, shapes: dict) -> list:
    """Models a stage keeps next to the trained one: the reward model (fp32 in alignment.ppo.load_reward_model)."""
    out = []
    if stage in ("ppo", "rloo", "grpo") and "reward" in shapes:
        if s.get("reward_load_in_8bit"):
            raise NotImplementedError("8-bit reward model: bitsandbytes cannot run on fake tensors")
        rm = build(shapes["reward"], torch.float32, "reward").eval().requires_grad_(False)
        out.append(rm)
    return out


def trace_ppo_train(s: dict, shapes: dict) -> dict:
    """alignment/ppo.py train_on for micro-batches of mini_batch_size / gradient_accumulation_steps episodes."""
    from alignment.ppo import ValueHead, forward_response, policy_loss, value_loss

    stage = "ppo"
    shape = shapes["policy"]
    P = int(s.get("prompt_length") or mem.DEFAULT_PROMPT_LENGTH)
    R = mem._int(s, stage, "response_length")
    accum = mem._int(s, stage, "gradient_accumulation_steps")
    micro = max(1, mem._int(s, stage, "mini_batch_size") // accum)
    with fake_gpu_like():
        policy = train_model(stage, s, shape, "causal")
        value = fakeify(meta(lambda: ValueHead(shape.hidden_size)))
        extra = frozen_models(stage, s, shapes)
        params = [p for p in list(policy.parameters()) + list(value.parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5, eps=1e-5, weight_decay=0.0)
        q = torch.randint(0, shape.vocab_size, (micro, P))
        r = torch.randint(0, shape.vocab_size, (micro, R))
        qm, rm_ = torch.randint(0, 2, (micro, P)), torch.randint(0, 2, (micro, R))  # left-padded queries
        old = torch.zeros(micro, R)
        mt = track(policy, value, opt, q, r, qm, rm_, old, *extra)
        with mt:
            for _ in range(2):
                for _ in range(min(2, accum)):
                    mt.reset_mod_stats()
                    lp, v = forward_response(policy, value, q, qm, r, rm_, 1.0)
                    pg = policy_loss(lp, old, old, rm_.float(), 0.2)
                    vf = value_loss(v, old, old, rm_.float(), 0.2)
                    ((pg["loss"] + 0.1 * vf["loss"]) / accum).backward()
                    del lp, v, pg, vf
                opt.step()
                opt.zero_grad(set_to_none=True)
        return snapshot(mt)


def trace_ppo_experience(s: dict, shapes: dict) -> dict:
    """alignment/ppo.py make_experience's forwards over the whole rollout batch (no grad)."""
    from alignment.ppo import ValueHead, forward_response

    stage = "ppo"
    shape = shapes["policy"]
    P = int(s.get("prompt_length") or mem.DEFAULT_PROMPT_LENGTH)
    R = mem._int(s, stage, "response_length")
    B = mem._int(s, stage, "rollout_batch_size")
    with fake_gpu_like():
        policy = train_model(stage, s, shape, "causal")
        value = fakeify(meta(lambda: ValueHead(shape.hidden_size)))
        extra = frozen_models(stage, s, shapes)
        params = [p for p in list(policy.parameters()) + list(value.parameters()) if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-5)
        for p in params:  # optimizer states exist from the second update on
            st = opt.state[p]
            st["step"], st["exp_avg"], st["exp_avg_sq"] = torch.tensor(0.0), torch.zeros_like(p), torch.zeros_like(p)
        q, r = torch.randint(0, shape.vocab_size, (B, P)), torch.randint(0, shape.vocab_size, (B, R))
        qm, rm_ = torch.randint(0, 2, (B, P)), torch.randint(0, 2, (B, R))
        mt = track(policy, value, opt, q, r, qm, rm_, *extra)
        with mt, torch.no_grad():
            policy.eval()
            forward_response(policy, value, q, qm, r, rm_, 1.0)
        return snapshot(mt)


def trace_generation(model, B: int, P: int, R: int, extra=(), resident=(), padded: bool = True) -> dict:
    """Prefill B x P tokens (left-padded: with an attention mask), then R one-token steps with transformers'
    DynamicCache, as generate does."""
    with torch.no_grad():
        ids = torch.randint(0, model.config.vocab_size, (B, P))
        att = torch.randint(0, 2, (B, P)) if padded else None
        mt = track(model, ids, att, *extra, *resident)
        with mt:
            out = model(input_ids=ids, attention_mask=att, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
            for _ in range(R):
                mt.reset_mod_stats()
                nxt = torch.softmax(out.logits[:, -1].float(), -1).argmax(-1, keepdim=True)  # (B, 1)
                if att is not None:
                    att = torch.cat([att, torch.ones(B, 1, dtype=att.dtype)], 1)
                out = model(input_ids=nxt, attention_mask=att, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
        return snapshot(mt)


def trace_scoring(model, B: int, T: int, extra=(), full_head: bool = False) -> dict:
    """A no-grad forward of B x T tokens (reward scores; or, full_head, log-softmax at every position as
    evals/scoring.py does for perplexity)."""
    with torch.no_grad():
        ids = torch.randint(0, model.config.vocab_size, (B, T))
        mt = track(model, ids, *extra)
        with mt:
            if full_head:
                hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # (B, T, H)
                picked = hidden.reshape(B * T, -1)[torch.arange(B * T)]  # (B*T, H): every position is scored
                lp = torch.log_softmax(model.get_output_embeddings()(picked).float(), -1)  # (B*T, V)
                del lp
            elif hasattr(model, "get_decoder") and not hasattr(model, "score"):
                model.get_decoder()(
                    input_ids=ids, use_cache=False
                )  # multiple choice: the head runs at a few positions only
            else:
                model(input_ids=ids, attention_mask=torch.randint(0, 2, (B, T)))  # reward scores of padded batches
        return snapshot(mt)


def trace_pretrain(s: dict, shapes: dict) -> dict:
    """pretrain/train.py's step: fp32 Llama, bf16 autocast (CUDA's default), fused AdamW, cross-entropy."""
    from pretrain.model import Llama, LlamaShape

    shape = shapes["policy"]
    B, T = mem._int(s, "pretrain", "batch_size"), mem._int(s, "pretrain", "seq_len")
    accum = min(2, mem._int(s, "pretrain", "grad_accum"))
    autocast = str(mem._get(s, "pretrain", "dtype")) in ("auto", "bfloat16")
    ls = LlamaShape(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        max_position_embeddings=shape.max_position_embeddings,
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    with fake_gpu_like():
        model = fakeify(meta(lambda: Llama(ls)))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
        x = torch.randint(0, shape.vocab_size, (B, T))
        mt = track(model, opt, x)
        with mt:
            for _ in range(2):
                for _ in range(accum):
                    mt.reset_mod_stats()
                    with autocast_ctx(autocast):
                        _, loss = model(x, x)
                    (loss / accum).backward()
                    del loss
                opt.step()
                opt.zero_grad(set_to_none=True)
        return snapshot(mt)


def trace_stage(stage: str, s: dict, shapes: dict) -> dict[str, dict]:
    """phase name -> traced peak by category, for every phase of the stage we can trace."""
    out = {}
    if stage in ("sft", "reward", "dpo"):
        out["train"] = trace_trl_train(stage, s, shapes)
        if stage == "dpo":
            out["heldout"] = trace_dpo_heldout(s, shapes)
    elif stage in ("rloo", "grpo"):
        out["train"] = trace_trl_train(stage, s, shapes)
        P = int(s.get("prompt_length") or mem.DEFAULT_PROMPT_LENGTH)
        steps = s.get("steps_per_generation") or mem._int(s, stage, "gradient_accumulation_steps")
        G = int(s.get("generation_batch_size") or mem._int(s, stage, "per_device_train_batch_size") * int(steps))
        with fake_gpu_like():
            model = train_model(stage, s, shapes["policy"], "causal")
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
            for p in params:
                st = opt.state[p]
                st["step"], st["exp_avg"], st["exp_avg_sq"] = (
                    torch.tensor(0.0),
                    torch.zeros_like(p),
                    torch.zeros_like(p),
                )
            model.eval()
            out["generation"] = trace_generation(
                model, G, P, mem._int(s, stage, "max_completion_length"), frozen_models(stage, s, shapes), (opt,)
            )
    elif stage == "ppo":
        out["train"] = trace_ppo_train(s, shapes)
        out["experience"] = trace_ppo_experience(s, shapes)
    elif stage == "pretrain":
        out["train"] = trace_pretrain(s, shapes)
    elif stage in ("pairs", "eval"):
        shape = shapes["policy"]
        P = int(s.get("prompt_length") or (mem.DEFAULT_PROMPT_LENGTH if stage == "pairs" else 2048))
        P = min(P, shape.max_position_embeddings)
        with fake_gpu_like():
            model = build(shape, dtype_of("auto", shape)).eval()
            extra = []
            if "reward" in shapes:
                extra.append(build(shapes["reward"], torch.float32, "reward").eval())
            if "reference" in shapes:
                extra.append(build(shapes["reference"], dtype_of("auto", shapes["reference"])).eval())
            rm = next((m for m in extra if hasattr(m, "score")), None)
            others = [model] + [m for m in extra if m is not rm]
            if stage == "pairs":
                out["generation"] = trace_generation(
                    model,
                    mem._int(s, stage, "num_samples"),
                    P,
                    mem._int(s, stage, "max_new_tokens"),
                    extra,
                    padded=False,
                )
                if rm is not None:  # alignment.modeling.reward_scores: padded batches, no use_cache=False
                    R = mem._int(s, stage, "max_new_tokens")
                    out["reward"] = trace_scoring(rm, mem._int(s, stage, "batch_size"), P + R, others)
            else:
                tasks = mem._get(s, stage, "tasks")
                tasks = [t.strip() for x in ([tasks] if isinstance(tasks, str) else tasks) for t in str(x).split(",")]
                B = mem._int(s, stage, "batch_size")
                if "perplexity" in tasks:
                    out["perplexity"] = trace_scoring(model, B, P, extra, full_head=True)
                if "mmlu" in tasks:
                    out["mmlu"] = trace_scoring(model, B, P, extra)
                if "winrate" in tasks:
                    out["winrate"] = trace_generation(
                        model,
                        mem._int(s, stage, "num_samples"),
                        P,
                        mem._int(s, stage, "max_new_tokens"),
                        extra,
                        padded=False,
                    )
                if rm is not None and {"preference", "winrate"} & set(tasks):
                    out["reward"] = trace_scoring(rm, B, P, others)
    return out


# ------------------------------------------------------------------------------------------------------------------
# quantized configurations: small real runs on the CPU (bitsandbytes runs there, not on fake tensors)


def small_shape(shape: mem.ModelShape) -> mem.ModelShape:
    """The same architecture at a size a CPU trains in minutes (4 layers, hidden 512, vocabulary 8192)."""
    from dataclasses import replace

    return replace(
        shape,
        vocab_size=8192,
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        torch_dtype="bfloat16",
    )


QUANTIZED_PROBES = (
    ("sft", "load_in_4bit", False),
    ("sft", "load_in_8bit", False),
    ("reward", "load_in_4bit", False),
    ("sft", "load_in_4bit", True),
)


def quantized_probes() -> list[dict]:
    """Real two-step runs of 8/4-bit LoRA configurations of the gpu recipes' Qwen2.5 architecture, scaled down so the
    layers' activations (not the fused head's tile) dominate: 4 sequences x 256 tokens, LoRA r=16 with dropout."""
    rows = []
    shape = small_shape(mem.model_shape("Qwen/Qwen2.5-3B"))
    for stage, quant, ckpt in QUANTIZED_PROBES:
        s = {
            "dtype": "bfloat16",
            quant: True,
            "use_peft": True,
            "lora_dropout": 0.05,
            "gradient_checkpointing": ckpt,
            "per_device_train_batch_size": 4,
        }
        t0 = time.time()
        snap, est = run_quantized_small(stage, s, shape, T=256)
        name = f"{stage} {'4-bit NF4' if quant == 'load_in_4bit' else '8-bit'} LoRA{', checkpointing' if ckpt else ''}"
        rows.append(
            {
                "config": f"{name} (Qwen2.5 shape, 4 layers, hidden 512; real CPU run)",
                "stage": stage,
                "estimate": est.allocated,
                "by_kind": est.by_kind(),
                "traced": snap["total"],
                "traced_by_cat": snap,
                "traced_phase": "train",
                "ratio": est.allocated / snap["total"],
                "seconds": time.time() - t0,
            }
        )
        print(f"{name}: measured {fmt(snap['total'])} GB, estimate {fmt(est.allocated)} GB", file=sys.stderr)
    return rows


def run_quantized_small(stage: str, s: dict, shape: mem.ModelShape, T: int = 128) -> tuple[dict, mem.Estimate]:
    """Load a random model of `shape` through the stage loader (alignment.modeling.load_model: 8/4-bit with
    bitsandbytes, prepare_model_for_kbit_training, LoRA), run two real optimizer steps on the CPU under bf16 autocast
    and trace their tensors; returns (traced peak by category, the estimate of the same run)."""
    import tempfile
    from types import SimpleNamespace

    import trl.kernels.chunked_logprob as ck
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl.trainer.utils import add_fused_lm_head

    from alignment.modeling import add_lora, load_model

    kind = "reward" if stage == "reward" else "causal"
    s = {**s, "max_length": T}
    with tempfile.TemporaryDirectory() as tmp:
        cls = AutoModelForSequenceClassification if kind == "reward" else AutoModelForCausalLM
        cls.from_config(
            hf_config(shape, num_labels=1) if kind == "reward" else hf_config(shape), dtype=torch.bfloat16
        ).save_pretrained(tmp)
        margs = lora_args(s, dtype=str(mem._get(s, stage, "dtype")), load_in_8bit=bool(s.get("load_in_8bit")),
                          load_in_4bit=bool(s.get("load_in_4bit")), bnb_4bit_quant_type="nf4",
                          attn_implementation="sdpa")
        ckpt = bool(mem._get(s, stage, "gradient_checkpointing"))
        model = load_model(tmp, margs, kind, SimpleNamespace(pad_token_id=0), training=True, gradient_checkpointing=ckpt)
    if kind == "causal":
        add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
    model = add_lora(model, margs, "SEQ_CLS" if kind == "reward" else "CAUSAL_LM")
    for p in model.parameters():  # TRL casts QLoRA adapters to bf16
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.train()
    B = mem._int(s, stage, "per_device_train_batch_size")
    seqs = 2 * B if stage in ("reward", "dpo") else B
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, shape.vocab_size, (seqs, T))
    att = torch.ones(seqs, T, dtype=torch.long)
    att[:, -1] = 0  # a padded batch: transformers builds the (B, 1, T, T) mask
    saved = (ck._forward_tile, ck._backward_tile, ck._addmm_fp32, ck.torch)
    ck.torch, ck._forward_tile, ck._backward_tile = _InPlaceMM(), (lambda *a, **k: None), (lambda *a, **k: None)
    ck._addmm_fp32 = lambda acc, a, b: None
    try:
        mt = track(model, opt, ids, att)
        with mt:
            for _ in range(2):
                mt.reset_mod_stats()
                with autocast_ctx(True):
                    if kind == "reward":
                        c, r = model(input_ids=ids, attention_mask=att).logits.squeeze(-1).chunk(2)
                        loss = -torch.nn.functional.logsigmoid(c - r).mean()
                    else:
                        loss = model(
                            input_ids=ids, attention_mask=att, labels=ids, fused_lm_head=True, use_cache=False
                        ).loss
                loss.backward()
                del loss
                opt.step()
                opt.zero_grad(set_to_none=True)
    finally:
        ck._forward_tile, ck._backward_tile, ck._addmm_fp32, ck.torch = saved
    est = mem.estimate(stage, {**s, "gradient_accumulation_steps": 1}, {"policy": shape})
    return snapshot(mt), est


# ------------------------------------------------------------------------------------------------------------------
# comparison


def quantized(stage: str, s: dict) -> bool:
    return bool(s.get("load_in_8bit") or s.get("load_in_4bit") or s.get("reward_load_in_8bit"))


def compare(config: Path, overrides: dict | None = None, stage: str | None = None) -> dict | None:
    """Estimate and trace one stage YAML; returns the row of the table (None for CPU-only stages)."""
    from recipes import memory as cmd

    args = cmd.parse_args(
        ["--config", str(config)]
        + (["--stage", stage] if stage else [])
        + [x for k, v in (overrides or {}).items() for x in (f"--{k}", str(v))]
    )
    if args.stage not in mem.STAGES:
        return None
    shapes = cmd.shapes_for(args.stage, args.settings, args.config)
    est = mem.estimate(args.stage, args.settings, shapes)
    row = {
        "config": str(config.relative_to(ROOT) if config.is_absolute() else config),
        "stage": args.stage,
        "estimate": est.allocated,
        "by_kind": est.by_kind(),
        "peak_phase": est.peak_phase.name,
    }
    if quantized(args.stage, args.settings):
        row["traced"] = None  # bitsandbytes cannot run on fake tensors; see quantized_probes()
        return row
    t0 = time.time()
    traced = trace_stage(args.stage, args.settings, shapes)
    phase, snap = max(traced.items(), key=lambda kv: kv[1].get("total", 0.0))
    row.update(
        traced=snap["total"],
        traced_phase=phase,
        traced_by_cat=snap,
        seconds=time.time() - t0,
        ratio=est.allocated / snap["total"],
    )
    return row


def estimate_by_cat(by_kind: dict) -> dict:
    out: dict[str, float] = {}
    for k, v in by_kind.items():
        c = KIND_CAT.get(k, "other")
        out[c] = out.get(c, 0.0) + v
    return out


def fmt(n: float | None) -> str:
    return "--" if n is None else f"{n / mem.GiB:.3f}" if n < 10 * mem.GiB else f"{n / mem.GiB:.2f}"


def table(rows: list[dict]) -> str:
    """Markdown: per configuration the estimate, the traced peak, their ratio, and the activation share."""
    lines = [
        (
            "| configuration | stage | estimate (GB) | traced peak (GB) | estimate / trace "
            "| weights+states est / traced | activations est / traced | traced phase |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("traced") is None:
            lines.append(f"| {r['config']} | {r['stage']} | {fmt(r['estimate'])} | 8/4-bit: not traced | | | | |")
            continue
        e, t = estimate_by_cat(r["by_kind"]), r["traced_by_cat"]
        st_e = e.get("weights", 0) + e.get("grads", 0) + e.get("optimizer", 0)
        st_t = t.get("weights", 0) + t.get("grads", 0) + t.get("optimizer", 0)
        act_t = t.get("activations", 0) + t.get("inputs", 0)
        lines.append(
            f"| {r['config']} | {r['stage']} | {fmt(r['estimate'])} | {fmt(r['traced'])} | {r['ratio']:.3f} | "
            f"{fmt(st_e)} / {fmt(st_t)} | {fmt(e.get('activations', 0))} / {fmt(act_t)} | {r['traced_phase']} |"
        )
    return "\n".join(lines)


def recipe_configs() -> list[Path]:
    """Every stage YAML under recipes/ (GPU-only or CPU stages are skipped later)."""
    return sorted(p for p in (ROOT / "recipes").rglob("*.yaml") if p.parent.name != "accelerate")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", action="append", help="stage YAML(s); default: every one under recipes/")
    ap.add_argument("--lora_vs_full", action="store_true", help="peak of LoRA-DPO against full DPO (same model, batch)")
    ap.add_argument("--quantized", action="store_true", help="small real CPU runs of 8/4-bit LoRA configurations")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.lora_vs_full:
        lora_vs_full()
        return
    if a.quantized:
        print(table(quantized_probes()))
        return
    from recipes import memory as cmd

    rows = []
    for path in [Path(c) for c in a.config] if a.config else recipe_configs():
        stage = cmd.stage_from_header(path)
        if stage not in mem.STAGES:
            continue
        # recipes/mmlu scores a model the user names (--model); a shipped hub config stands in for it
        over = {"model": "Qwen/Qwen2.5-1.5B"} if path.parent.name == "mmlu" else None
        try:
            row = compare(path, over)
        except (NotImplementedError, UserError) as e:
            print(f"{path}: skipped ({e})", file=sys.stderr)
            continue
        if row is None:
            continue
        rows.append(row)
        msg = f"ratio {row['ratio']:.3f} ({row['seconds']:.0f}s)" if row.get("traced") else "not traced"
        print(
            f"{row['config']}: estimate {fmt(row['estimate'])} GB, traced {fmt(row.get('traced'))} GB, {msg}",
            file=sys.stderr,
        )
    print(table(rows))


def lora_vs_full() -> None:
    """Traced peak of DPO with LoRA against full DPO on the same model (Qwen2.5-0.5B, bf16) and batch."""
    base = ROOT / "recipes" / "gpu16" / "dpo.yaml"
    common = {
        "model_name_or_path": "Qwen/Qwen2.5-0.5B",
        "dtype": "bfloat16",
        "load_in_8bit": False,
        "load_in_4bit": False,
        "per_device_train_batch_size": 2,
        "max_length": 1024,
        "gradient_checkpointing": True,
        "gradient_accumulation_steps": 1,
        "optim": "adamw_torch_fused",
    }
    rows = []
    for name, extra in (("full DPO", {"use_peft": False}), ("LoRA DPO (r=16)", {"use_peft": True})):
        row = compare(base, {**common, **extra}, stage="dpo")
        row["config"] = f"{name}: Qwen2.5-0.5B bf16, 2 pairs x 1024 tokens"
        rows.append(row)
        print(f"{name}: traced {fmt(row['traced'])} GB, estimate {fmt(row['estimate'])} GB", file=sys.stderr)
    print(table(rows))
    print(f"\nLoRA / full traced peak: {rows[1]['traced'] / rows[0]['traced']:.3f}")


if __name__ == "__main__":
    main()
