"""Strict configuration: dataclasses parsed from YAML and the command line with TRL's parser, then type- and
range-checked.

`align <stage> --config recipes/<recipe>/<stage>.yaml --key value` sets a dataclass field from the YAML and lets the
command line override it. Refused, each with one line naming the key: an unknown key (with the closest valid one), a
YAML value of the wrong type (a string where a list belongs, 2.5 for a step count, 2 for a flag), a value out of its
range (see RANGES), a YAML `env:` mapping (TRL's parser would set process environment variables from a shared recipe).
Without CUDA, trainer configs are switched to fp32 on the CPU (`use_cpu`, no bf16/fp16), saying so once. The
resolved config is saved as `config.yaml` beside the stage's output.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import os
import sys
import types
import typing
from pathlib import Path

import yaml

from .errors import UserError
from .io import atomic_write_text

# Ranges of fields that appear in many stages, by name: (low, high, low_inclusive, high_inclusive, sentinel values).
# A dataclass field can set its own with metadata={"range": (...)}. None means unbounded on that side.
POSITIVE = (0, None, False, True, ())
AT_LEAST_1 = (1, None, True, True, ())
NON_NEGATIVE = (0, None, True, True, ())
FRACTION = (0, 1, True, True, ())
RANGES: dict[str, tuple] = {
    # steps, batches, sizes: at least 1
    **{k: AT_LEAST_1 for k in (
        "per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps", "batch_size",
        "grad_accum", "seq_len", "rollout_batch_size", "mini_batch_size", "num_ppo_epochs", "response_length",
        "num_updates", "num_samples", "num_generations", "max_new_tokens", "max_completion_length", "lora_r",
        "vocab_size", "num_perm", "shingle_words", "decontaminate_ngram", "shard_tokens", "reward_batch_size",
        "score_batch_size", "log_interval", "eval_batches", "limit", "num_proc", "sample_tokens",
        "pairs_per_prompt", "num_return_sequences", "max_length", "kl_horizon", "qa_limit", "num_people", "dev_rows",
        "statement_repeats", "num_stories", "num_quizzes", "sft_per_fact", "preference_per_fact", "model_max_length",
        "num_draft_tokens", "max_train_samples", "max_eval_samples", "num_processes")},
    "max_steps": (1, None, True, True, (-1,)),  # TRL's -1 = train for num_train_epochs
    **{k: POSITIVE for k in ("learning_rate", "lr", "num_train_epochs", "kl_target")},
    **{k: NON_NEGATIVE for k in (
        "temperature", "beta", "kl_coef", "warmup_steps", "weight_decay", "grad_clip", "max_grad_norm", "cliprange",
        "cliprange_value", "vf_coef", "missing_eos_penalty", "min_margin", "eval_interval", "save_interval",
        "keep_checkpoints", "num_fewshot", "top_k", "max_minutes", "eval_prompts", "save_steps",
        "num_faqs", "cpu_threads", "num_reserved_tokens", "min_frequency", "max_train_chars",
        "lora_alpha", "min_words", "max_words", "peak_tflops", "warmup_ratio")},
    **{k: FRACTION for k in (
        "eval_fraction", "val_fraction", "heldout_fraction", "lora_dropout", "min_p", "min_lr_ratio", "gamma", "lam",
        "near_threshold", "max_duplicate_line_fraction", "min_alpha_word_fraction", "max_symbol_ratio")},
    "top_p": (0, 1, False, True, ()),
    "repetition_penalty": POSITIVE,
    "stride": (1, None, True, True, ()),
    "seed": (0, None, True, True, ()),
}

_cpu_note_shown = False
PROG = "align"  # the usage line's command; alignment.cli sets it to `align <stage>`


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def _type_name(tp) -> str:
    if typing.get_origin(tp) is not None:  # list[str], str | None: the annotation as written
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _matches(value, tp) -> bool | None:
    """Does a YAML value fit the annotation? None when the annotation is beyond what we check (anything goes)."""
    origin = typing.get_origin(tp)
    if tp is typing.Any or tp is object:
        return None
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, a) for a in typing.get_args(tp)]
        return True if any(r is None or r for r in results) else False
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if origin in (list, tuple, set) or tp in (list, tuple):
        if not isinstance(value, list):
            return False
        args = typing.get_args(tp)
        return all(_matches(v, args[0]) is not False for v in value) if args else True
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in [m.value for m in tp] or value in [m.name for m in tp]
    return None


def _hints(dataclass_types) -> dict[str, object]:
    out = {}
    for dt in dataclass_types:
        try:
            hints = typing.get_type_hints(dt)
        except Exception:  # an annotation this Python cannot resolve: skip type checks for that class
            hints = {}
        for f in dataclasses.fields(dt):
            if f.init:
                out.setdefault(f.name, hints.get(f.name, typing.Any))
    return out


def _check_types(data: dict, hints: dict, where: str) -> None:
    for key, value in data.items():
        tp = hints.get(key, typing.Any)
        if _matches(value, tp) is False:
            raise UserError(f"{where}: {key}: {value!r} is a {type(value).__name__}; expected {_type_name(tp)}")


def check_range(key: str, value, rng: tuple, where: str = "config") -> None:
    """Raise UserError when a number is outside its range (lists are checked element by element)."""
    if isinstance(value, (list, tuple)):
        for v in value:
            check_range(key, v, rng, where)
        return
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    lo, hi, lo_inc, hi_inc, sentinels = rng
    if value in sentinels:
        return
    bad = not math.isfinite(value)
    bad = bad or (lo is not None and (value < lo or (value == lo and not lo_inc)))
    bad = bad or (hi is not None and (value > hi or (value == hi and not hi_inc)))
    if bad:
        lo_s = "" if lo is None else f"{'>=' if lo_inc else '>'} {lo}"
        hi_s = "" if hi is None else f"{'<=' if hi_inc else '<'} {hi}"
        extra = f" (or {', '.join(map(str, sentinels))})" if sentinels else ""
        raise UserError(f"{where}: {key}: {value}; expected a number {' and '.join(s for s in (lo_s, hi_s) if s)}{extra}")


def _check_ranges(cfgs, where: str) -> None:
    for cfg in cfgs:
        for f in dataclasses.fields(cfg):
            rng = f.metadata.get("range", RANGES.get(f.name))
            if rng is not None:
                check_range(f.name, getattr(cfg, f.name, None), rng, where)


def read_yaml(path: Path) -> dict:
    """A config YAML as a mapping: one-line errors for a missing or undecodable file, invalid YAML, a non-mapping
    and an `env:` key."""
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: undecodable bytes at byte {e.start}; expected a UTF-8 YAML file") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a YAML mapping of config keys, got a {type(data).__name__}")
    if "env" in data:
        raise UserError(f"{path}: env: a config may not set environment variables (it would change every stage it "
                        "launches); set them in your shell instead")
    return data


def cpu_fallback(dataclass_types) -> list[str]:
    """Without CUDA, the overrides that run trainer configs on the CPU in fp32: `--use_cpu true --bf16 false --fp16 false`.

    bf16/fp16 run ~25x slower than fp32 on AVX2-only CPUs, TRL configs default to bf16=True, and transformers rejects
    bf16 without a GPU inside the config's __post_init__, so the override has to reach the parser. It comes last, so
    it wins over the YAML and the user's flags. Says so once per process."""
    import torch

    global _cpu_note_shown
    names = {f.name for dt in dataclass_types for f in dataclasses.fields(dt)}
    if torch.cuda.is_available() or not {"use_cpu", "bf16"} <= names:
        return []
    if not _cpu_note_shown:
        print("note: no CUDA device; training on CPU in fp32 (use_cpu=True, bf16=False)", file=sys.stderr)
        _cpu_note_shown = True
    if os.environ.get("ACCELERATE_MIXED_PRECISION", "no") != "no":  # `accelerate launch` of a GPU config (bf16) on a CPU
        os.environ["ACCELERATE_MIXED_PRECISION"] = "no"
    return ["--use_cpu", "true", "--bf16", "false", "--fp16", "false"]


