"""Export the from-scratch model as a Hugging Face Llama directory and import one back; write GGUF for llama.cpp.

    align export --tokenizer runs/tiny/tokenizer --preset tiny --output_dir runs/tiny/init
    align export --tokenizer runs/tiny/tokenizer --checkpoint runs/tiny/pretrain/ckpt/step_000500.pt --output_dir out
    align export --format gguf --model_dir runs/tiny/dpo/merged --gguf_type q8_0 --output_dir runs/tiny/gguf

Because `pretrain/model.py` uses Hugging Face's parameter names, export is a state-dict save plus a `LlamaConfig`:
config.json, model.safetensors, generation_config.json and the tokenizer files. transformers, peft, trl, lm-eval
and vLLM load the result as they load any Llama.

`--format gguf` writes one `model-<gguf_type>.gguf` (and config.yaml) into output_dir with llama.cpp's own writer
(the `gguf` package: pip install 'align-suite[gguf]'), from a checkpoint, a fresh init, or any `LlamaForCausalLM`
directory (`--model_dir`, e.g. a stage's merged/ output) whose tokenizer is a byte-level BPE. Differences from the
Hugging Face layout, all of them what llama.cpp's Llama loader expects:
- tensor names: `token_embd`, `blk.N.attn_q`, ..., `output_norm`, `output` (absent when tied: llama.cpp then reuses
  `token_embd`);
- q_proj and k_proj rows are reordered within each head from HF's half-split rotary layout (pairs i, i + hs/2) to
  interleaved pairs (2i, 2i + 1), the layout of llama.cpp's Llama rotary embedding (`rope_interleave`);
- norms stay f32; with q8_0 a matrix whose rows are not a multiple of 32 values stays f16 (llama.cpp's converter
  does the same);
- the tokenizer is `tokenizer.ggml.model = gpt2` with `tokenizer.ggml.pre` naming llama.cpp's pre-tokenizer that
  splits text as ours does (digits one by one, then GPT-2's regex: "smollm"); special tokens are CONTROL tokens;
  the chat template's `{% generation %}` training markers become `{% if true %}` (same text, any Jinja engine).
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from alignment.config import parse_config, save_config
from alignment.errors import UserError, exit_on_user_error
from alignment.io import atomic_dir, check_output_dir
from pretrain.model import Llama, shape_from_hf_config, shape_from_preset, to_hf_config


def special_ids(tokenizer) -> dict:
    """bos/eos/pad ids for config.json, and the stop ids (end of text, end of turn) for generation."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    stop = [tokenizer.eos_token_id] + ([im_end] if isinstance(im_end, int) and im_end != tokenizer.unk_token_id else [])
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id, "stop": stop}


