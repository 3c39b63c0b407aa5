"""`align memory`: will a stage fit on my GPU? Its peak device memory, from the model's config.json alone.

    align memory --config recipes/gpu16/sft.yaml
    align memory --config recipes/gpu24/dpo.yaml --per_device_train_batch_size 4 --gpu_memory 20GB
    align memory --config recipes/gpu/fsdp/pretrain.yaml --num_processes 4 --sharding fsdp

Reads the stage YAML as a mapping, applies `--key value` overrides (values parsed as YAML), and prints the estimated
peak per process broken down into weights, adapters, gradients, optimizer states, activations, logits, KV cache,
extra models and CUDA overhead (alignment/memory.py), then a verdict for 16 GB and 24 GB cards (and --gpu_memory)
with the settings that would make it fit. No weights are downloaded: a model is a local directory with a config.json,
a hub name whose config ships under recipes/models/ or sits in the Hugging Face cache, or the output of an earlier
stage of the same recipe (followed back to its input model, or to the pretraining preset), so a whole chain can be
checked before anything has run.

Options of this command (everything else is a key of the stage's config):
  --stage NAME          the stage (default: from the YAML's first line, `# align <stage> --config ...`)
  --gpu_memory SIZE     also judge a card of this size (e.g. 20GB)
  --num_processes N     processes (GPUs); default from the YAML's first line (--nproc_per_node / --num_processes)
  --sharding MODE       none (DDP replicates), fsdp or zero3 (shard weights, gradients, optimizer states over N)
  --accelerate_config F an `accelerate launch --config_file` YAML (recipes/accelerate/): its num_processes and
                        distributed_type set the two above (default: the file named on the YAML's first line)
  --prompt_length N     prompt tokens assumed by generation stages (ppo, rloo, grpo, pairs) and eval windows
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignment import memory as mem
from alignment.config import read_yaml
from alignment.errors import UserError, exit_on_user_error

RECIPES = Path(__file__).resolve().parent
CARDS = (16, 24)
CPU_STAGES = ("data", "tokenizer", "prepare", "export", "compare", "run", "memory")
# keys naming the directory a stage writes its model to, and the suffix the model sits under
OUTPUT_KEYS = (("output_dir", "merged"), ("export_dir", ""), ("output_dir", ""))


@dataclass
class MemoryArgs:
    """What `align memory` was asked."""

    config: Path
    stage: str
    settings: dict
    gpu_memory: int | None = None
    num_processes: int = 1
    sharding: str = "none"
    overrides: dict = field(default_factory=dict)


def command_line(path: Path) -> str:
    """The YAML's first line (the command that runs it)."""
    lines = path.read_text().splitlines()
    return lines[0] if lines else ""


def stage_from_header(path: Path) -> str | None:
    """`# align sft --config ...`, `torchrun ... alignment.cli pretrain ...`, `python -m recipes.sft` -> the stage."""
    m = re.search(r"(?:\balign\s+|alignment\.cli\s+|-m\s+(?:recipes|evals|pretrain)\.)(\w+)", command_line(path))
    if not m:
        return None
    name = m.group(1)
    return {"harness": "eval", "train": "pretrain"}.get(name, name)


def processes_from_header(path: Path) -> int:
    """--nproc_per_node N / --num_processes N on the YAML's command line, else 1."""
    m = re.search(r"--(?:nproc_per_node|num_processes)[ =](\d+)", command_line(path))
    return int(m.group(1)) if m else 1


def accelerate_setup(path: Path) -> tuple[int, str]:
    """(processes, sharding) of an accelerate config file: MULTI_GPU -> none, FSDP -> fsdp, ZeRO-3 -> zero3."""
    cfg = read_yaml(path)
    kind = str(cfg.get("distributed_type", "NO")).upper()
    zero = int((cfg.get("deepspeed_config") or {}).get("zero_stage", 0) or 0)
    if kind == "DEEPSPEED" and zero != 3:
        raise UserError(f"{path}: DeepSpeed zero_stage {zero}; the estimate models stage 3 (or none)")
    sharding = {"FSDP": "fsdp", "DEEPSPEED": "zero3"}.get(kind, "none")
    try:
        n = int(cfg.get("num_processes", 1))
    except (TypeError, ValueError):
        raise UserError(f"{path}: num_processes {cfg.get('num_processes')!r}; expected a whole number") from None
    return n, sharding