def parse_config(dataclass_types, argv=None):
    """Parse `--config FILE.yaml` and `--key value` overrides into one instance of each of `dataclass_types`.

    Returns a tuple with one instance per type. Raises UserError for a missing or unreadable config file, a YAML that
    is not a mapping, an `env:` key, an unknown key (naming the closest valid one), a value of the wrong type or out
    of its range, and the configs' own validation errors."""
    from .compat import StrictTrlParser as StrictParser

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        StrictParser(dataclass_types, allow_abbrev=False, prog=PROG).print_help()
        sys.exit(0)
    data: dict = {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("command line: --config needs a YAML file path")
        path = Path(argv[i + 1])
        argv = argv[:i] + argv[i + 2:]
        data = read_yaml(path)
    where = str(path) if data else "config"
    parser = StrictParser(dataclass_types, allow_abbrev=False)
    valid = sorted({a.dest for a in parser._actions if a.dest != "help"})
    for key in data:
        if key not in valid:
            raise UserError(f"config file: unknown key '{key}'{_closest(key, valid)}")
    _check_types(data, _hints(dataclass_types), where)
    parser.set_defaults_with_config(**data)
    argv = argv + cpu_fallback(dataclass_types)
    try:
        out = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except (ValueError, TypeError) as e:  # raised by dataclass __post_init__ checks (TRL/transformers validation)
        raise UserError(f"config: {' '.join(str(e).split())[:400]}") from None
    *cfgs, rest = out
    keys = [s[2:].split("=")[0] for s in rest if s.startswith("--")]
    if rest and not keys:
        raise UserError(f"command line: unexpected argument {rest[0]!r}")
    for key in keys:
        raise UserError(f"command line: unknown key '{key}'{_closest(key, valid)}")
    _check_ranges(cfgs, where if data else "command line")
    return tuple(cfgs)


def config_dict(*cfgs) -> dict:
    """Merge dataclass instances into one plain dict (TrainingArguments through its own to_dict)."""
    out: dict = {}
    for c in cfgs:
        out.update(c.to_dict() if hasattr(c, "to_dict") else dataclasses.asdict(c))
    return out


def plain(v):
    """A config value as YAML/JSON can hold it (enums and paths become strings)."""
    if isinstance(v, dict):
        return {str(k): plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple, set)):
        return [plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def save_config(output_dir: str | os.PathLike, *cfgs, overrides: dict | None = None) -> Path:
    """Write the resolved config of a stage as `config.yaml` in output_dir (atomically); `overrides` replace keys
    (e.g. the output_dir the user asked for, when the stage ran in a work directory)."""
    path = Path(output_dir) / "config.yaml"
    atomic_write_text(path, yaml.safe_dump(plain({**config_dict(*cfgs), **(overrides or {})}), sort_keys=False))
    return path


class StageConfig(typing.NamedTuple):
    """The parsed config of a stage that trains a model: its own options, the trainer's (a TRL *Config, or None when
    the stage runs its own loop) and the model's (TRL ModelConfig: LoRA, 8-bit / 4-bit, dtype)."""

    script: typing.Any
    training: typing.Any
    model: typing.Any


@dataclasses.dataclass
class MemoryCheckArguments:
    skip_memory_check: bool = dataclasses.field(default=False, metadata={
        "help": "On a CUDA device the stage first estimates its peak memory (as `align memory` does) and stops with one "
                "line when it exceeds the free memory; true skips that check."})


def parse_stage_config(script_type, training_type, model_type, argv=None) -> StageConfig:
    """parse_config for a training stage: StageConfig(script, training, model); training_type may be None (our PPO).

    On a CUDA device the config is first checked against the free device memory (alignment.memory.preflight): a run
    that cannot fit stops here, with the estimate and the smallest change that fits, instead of at an OOM later."""
    types_ = [t for t in (script_type, training_type, model_type) if t is not None]
    parsed = list(parse_config(types_ + [MemoryCheckArguments], argv))
    check = parsed.pop()
    script = parsed.pop(0)
    training = parsed.pop(0) if training_type is not None else None
    cfg = StageConfig(script, training, parsed.pop(0))
    if not check.skip_memory_check:
        from . import memory

        stage = training_type.__name__.removesuffix("Config").lower() if training_type is not None else "ppo"
        memory.preflight_here(stage, config_dict(*[c for c in cfg if c is not None]))
    return cfg


# keys that say where and how a run reports, not what it computes: a run that differs only in these resumes
_NOT_FINGERPRINTED = {"output_dir", "overwrite", "logging_dir", "report_to", "disable_tqdm", "run_name", "logging_steps",
                      "skip_memory_check", "progress", "resume", "resume_from", "resume_from_checkpoint", "export_dir"}


def fingerprint_config(*cfgs, processes: int = 1) -> dict:
    """The resolved config of a run minus where and how it reports: two runs with the same one compute the same.

    `processes` > 1 (a Trainer stage under a launcher) is part of it: resumed by another number of processes, the
    Trainer would go on with another global batch."""
    out = {k: v for k, v in plain(config_dict(*cfgs)).items() if k not in _NOT_FINGERPRINTED}
    return {**out, "processes": processes} if processes > 1 else out