def save_hf(model: Llama, tokenizer, out_dir: str | Path) -> None:
    """Write config.json, model.safetensors, generation_config.json and the tokenizer files into out_dir."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if len(tokenizer) > model.shape.vocab_size:
        raise UserError(f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is {model.shape.vocab_size}")
    ids = special_ids(tokenizer)
    hf_config = to_hf_config(model.shape, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"], pad_token_id=ids["pad_token_id"])
    hf_config.architectures = ["LlamaForCausalLM"]
    hf_config.dtype = "float32"
    hf_config.save_pretrained(out)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.shape.tie_word_embeddings:
        state.pop("lm_head.weight")  # HF re-ties it from embed_tokens
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    GenerationConfig(bos_token_id=ids["bos_token_id"], eos_token_id=ids["stop"], pad_token_id=ids["pad_token_id"],
                     do_sample=True, temperature=0.8, top_k=50, max_new_tokens=128).save_pretrained(out)
    tokenizer.save_pretrained(out)
    tc_path = out / "tokenizer_config.json"
    if tc_path.exists():  # keep the loader-neutral class name (see pretrain/tokenizer.py)
        tc = json.loads(tc_path.read_text())
        tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")


def load_hf(model_dir: str | Path, map_location="cpu") -> Llama:
    """Build our Llama from a Hugging Face Llama directory (config.json + safetensors)."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise UserError(f"{d}: no config.json; expected a Hugging Face model directory")
    try:
        shape = shape_from_hf_config(json.loads((d / "config.json").read_text()))
    except ValueError as e:
        raise UserError(f"{d / 'config.json'}: {e}") from None
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise UserError(f"{d}: no *.safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f), device=str(map_location)))
    if shape.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model = Llama(shape)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
    if missing or unexpected:
        raise UserError(f"{d}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


GGUF_TYPES = ("f32", "f16", "q8_0")

# Hugging Face parameter names -> llama.cpp's tensor names for the Llama architecture (gguf.TENSOR_NAMES).
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
GGUF_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}

# tokenizer.ggml.pre values -> the tokenizer.json pre_tokenizer steps that split text the same way (llama.cpp's
# regex lists are in its src/llama-vocab.cpp). "gpt-2" is GPT-2's regex alone; "smollm" first splits off every
# digit (\p{N}), then applies GPT-2's regex: tokenizers' Digits(individual_digits=True) + ByteLevel(use_regex=True),
# our tokenizer's pre-tokenizer. smollm also decodes without llama.cpp's clean-up of spaces before punctuation, as
# our clean_up_tokenization_spaces=False does.
_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
GGUF_PRE_TOKENIZERS = {
    "gpt-2": [_BYTE_LEVEL],
    "smollm": [{"type": "Digits", "individual_digits": True}, _BYTE_LEVEL],
}


def gguf_tensor_name(hf_name: str) -> str:
    """llama.cpp's name of a Hugging Face Llama parameter: model.layers.3.mlp.up_proj.weight -> blk.3.ffn_up.weight."""
    if hf_name in GGUF_NAMES:
        return GGUF_NAMES[hf_name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    if m and m.group(2) in GGUF_BLOCK_NAMES:
        return f"blk.{m.group(1)}.{GGUF_BLOCK_NAMES[m.group(2)]}"
    raise KeyError(f"no GGUF name for parameter {hf_name}")


def rope_interleave(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder q_proj/k_proj rows (n_heads * hs, C) within each head from HF's rotary layout, which rotates pairs
    (i, i + hs/2), to llama.cpp's, which rotates adjacent pairs (2i, 2i + 1): new row 2i + r = old row r * hs/2 + i."""
    rows, C = w.shape
    hs = rows // n_heads
    return w.reshape(n_heads, 2, hs // 2, C).transpose(1, 2).reshape(rows, C)  # (nh, 2, hs/2, C) -> (nh, hs/2, 2, C)


def gguf_pre_tokenizer(tok_json: dict) -> str:
    """The `tokenizer.ggml.pre` under which llama.cpp splits text as this tokenizer.json does; UserError if none."""
    model = tok_json.get("model") or {}
    unsupported = ("byte_fallback", "continuing_subword_prefix", "end_of_word_suffix")
    if model.get("type") != "BPE" or any(model.get(k) for k in unsupported):
        raise UserError(f"tokenizer: model {model.get('type')!r} (byte_fallback={model.get('byte_fallback')}) is not "
                        "supported for GGUF; expected a byte-level BPE tokenizer (GPT-2 style tokenizer.json)")
    if tok_json.get("normalizer"):
        raise UserError(f"tokenizer: normalizer {tok_json['normalizer'].get('type')!r} is not supported for GGUF; "
                        "expected none (llama.cpp's BPE tokenizer does not normalize)")
    pre = tok_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    for name, expected in GGUF_PRE_TOKENIZERS.items():
        if len(steps) == len(expected) and all(s.get(k) == v for s, e in zip(steps, expected) for k, v in e.items()):
            return name
    raise UserError(f"tokenizer: pre-tokenizer {json.dumps(pre)} has no llama.cpp equivalent known to the exporter; "
                    "expected ByteLevel(use_regex) alone or after Digits(individual_digits)")


def gguf_chat_template(template: str) -> str:
    """The chat template with `{% generation %}` ... `{% endgeneration %}` (a transformers-only tag that marks the
    assistant's tokens for training; other Jinja engines reject it) as `{% if true %}` ... `{% endif %}`, whitespace
    control kept, so every engine renders the same text."""
    template = re.sub(r"\{%(-?)\s*generation\s*(-?)%\}", r"{%\1 if true \2%}", template)
    return re.sub(r"\{%(-?)\s*endgeneration\s*(-?)%\}", r"{%\1 endif \2%}", template)


def gguf_vocab(tokenizer, vocab_size: int) -> dict:
    """Tokens (byte-level strings, padded to vocab_size), token types, merges and pre-tokenizer of a fast tokenizer."""
    import gguf

    tok_json = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = gguf_pre_tokenizer(tok_json)
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise UserError(f"tokenizer has token id {max(vocab.values())} but the model's vocab_size is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]  # rows of the embedding no token uses
    types = [gguf.TokenType.UNUSED] * vocab_size
    for text, i in vocab.items():
        tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for i, added in tokenizer.added_tokens_decoder.items():
        types[i] = gguf.TokenType.CONTROL if added.special else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    return {"pre": pre, "tokens": tokens, "types": types, "merges": merges}


def save_gguf(model: Llama, tokenizer, path: str | Path, gguf_type: str = "f16", name: str = "llama") -> dict:
    """Write model and tokenizer as one llama.cpp GGUF file; returns {ggml type name: tensor count}."""
    import gguf
    from tqdm.auto import tqdm

    s = model.shape
    vocab = gguf_vocab(tokenizer, s.vocab_size)
    ids = special_ids(tokenizer)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    matrix_type = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16,
                   "q8_0": gguf.GGMLQuantizationType.Q8_0}[gguf_type]

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(s.vocab_size)
    w.add_context_length(s.max_position_embeddings)
    w.add_embedding_length(s.hidden_size)
    w.add_block_count(s.num_hidden_layers)
    w.add_feed_forward_length(s.intermediate_size)
    w.add_head_count(s.num_attention_heads)
    w.add_head_count_kv(s.num_key_value_heads)
    w.add_key_length(s.head_dim)
    w.add_value_length(s.head_dim)
    w.add_rope_dimension_count(s.head_dim)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.rms_norm_eps)

    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab["pre"])
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["types"])
    w.add_token_merges(vocab["merges"])
    for key, tid in (("bos", ids["bos_token_id"]), ("eos", ids["eos_token_id"]), ("pad", ids["pad_token_id"])):
        if tid is not None:
            getattr(w, f"add_{key}_token_id")(tid)
    end_of_turn = [t for t in ids["stop"] if t != ids["eos_token_id"]]
    if end_of_turn:  # <|im_end|>: llama.cpp stops generating at it, as generation_config.json's eos list does
        w.add_eot_token_id(end_of_turn[0])
    # add bos/eos exactly when the Hugging Face tokenizer does (ours adds neither)
    plain, full = tokenizer("a", add_special_tokens=False).input_ids, tokenizer("a").input_ids
    w.add_add_bos_token(len(full) > len(plain) and full[0] == tokenizer.bos_token_id)
    w.add_add_eos_token(len(full) > len(plain) and full[-1] == tokenizer.eos_token_id)
    if tokenizer.chat_template:
        w.add_chat_template(gguf_chat_template(tokenizer.chat_template))

    counts: dict[str, int] = {}
    state = model.state_dict()
    if s.tie_word_embeddings:
        state.pop("lm_head.weight")  # llama.cpp reuses token_embd when there is no output tensor
    for hf_name, t in tqdm(state.items(), desc="gguf", disable=None, mininterval=2):
        t = t.detach().to("cpu", torch.float32)
        if hf_name.endswith("q_proj.weight"):
            t = rope_interleave(t, s.num_attention_heads)
        elif hf_name.endswith("k_proj.weight"):
            t = rope_interleave(t, s.num_key_value_heads)
        qtype = gguf.GGMLQuantizationType.F32 if t.dim() == 1 else matrix_type
        if qtype == gguf.GGMLQuantizationType.Q8_0 and t.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16  # Q8_0 blocks are 32 values of one row
        w.add_tensor(gguf_tensor_name(hf_name), gguf.quants.quantize(t.numpy(), qtype), raw_dtype=qtype)
        counts[qtype.name] = counts.get(qtype.name, 0) + 1
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return counts


def load_llama_dir(model_dir: str | Path):
    """Load a `LlamaForCausalLM` directory (weights as our Llama, and its tokenizer) for GGUF export."""
    from transformers import AutoTokenizer

    d = Path(model_dir)
    if not d.is_dir():
        raise UserError(f"model_dir: {d} is not a directory; expected a Hugging Face LlamaForCausalLM directory")
    if not (d / "config.json").is_file() and (d / "adapter_config.json").is_file():
        raise UserError(f"{d}: a LoRA adapter, not a model; expected the merged model (the stage's merged/ output)")
    if not (d / "config.json").is_file():
        raise UserError(f"{d}: no config.json; expected a Hugging Face LlamaForCausalLM directory")
    try:
        hf = json.loads((d / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{d / 'config.json'}: not valid JSON ({e})") from None
    archs = hf.get("architectures") or ["LlamaForCausalLM"]
    if hf.get("model_type") != "llama" or "LlamaForCausalLM" not in archs:
        raise UserError(f"{d / 'config.json'}: model_type {hf.get('model_type')!r}, architectures {archs}; "
                        "expected model_type 'llama' and LlamaForCausalLM")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}  # transformers 5 / 4 spelling
    if rope.get("rope_type", rope.get("type")) not in (None, "default"):
        raise UserError(f"{d / 'config.json'}: rotary scaling {rope.get('rope_type', rope.get('type'))!r} is not "
                        "supported by the GGUF export; expected the default rotary embedding")
    if not (d / "tokenizer.json").is_file():
        raise UserError(f"{d}: no tokenizer.json; expected the model's tokenizer files beside its weights")
    return load_hf(d), AutoTokenizer.from_pretrained(d)


@dataclass
class ExportConfig:
    """Export a checkpoint, a fresh seeded initialization, or (GGUF) a Llama directory, with its tokenizer."""

    tokenizer: str = field(default="runs/tiny/tokenizer", metadata={"help": "Tokenizer directory (from `align tokenizer`)."})
    output_dir: str = field(default="runs/tiny/init", metadata={"help": "Output directory (HF files or the GGUF)."})
    format: str = field(default="hf", metadata={"help": "hf (Hugging Face directory) or gguf (llama.cpp file)."})
    gguf_type: str = field(default="f16", metadata={"help": "GGUF weights: f32, f16 or q8_0."})
    model_dir: str | None = field(default=None, metadata={"help": "LlamaForCausalLM directory to convert to GGUF."})
    checkpoint: str | None = field(default=None, metadata={"help": "A pretraining checkpoint (.pt with 'model' and 'shape'); none = fresh init."})
    preset: str = field(default="tiny", metadata={"help": "Size preset for a fresh init: test, tiny, 10m, 125m, 1b."})
    max_position_embeddings: int | None = field(default=None, metadata={"help": "Context length (default: the preset's)."})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "Share input embedding and output head."})
    seed: int = field(default=0, metadata={"help": "Seed of a fresh initialization."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output directory."})


def fresh_or_checkpoint(cfg: ExportConfig, vocab_size: int) -> Llama:
    """The checkpoint's model, or a seeded fresh initialization of the preset."""
    if cfg.checkpoint:
        from pretrain.checkpoint import load_model_checkpoint

        return load_model_checkpoint(cfg.checkpoint)
    torch.manual_seed(cfg.seed)
    overrides = {"tie_word_embeddings": cfg.tie_word_embeddings}
    if cfg.max_position_embeddings:
        overrides["max_position_embeddings"] = cfg.max_position_embeddings
    try:
        return Llama(shape_from_preset(cfg.preset, vocab_size, **overrides))
    except ValueError as e:
        raise UserError(f"preset: {e}") from None


def main(cfg: ExportConfig) -> Path:
    """Load the tokenizer and the weights, write the HF directory (or the GGUF file) atomically, return its path."""
    from transformers import AutoTokenizer

    t0 = time.time()
    if cfg.format not in ("hf", "gguf"):
        raise UserError(f"format: {cfg.format!r}; expected hf or gguf")
    if cfg.format == "gguf" and cfg.gguf_type not in GGUF_TYPES:
        raise UserError(f"gguf_type: {cfg.gguf_type!r}; expected one of {', '.join(GGUF_TYPES)}")
    if cfg.model_dir and cfg.format != "gguf":
        raise UserError("model_dir: only with --format gguf (a Hugging Face directory is already the hf format)")
    if cfg.model_dir and cfg.checkpoint:
        raise UserError("model_dir and checkpoint: give one of them")
    check_output_dir(cfg.output_dir, cfg.overwrite)
    if cfg.format == "gguf":
        try:
            import gguf  # noqa: F401
        except ImportError:
            raise UserError("format gguf: the gguf package is not installed; pip install 'align-suite[gguf]'") from None
    if cfg.model_dir:
        model, tokenizer = load_llama_dir(cfg.model_dir)
    else:
        if not Path(cfg.tokenizer, "tokenizer.json").is_file():
            raise UserError(f"{cfg.tokenizer}: no tokenizer.json; expected a tokenizer directory from "
                            "`align tokenizer`")
        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
        model = fresh_or_checkpoint(cfg, len(tokenizer))
    if cfg.format == "gguf":
        gguf_vocab(tokenizer, model.shape.vocab_size)  # refuse an unsupported tokenizer before writing anything
        name = Path(cfg.model_dir or cfg.checkpoint or cfg.preset).name
        with atomic_dir(cfg.output_dir, cfg.overwrite, stage="export") as tmp:
            counts = save_gguf(model, tokenizer, tmp / f"model-{cfg.gguf_type}.gguf", cfg.gguf_type, name=name)
            save_config(tmp, cfg)
        out = Path(cfg.output_dir) / f"model-{cfg.gguf_type}.gguf"
        types = ", ".join(f"{n} {k.lower()}" for k, n in sorted(counts.items()))
        print(f"export: {model.num_parameters() / 1e6:.2f}M parameters ({model.shape.num_hidden_layers} layers) "
              f"-> {out} ({types} tensors, {out.stat().st_size / 1e6:.1f} MB) in {time.time() - t0:.1f}s")
        return out
    with atomic_dir(cfg.output_dir, cfg.overwrite, stage="export") as tmp:
        save_hf(model, tokenizer, tmp)
        save_config(tmp, cfg)
    print(f"export: {model.num_parameters() / 1e6:.2f}M parameters ({asdict(model.shape)['num_hidden_layers']} layers) "
          f"-> {cfg.output_dir} in {time.time() - t0:.1f}s")
    return Path(cfg.output_dir)


@exit_on_user_error
def cli(argv=None) -> None:
    (cfg,) = parse_config([ExportConfig], argv)
    main(cfg)


if __name__ == "__main__":
    cli()
