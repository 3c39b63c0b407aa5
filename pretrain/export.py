"""Export the from-scratch model as a plain Hugging Face Llama directory, and import one back.

    align export --tokenizer runs/tiny/tokenizer --preset tiny --output_dir runs/tiny/init
    align export --tokenizer runs/tiny/tokenizer --checkpoint runs/tiny/pretrain/ckpt/step_000500.pt --output_dir out

Because `pretrain/model.py` uses Hugging Face's parameter names, export is a state-dict save plus a `LlamaConfig`:
config.json, model.safetensors, generation_config.json and the tokenizer files. transformers, peft, trl, lm-eval
and vLLM load the result as they load any Llama.
"""

from __future__ import annotations

import json
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


@dataclass
class ExportConfig:
    """Export a checkpoint (or a fresh, seeded initialization) with its tokenizer as a Hugging Face directory."""

    tokenizer: str = field(default="runs/tiny/tokenizer", metadata={"help": "Tokenizer directory (from `align tokenizer`)."})
    output_dir: str = field(default="runs/tiny/init", metadata={"help": "Where the Hugging Face directory is written."})
    checkpoint: str | None = field(default=None, metadata={"help": "A pretraining checkpoint (.pt with 'model' and 'shape'); none = fresh init."})
    preset: str = field(default="tiny", metadata={"help": "Size preset for a fresh init: test, tiny, 10m, 125m, 1b."})
    max_position_embeddings: int | None = field(default=None, metadata={"help": "Context length (default: the preset's)."})
    tie_word_embeddings: bool = field(default=True, metadata={"help": "Share input embedding and output head."})
    seed: int = field(default=0, metadata={"help": "Seed of a fresh initialization."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output directory."})


def main(cfg: ExportConfig) -> Path:
    """Load the tokenizer and the weights, write the HF directory atomically, return its path."""
    from transformers import AutoTokenizer

    t0 = time.time()
    check_output_dir(cfg.output_dir, cfg.overwrite)
    if not Path(cfg.tokenizer, "tokenizer.json").is_file():
        raise UserError(f"{cfg.tokenizer}: no tokenizer.json; expected a tokenizer directory from `align tokenizer`")
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    if cfg.checkpoint:
        from pretrain.checkpoint import load_model_checkpoint

        model = load_model_checkpoint(cfg.checkpoint)
    else:
        torch.manual_seed(cfg.seed)
        overrides = {"tie_word_embeddings": cfg.tie_word_embeddings}
        if cfg.max_position_embeddings:
            overrides["max_position_embeddings"] = cfg.max_position_embeddings
        try:
            model = Llama(shape_from_preset(cfg.preset, len(tokenizer), **overrides))
        except ValueError as e:
            raise UserError(f"preset: {e}") from None
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
