"""Train a draft model for speculative decoding: a small model that predicts what a given target model would say.

    align distill --config recipes/tiny/distill.yaml
    align distill --target runs/spec/target --init runs/spec/draft \\
        --corpus ../shared/data/pretrain/tinyshakespeare.txt --raw_prompts 256 --output_dir runs/spec/draft_distilled

A draft pays off when the target keeps most of its tokens (the acceptance rate), so it is trained on what the target
does rather than on the raw text alone:
- the target's own outputs: it answers `prompts_file` (chat prompts, through its chat template) and/or continues
  `raw_prompts` prefixes of the corpus, `samples_per_prompt` times at `sample_temperature` (sequence-level
  distillation). For an aligned target (SFT, DPO, PPO) these carry its style, which the base model's text does not;
- its logits: KL(target || draft) at every position of those outputs and of windows of `corpus` text (`loss: kl`),
  or cross-entropy on the target's sampled tokens (`loss: ce`), or both (`loss: kl+ce`).

The draft starts from `init` (a small model with the same tokenizer, e.g. one `align pretrain` made) or, without it,
from a fresh Llama of the given shape with the target's vocabulary and context. Batches mix target outputs and corpus
windows (`sample_fraction` of each batch from the outputs). Held-out outputs measure the draft's top-1 agreement with
the target (about the greedy acceptance rate per drafted token) and the KL, before and after training.

Writes output_dir as a plain Hugging Face model directory (the draft: config.json, model.safetensors, tokenizer,
generation_config.json with the target's stop ids) plus summary.json, metrics.jsonl and config.yaml, atomically.
Use it with `align generate --draft_model output_dir` or `align chat --draft_model output_dir`.
"""

from __future__ import annotations

import json
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from alignment.config import parse_config, save_config
from alignment.errors import UserError, exit_on_user_error

LOSSES = ("kl", "ce", "kl+ce")