def parse_args(argv: list[str]) -> MemoryArgs:
    """--config and this command's options; every other --key value overrides the stage config."""
    own: dict[str, str] = {}
    overrides: dict = {}
    i = 0
    while i < len(argv):
        a = argv[i]
        if not a.startswith("--"):
            raise UserError(f"command line: unexpected argument {a!r}; expected --key value pairs")
        key, _, value = a[2:].partition("=")
        if not _:
            if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
                raise UserError(f"command line: --{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key in ("config", "stage", "gpu_memory", "num_processes", "sharding", "accelerate_config"):
            own[key] = value
        else:
            try:
                overrides[key] = yaml.safe_load(value)
            except yaml.YAMLError:
                overrides[key] = value
    if "config" not in own:
        raise UserError("command line: --config needs a stage YAML (e.g. --config recipes/gpu16/sft.yaml)")
    path = Path(own["config"])
    settings = read_yaml(path)
    stage = own.get("stage") or stage_from_header(path)
    if stage is None:
        raise UserError(
            f"{path}: cannot tell the stage (first line is not `# align <stage> --config ...`); pass --stage NAME"
        )
    gpu = mem.parse_size(own["gpu_memory"]) if "gpu_memory" in own else None
    n, sharding = processes_from_header(path), "none"
    launch = own.get("accelerate_config") or accelerate_from_header(path)
    if launch:
        n, sharding = accelerate_setup(Path(launch))
    try:
        n = int(own.get("num_processes", n))
    except ValueError:
        raise UserError(f"--num_processes: {own['num_processes']!r}; expected a whole number") from None
    return MemoryArgs(path, stage, {**settings, **overrides}, gpu, n, own.get("sharding", sharding), overrides)


def accelerate_from_header(path: Path) -> str | None:
    """The accelerate config named on the YAML's first line (`accelerate launch --config_file F ...`)."""
    m = re.search(r"accelerate launch .*--config_file[ =](\S+)", command_line(path))
    return m.group(1) if m else None


# ------------------------------------------------------------------------------------------------------------------
# models that do not exist yet: follow the recipe back to where they come from


def recipe_yamls(config: Path) -> list[Path]:
    """Stage YAMLs to search for the stage that writes a model: the config's own directory first, then recipes/."""
    own = sorted(config.resolve().parent.glob("*.yaml"))
    rest = sorted(p for p in RECIPES.rglob("*.yaml") if p.parent != config.resolve().parent)
    return own + rest


def preset_config(settings: dict, where: Path, seen: tuple) -> dict:
    """config.json of a from-scratch model: pretrain/model.py's preset, overrides, its tokenizer's vocabulary."""
    from pretrain.model import PRESETS

    preset = settings.get("preset", "tiny")
    if preset not in PRESETS:
        raise UserError(f"{where}: preset {preset!r}; expected one of {', '.join(PRESETS)}")
    numbers = {
        **PRESETS[preset],
        **{
            k: settings[k]
            for k in (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "max_position_embeddings",
            )
            if settings.get(k)
        },
    }
    vocab = tokenizer_vocab(str(settings.get("tokenizer", "runs/tiny/tokenizer")), where, seen)
    return {
        "model_type": "llama",
        "vocab_size": vocab,
        "tie_word_embeddings": settings.get("tie_word_embeddings", True),
        "torch_dtype": "float32",
        **numbers,
    }


def tokenizer_vocab(path: str, where: Path, seen: tuple) -> int:
    """Vocabulary size of a tokenizer directory, or of the `align tokenizer` YAML that writes it."""
    tok = Path(path) / "tokenizer.json"
    if tok.is_file():
        import json

        data = json.loads(tok.read_text())
        return len(data["model"]["vocab"]) + sum(
            1 for t in data.get("added_tokens", []) if t["id"] >= len(data["model"]["vocab"])
        )
    for y in recipe_yamls(where):
        if stage_from_header(y) == "tokenizer":
            s = read_yaml(y)
            if str(s.get("output_dir", "")).rstrip("/") == path.rstrip("/"):
                return int(s.get("vocab_size", 4096))
    raise UserError(
        f"{where}: tokenizer {path}: not found and no `align tokenizer` YAML writes it; expected a tokenizer directory"
    )


def writer_of(model: str, config: Path) -> tuple[Path, dict] | None:
    """The stage YAML (and its settings) whose output is `model` (its merged/ dir, export_dir or output_dir)."""
    want = model.rstrip("/")
    for y in recipe_yamls(config):
        stage = stage_from_header(y)
        if stage in (None, "eval", "pairs", "tokenizer", "prepare", "data"):
            continue
        s = read_yaml(y)
        for key, suffix in OUTPUT_KEYS:
            out = s.get(key)
            if out and "/".join(p for p in (str(out).rstrip("/"), suffix) if p) == want:
                return y, s
    return None


def model_config(model: str, config: Path, where: str, seen: tuple = ()) -> dict:
    """config.json numbers of `model`: its own config.json, a shipped or cached hub config, or the earlier stage
    that will write it (followed back through the recipe to a hub model or a pretraining preset)."""
    import json

    found = mem.find_model_config(model)
    if found is not None:
        try:
            return json.loads(found.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"{found}: not valid JSON ({e.msg} at line {e.lineno})") from None
    hit = writer_of(model, config)
    if hit is None or hit[0] in seen:
        raise UserError(
            f"{where}: {model}: no config.json, not a shipped hub config (recipes/models/), not in the "
            f"Hugging Face cache, and no stage of the recipe writes it; expected a model directory or hub name"
        )
    y, s = hit
    stage = stage_from_header(y)
    if stage in ("pretrain", "export"):
        return preset_config(s, y, seen + (y,))
    src = s.get("model_name_or_path")
    if not src:
        raise UserError(f"{y}: no model_name_or_path; cannot follow {model} back to its model")
    config = dict(model_config(str(src), y, f"{y}: model_name_or_path", seen + (y,)))
    # alignment.modeling.save_stage_outputs merges into a fresh copy in the training dtype, fp32 after 8/4-bit training
    quantized = s.get("load_in_4bit") or s.get("load_in_8bit")
    dtype = str(s.get("dtype") or "float32")
    config["torch_dtype"] = "float32" if quantized else config.get("torch_dtype") if dtype == "auto" else dtype
    return config


def shapes_for(stage: str, settings: dict, config: Path) -> dict[str, mem.ModelShape]:
    """role -> ModelShape for the models the stage names, following the recipe for models not written yet."""
    if stage == "pretrain":
        settings = {**settings, "model_shape": preset_config(settings, config, ())}
    return mem.shapes_for(stage, settings, lambda name, where: model_config(name, config, where))


# ------------------------------------------------------------------------------------------------------------------


def main(cfg: MemoryArgs) -> dict:
    """Estimate, print the breakdown, the verdict per card and the settings that would fit; returns the numbers."""
    if cfg.stage in CPU_STAGES:
        print(f"memory: {cfg.config}: `align {cfg.stage}` runs on the CPU; no device memory to estimate")
        return {"stage": cfg.stage, "peak": 0.0}
    if cfg.stage not in mem.STAGES:
        raise UserError(f"--stage: {cfg.stage!r}; expected one of {', '.join(mem.STAGES)}")
    shapes = shapes_for(cfg.stage, cfg.settings, cfg.config)
    est = mem.estimate(cfg.stage, cfg.settings, shapes, cfg.num_processes, cfg.sharding)
    pol = shapes["policy"]
    par = (
        f", {cfg.num_processes} processes, sharding {cfg.sharding if est.sharding == cfg.sharding else est.sharding}"
        if cfg.num_processes > 1 or est.sharding != "none"
        else ""
    )
    title = (
        f"align memory: {cfg.stage}, {cfg.config} -- an estimate from config.json, not a measurement{par}\n"
        f"  model: {pol.model_type}, {pol.params() / 1e9:.2f}B params, {pol.num_hidden_layers} layers, "
        f"hidden {pol.hidden_size}, vocab {pol.vocab_size:,}"
    )
    for role in ("reward", "value", "reference"):
        if role in shapes:
            title += f"; {role}: {shapes[role].params() / 1e9:.2f}B params"
    print(mem.render(est, title))
    cards = [(f"{c} GB card", c * mem.GiB) for c in CARDS]
    if cfg.gpu_memory:
        cards.append((f"{cfg.gpu_memory / mem.GiB:g} GB (--gpu_memory)", cfg.gpu_memory))
    for name, budget in cards:
        line = mem.verdict(est, budget, name)
        if est.peak > budget:
            tips = mem.suggestions(cfg.stage, cfg.settings, shapes, budget, cfg.num_processes, cfg.sharding)
            fit = [(f, p) for f, p in tips if p <= budget]
            if fit:
                line += f"; fits with {fit[-1][0]} ({mem.gb(fit[-1][1])})"
            elif tips:
                line += f"; {tips[-1][0]} still needs {mem.gb(tips[-1][1])}"
        print(line)
    return {"stage": cfg.stage, "peak": est.peak, "allocated": est.allocated, "estimate": est}


@exit_on_user_error
def cli(argv=None) -> dict:
    """`align memory --config FILE.yaml [--gpu_memory 20GB] [--num_processes N --sharding fsdp] [--key value ...]`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: align memory --config FILE.yaml [--gpu_memory SIZE] [--num_processes N] [--sharding MODE] "
              "[--key value ...]\n")
        print(__doc__)
        return {}
    return main(parse_args(argv))


if __name__ == "__main__":
    cli()