@dataclass
class DistillConfig:
    """`align distill`: the target, the draft's start, the data and the training schedule."""

    target: str = field(default="runs/tiny/dpo/merged", metadata={"help": "The model the draft will serve (a Hugging "
                                                                          "Face directory)."})
    output_dir: str = field(default="runs/tiny/distill", metadata={"help": "Where the draft model directory is "
                                                                           "written."})
    init: str | None = field(default=None, metadata={"help": "A small model with the target's tokenizer to start from "
                                                             "(none = fresh Llama)."})
    hidden_size: int = field(default=64, metadata={"help": "Fresh draft: hidden size.",
                                                   "range": (2, None, True, True, ())})
    num_hidden_layers: int = field(default=1, metadata={"help": "Fresh draft: layers.",
                                                        "range": (1, None, True, True, ())})
    intermediate_size: int = field(default=176, metadata={"help": "Fresh draft: MLP size.",
                                                          "range": (1, None, True, True, ())})
    num_attention_heads: int = field(default=4, metadata={"help": "Fresh draft: query heads.",
                                                          "range": (1, None, True, True, ())})
    num_key_value_heads: int = field(default=2, metadata={"help": "Fresh draft: key/value heads.",
                                                          "range": (1, None, True, True, ())})
    prompts_file: str | None = field(default=None, metadata={"help": "Chat prompts the target answers (rows with "
                                                                     "'prompt' / 'messages', or .txt)."})
    max_prompts: int = field(default=0, metadata={"help": "Use at most this many prompts of the file (0 = all).",
                                                  "range": (0, None, True, True, ())})
    corpus: list[str] = field(default_factory=list, metadata={"help": "Text files, globs or directories: KL windows "
                                                                      "and raw prompts."})
    txt_split: str = field(default="paragraph", metadata={"help": "Documents of a .txt file: file, paragraph, line, or "
                                                                  "a separator line."})
    raw_prompts: int = field(default=0, metadata={"help": "Corpus prefixes the target continues as plain text (base "
                                                          "targets).",
                                                  "range": (0, None, True, True, ())})
    prefix_tokens: int = field(default=24, metadata={"help": "Length of those prefixes in tokens.",
                                                     "range": (1, None, True, True, ())})
    samples_per_prompt: int = field(default=1, metadata={"help": "Target outputs per prompt.",
                                                         "range": (1, None, True, True, ())})
    sample_tokens: int = field(default=64, metadata={"help": "Most tokens per target output.",
                                                     "range": (1, None, True, True, ())})
    sample_temperature: float = field(default=1.0, metadata={"help": "Temperature of the target's outputs (0 = "
                                                                     "greedy)."})
    loss: str = field(default="kl", metadata={
        "help": f"One of {', '.join(LOSSES)}: KL to the target's logits, cross-entropy on its tokens, both."})
    kl_temperature: float = field(default=1.0, metadata={"help": "Soften both distributions by this in the KL (scaled "
                                                                 "back by its square).",
                                                         "range": (0, None, False, True, ())})
    sample_fraction: float = field(default=0.5, metadata={"help": "Share of each batch taken from the target's outputs "
                                                                  "when there is corpus "
                                                                  "text too.", "range": (0, 1, True, True, ())})
    seq_len: int = field(default=128, metadata={"help": "Longest training sequence in tokens."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per step."})
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps.", "range": (1, None, True, True, ())})
    lr: float = field(default=3e-3, metadata={"help": "Peak learning rate (AdamW)."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "Final learning rate as a fraction of lr."})
    warmup_steps: int = field(default=20, metadata={"help": "Linear warmup steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay on matrices."})
    eval_fraction: float = field(default=0.1, metadata={"help": "Share of the target's outputs held out to measure "
                                                                "agreement."})
    cpu_threads: int = field(default=0, metadata={"help": "torch threads on CPU (0 = torch's default)."})
    seed: int = field(default=0, metadata={"help": "Seed of the fresh draft, the target's samples and the batch order.",
                                           })
    overwrite: bool = field(default=False, metadata={"help": "Replace a finished output_dir (one the suite wrote)."})


def check_config(cfg: DistillConfig) -> None:
    """Refuse settings that cannot train before anything is read or loaded."""
    if cfg.loss not in LOSSES:
        raise UserError(f"loss: {cfg.loss!r}; expected one of {', '.join(LOSSES)}")
    if not (cfg.prompts_file or cfg.corpus):
        raise UserError("data: no prompts_file and no corpus; expected at least one")
    if cfg.raw_prompts and not cfg.corpus:
        raise UserError(f"raw_prompts: {cfg.raw_prompts} needs corpus text to take prefixes from; "
                        "expected corpus files")
    if cfg.loss != "kl" and not (cfg.prompts_file or cfg.raw_prompts):
        raise UserError(f"loss: {cfg.loss} trains on the target's sampled tokens; expected prompts_file or raw_prompts")
    if cfg.samples_per_prompt > 1 and cfg.sample_temperature == 0:
        raise UserError(f"samples_per_prompt: {cfg.samples_per_prompt} with greedy outputs (sample_temperature 0) "
                        "would repeat one output; expected sample_temperature > 0")
    if cfg.prefix_tokens >= cfg.seq_len:
        raise UserError(f"prefix_tokens: {cfg.prefix_tokens}; expected fewer than seq_len ({cfg.seq_len})")


def draft_shape(cfg: DistillConfig, target_config):
    """The fresh draft's LlamaShape: the configured size with the target's vocabulary and context (checked)."""
    from alignment.modeling import context_length
    from pretrain.model import LlamaShape

    shape = LlamaShape(vocab_size=target_config.get_text_config().vocab_size, hidden_size=cfg.hidden_size,
                       intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                       num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_key_value_heads,
                       max_position_embeddings=context_length(target_config))
    try:
        shape.validate()
    except ValueError as e:
        raise UserError(f"draft shape: {e}") from None
    return shape


def fresh_draft(shape, tokenizer, seed: int):
    """A new Llama of `shape` (transformers' initialization, seeded) with the tokenizer's special token ids."""
    from transformers import LlamaForCausalLM

    from pretrain.export import special_ids
    from pretrain.model import to_hf_config

    ids = special_ids(tokenizer)
    config = to_hf_config(shape, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
                          pad_token_id=ids["pad_token_id"])
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def corpus_windows(cfg: DistillConfig, tokenizer, needed: int) -> list[list[int]]:
    """Up to `needed` windows of seq_len tokens cut from the corpus documents (end-of-text between documents)."""
    from alignment.data import iter_documents
    from alignment.tokens import encode_document

    windows, buf = [], []
    for doc in iter_documents(cfg.corpus, txt_split=cfg.txt_split, key="corpus"):
        buf += encode_document(tokenizer, doc)
        while len(buf) >= cfg.seq_len and len(windows) < needed:
            windows.append(buf[: cfg.seq_len])
            buf = buf[cfg.seq_len:]
        if len(windows) >= needed:
            break
    if buf and len(windows) < needed and len(buf) > cfg.prefix_tokens:
        windows.append(buf)
    if not windows:
        raise UserError(f"corpus: {cfg.corpus}: no text; expected documents")
    return windows


def pad_batch(seqs: list[dict], pad: int) -> dict:
    """Right-pad sequences into (B, T) ids, attention mask and cross-entropy label mask."""
    T = max(len(s["ids"]) for s in seqs)
    ids = torch.full((len(seqs), T), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    ce = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s["ids"])
        ids[i, :n] = torch.tensor(s["ids"])
        att[i, :n] = 1
        ce[i, :n] = torch.tensor(s["ce"])
    return {"ids": ids, "att": att, "ce": ce}


def distill_losses(t_logits: torch.Tensor, s_logits: torch.Tensor, batch: dict, tau: float) -> dict:
    """KL(target || draft) per real position (softened by tau, times tau^2) and cross-entropy of the draft on the
    target's own tokens (positions whose next token the target produced). Logits (B, T, V); returns scalar tensors."""
    att = batch["att"].float()  # (B, T)
    log_t = F.log_softmax(t_logits / tau, -1)
    log_s = F.log_softmax(s_logits / tau, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, T)
    kl = (kl * att).sum() / att.sum() * tau**2
    target_next = batch["ce"][:, 1:].float()  # (B, T-1): 1 where token t+1 is the target's output
    if target_next.sum() > 0:
        nll = F.cross_entropy(s_logits[:, :-1].transpose(1, 2), batch["ids"][:, 1:], reduction="none")  # (B, T-1)
        ce = (nll * target_next).sum() / target_next.sum()
    else:
        ce = torch.zeros(())
    return {"kl": kl, "ce": ce}


@torch.no_grad()
def agreement(target, draft, seqs: list[dict], pad: int, device, batch_size: int = 16) -> dict:
    """On held-out sequences: the share of the target's own tokens where the draft's argmax equals the target's (about
    the greedy acceptance rate per drafted token), and the mean KL(target || draft) over all positions."""
    hits = total = 0
    kl_sum = kl_n = 0.0
    draft.eval()
    for i in range(0, len(seqs), batch_size):
        b = {k: v.to(device) for k, v in pad_batch(seqs[i: i + batch_size], pad).items()}
        t = target(input_ids=b["ids"], attention_mask=b["att"]).logits.float()
        s = draft(input_ids=b["ids"], attention_mask=b["att"]).logits.float()
        pos = b["ce"][:, 1:].bool()  # positions predicting a target-produced token
        if not pos.any():  # corpus windows only: every real position counts
            pos = b["att"][:, 1:].bool()
        hits += int((t[:, :-1].argmax(-1) == s[:, :-1].argmax(-1))[pos].sum())
        total += int(pos.sum())
        losses = distill_losses(t, s, b, 1.0)
        n = float(b["att"].sum())
        kl_sum += float(losses["kl"]) * n
        kl_n += n
    return {"top1_agreement": hits / max(total, 1), "kl": kl_sum / max(kl_n, 1.0)}


def acceptance(target, draft, held_out: list[dict], cfg: DistillConfig, tokenizer, n_prompts: int = 8) -> float | None:
    """The acceptance rate of greedy speculative decoding with one draft token per target pass (the probability that
    the target keeps a drafted token, whatever the draft length) on the prompts of up to `n_prompts` held-out target
    outputs. None without held-out outputs."""
    from alignment.sampling import SamplingParams, SpeculativeStats, speculative_decode, stop_token_ids

    if not held_out:
        return None
    stats = SpeculativeStats()
    params = SamplingParams(max_new_tokens=min(cfg.sample_tokens, cfg.seq_len - 1), temperature=0)
    for s in held_out[:n_prompts]:
        speculative_decode(target, draft, s["prompt"], params, stop_token_ids(tokenizer, target), 1, stats=stats)
    return round(stats.acceptance_rate, 4)


def main(cfg: DistillConfig) -> dict:
    """Validate, sample the target's outputs, train the draft on them (and on corpus windows), write it."""
    from tqdm.auto import tqdm

    from alignment.data import expand_paths, read_prompt_rows
    from alignment.io import atomic_dir, check_output_dir
    from alignment.modeling import (check_model_dir, context_length, count_parameters, default_device, load_config,
                                    load_model, load_tokenizer, local_model_dir, same_tokenizer)
    from alignment.sampling import SamplingParams, generate
    from alignment.tokens import encode_prompt
    from pretrain.train import lr_at

    t0 = time.time()
    # -- validate everything before loading a model or writing anything
    check_config(cfg)
    check_output_dir(cfg.output_dir, cfg.overwrite)
    check_model_dir(cfg.target, "target")
    tconfig = load_config(cfg.target, "target")
    tok = load_tokenizer(cfg.target)
    context = context_length(tconfig)
    if cfg.seq_len > context:
        raise UserError(f"seq_len: {cfg.seq_len} is longer than the target's context of {context} tokens")
    shape = None if cfg.init else draft_shape(cfg, tconfig)
    if cfg.init:
        check_model_dir(cfg.init, "init")
        if not same_tokenizer(tok, load_tokenizer(cfg.init)):
            raise UserError(f"init: {cfg.init}: its tokenizer differs from the target's ({cfg.target}); "
                            "expected the same tokenizer")
        iv, tv = load_config(cfg.init, "init").get_text_config().vocab_size, tconfig.get_text_config().vocab_size
        if iv != tv:
            raise UserError(f"init: {cfg.init}: vocab_size {iv} differs from the target's {tv}; "
                            "expected the same vocabulary")
        if context_length(load_config(cfg.init, "init")) < cfg.seq_len:
            raise UserError(f"seq_len: {cfg.seq_len} is longer than the init model's context")
    prompts = []
    if cfg.prompts_file:
        for r in read_prompt_rows(cfg.prompts_file, cfg.max_prompts or None):
            ids = encode_prompt(tok, r.data["prompt"])
            prompts.append(ids[-(cfg.seq_len - min(cfg.sample_tokens, cfg.seq_len // 2)):])
    if cfg.corpus:
        expand_paths(cfg.corpus, key="corpus")
    if cfg.cpu_threads and not torch.cuda.is_available():
        torch.set_num_threads(cfg.cpu_threads)
    rng = random.Random(cfg.seed)
    n_windows = cfg.max_steps * cfg.batch_size + cfg.raw_prompts + 64 if cfg.corpus else 0
    windows = corpus_windows(cfg, tok, n_windows) if cfg.corpus else []
    rng.shuffle(windows)
    raw = [w[: cfg.prefix_tokens] for w in windows[: cfg.raw_prompts]]
    windows = windows[cfg.raw_prompts:] if cfg.raw_prompts < len(windows) else windows

    # -- models
    device = default_device()
    target = load_model(cfg.target, tokenizer=tok, device=device, dtype="float32")
    if cfg.init:
        draft = load_model(cfg.init, tokenizer=tok, training=True, device=device, dtype="float32")
    else:
        draft = fresh_draft(shape, tok, cfg.seed).to(device)
    draft.train().requires_grad_(True)
    _, n_draft = count_parameters(draft)
    _, n_target = count_parameters(target)

    # -- the target's own outputs: chat answers and raw continuations
    samples: list[dict] = []
    budget = min(cfg.sample_tokens, cfg.seq_len - 1)
    params = SamplingParams(max_new_tokens=budget, temperature=cfg.sample_temperature,
                            num_return_sequences=cfg.samples_per_prompt, seed=cfg.seed)
    for source, plist in (("prompts", prompts), ("raw", raw)):
        if not plist:
            continue
        outs = generate(target, tok, plist, params, batch_size=16, progress=True, desc=f"target outputs ({source})")
        for p, group in zip(plist, outs):
            for c in group:
                ids = (p + c.token_ids)[-cfg.seq_len:]
                n_out = min(len(c.token_ids), len(ids))
                samples.append({"ids": ids, "ce": [0] * (len(ids) - n_out) + [1] * n_out, "prompt": p})
    rng.shuffle(samples)
    n_eval = int(len(samples) * cfg.eval_fraction) if len(samples) >= 10 else 0
    eval_samples, train_samples = samples[:n_eval], samples[n_eval:]
    train_windows = [{"ids": w, "ce": [0] * len(w)} for w in windows]
    eval_set = eval_samples or train_windows[-64:]
    if not eval_samples:  # no target outputs to hold out: held-out corpus windows measure agreement instead
        train_windows = train_windows[:-64] or train_windows
    if cfg.loss != "kl" and not train_samples:
        raise UserError("loss: ce needs target outputs to train on; got none (raise max_prompts or raw_prompts)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    before = agreement(target, draft, eval_set, pad, device)
    before["acceptance"] = acceptance(target, draft, eval_samples, cfg, tok)

    # -- train: batches mix the target's outputs and corpus windows
    if not train_windows:
        n_from_samples = cfg.batch_size
    else:
        n_from_samples = max(1, round(cfg.batch_size * cfg.sample_fraction)) if train_samples else 0
    pools = {"samples": (train_samples, n_from_samples), "windows": (train_windows, cfg.batch_size - n_from_samples)}
    cursors = {k: len(v[0]) for k, v in pools.items()}

    def take(name: str, n: int) -> list[dict]:
        pool = pools[name][0]
        out = []
        for _ in range(n):
            if cursors[name] >= len(pool):  # a new epoch over this pool, in a new seeded order
                rng.shuffle(pool)
                cursors[name] = 0
            out.append(pool[cursors[name]])
            cursors[name] += 1
        return out

    decay = [p for p in draft.parameters() if p.dim() >= 2]
    no_decay = [p for p in draft.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    use_kl, use_ce = "kl" in cfg.loss, "ce" in cfg.loss
    draft.train()
    metrics = []
    bar = tqdm(range(cfg.max_steps), desc="distill", leave=False)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        batch = pad_batch(take("samples", pools["samples"][1]) + take("windows", pools["windows"][1]), pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            t_logits = target(input_ids=batch["ids"], attention_mask=batch["att"]).logits.float()
        s_logits = draft(input_ids=batch["ids"], attention_mask=batch["att"]).logits.float()
        losses = distill_losses(t_logits, s_logits, batch, cfg.kl_temperature)
        loss = (losses["kl"] if use_kl else 0) + (losses["ce"] if use_ce else 0)
        if not torch.isfinite(loss):
            raise UserError(f"distill: the loss became {float(loss)} at step {step}; expected a finite loss (lower lr)")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        metrics.append({"step": step + 1, "loss": float(loss), "kl": float(losses["kl"]), "ce": float(losses["ce"]),
                        "lr": lr_at(step, cfg)})
        bar.set_postfix(loss=f"{float(loss):.3f}")
    bar.close()
    draft.eval()
    after = agreement(target, draft, eval_set, pad, device)
    after["acceptance"] = acceptance(target, draft, eval_samples, cfg, tok)

    summary = {
        "target": cfg.target, "target_parameters": n_target, "draft_parameters": n_draft,
        "parameter_ratio": round(n_target / n_draft, 2), "init": cfg.init or "fresh",
        "target_outputs": len(samples), "held_out": "target outputs" if eval_samples else "corpus windows",
        "held_out_sequences": len(eval_set),
        "corpus_windows": len(train_windows), "loss": cfg.loss, "steps": cfg.max_steps,
        "top1_agreement_before": round(before["top1_agreement"], 4),
        "top1_agreement_after": round(after["top1_agreement"], 4),
        "kl_before": float(f"{before['kl']:.4g}"), "kl_after": float(f"{after['kl']:.4g}"),
        "greedy_acceptance_before": before["acceptance"], "greedy_acceptance_after": after["acceptance"],
        "seconds": round(time.time() - t0, 1),
    }
    with atomic_dir(cfg.output_dir, cfg.overwrite, stage="distill") as tmp:
        draft.config.pad_token_id = pad
        draft.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        src_gen = local_model_dir(cfg.target) / "generation_config.json"
        if src_gen.is_file():  # the target's stop ids (end of text, end of turn)
            shutil.copy(src_gen, tmp / "generation_config.json")
        (tmp / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        save_config(tmp, cfg)
    accept = (f", greedy acceptance {before['acceptance']:.3f} -> {after['acceptance']:.3f}"
              if after["acceptance"] is not None else "")
    print(f"distill: draft {n_draft / 1e6:.2f}M parameters for target {n_target / 1e6:.2f}M "
          f"({summary['parameter_ratio']}x), "
          f"{len(samples)} target outputs + {len(train_windows)} corpus windows, {cfg.max_steps} steps: top-1 "
          f"agreement {summary['top1_agreement_before']:.3f} -> {summary['top1_agreement_after']:.3f}, KL "
          f"{summary['kl_before']:.3f} -> {summary['kl_after']:.3f} on held-out {summary['held_out']}{accept}; "
          f"-> {cfg.output_dir} in {summary['seconds']:.0f}s", file=sys.stderr)
    return summary


@exit_on_user_error
def cli(argv=None) -> None:
    (cfg,) = parse_config([DistillConfig], argv)
    main(cfg)


if __name__ == "__main__":
    cli()
