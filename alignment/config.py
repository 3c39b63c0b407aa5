"""Strict configuration: dataclasses parsed from YAML and the command line with `trl.TrlParser`.

`align <stage> --config recipes/<recipe>/<stage>.yaml --key value` sets a dataclass field from the YAML and
lets the command line override it. An unknown key in either place is an error that names the key and the
closest valid one. The resolved config is saved as `config.yaml` beside the stage's output.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from pathlib import Path

import yaml

from .errors import UserError
from .io import atomic_write_text

_cpu_notice_shown = False


def _parser(dataclass_types):
    from trl import TrlParser

    class StrictParser(TrlParser):
        def error(self, message):  # argparse would print usage and exit; we want one line
            raise UserError(f"command line: {message}")

    return StrictParser(dataclass_types, allow_abbrev=False)


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else ""


def parse_config(dataclass_types, argv=None):
    """Parse `--config FILE.yaml` and `--key value` overrides into instances of `dataclass_types`.

    Returns a tuple with one instance per type. Raises UserError for a missing config file, a YAML that is not
    a mapping, an unknown key (naming the closest valid key), or a value of the wrong type."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("command line: --config needs a YAML file path")
        path = Path(argv[i + 1])
        if not path.is_file():
            raise UserError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
        if not isinstance(data, dict):
            raise UserError(f"{path}: expected a YAML mapping of config keys")
    parser = _parser(dataclass_types)
    valid = sorted({a.dest for a in parser._actions if a.dest != "help"})
    try:
        out = parser.parse_args_and_config(argv, return_remaining_strings=True, separate_remaining_strings=True)
    except ValueError as e:  # raised by dataclass __post_init__ checks (TRL/transformers validation)
        raise UserError(f"config: {' '.join(str(e).split())}") from None
    *cfgs, from_yaml, from_cli = out
    for source, rest in (("config file", from_yaml), ("command line", from_cli)):
        keys = [s[2:].split("=")[0] for s in rest if s.startswith("--")]
        if rest and not keys:
            raise UserError(f"{source}: unexpected argument {rest[0]!r}")
        for key in keys:
            raise UserError(f"{source}: unknown key '{key}'{_closest(key, valid)}")
    return tuple(cfgs)


def config_dict(*cfgs) -> dict:
    """Merge dataclass instances into one plain dict (TrainingArguments through its own to_dict)."""
    out: dict = {}
    for c in cfgs:
        if hasattr(c, "to_dict"):
            d = c.to_dict()
        else:
            d = dataclasses.asdict(c)
        out.update(d)
    return out


def save_config(output_dir: str | os.PathLike, *cfgs) -> Path:
    """Write the resolved config of a stage as `config.yaml` in output_dir (atomically)."""
    path = Path(output_dir) / "config.yaml"

    def plain(v):
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple, set)):
            return [plain(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return str(v)

    atomic_write_text(path, yaml.safe_dump(plain(config_dict(*cfgs)), sort_keys=False))
    return path


def cpu_fallback(args) -> bool:
    """Without CUDA, switch TRL/transformers training args to `use_cpu=True, bf16=False, fp16=False`.

    bf16/fp16 run ~25x slower than fp32 on AVX2-only CPUs, and TRL configs default to bf16=True. Says so once.
    Returns True when the args were changed."""
    import torch

    global _cpu_notice_shown
    if torch.cuda.is_available():
        return False
    changed = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False) or not getattr(args, "use_cpu", True))
    for name, value in (("bf16", False), ("fp16", False), ("use_cpu", True)):
        if hasattr(args, name):
            setattr(args, name, value)
    if changed and not _cpu_notice_shown:
        print("note: no CUDA device; training on CPU in fp32 (use_cpu=True, bf16=False)", file=sys.stderr)
        _cpu_notice_shown = True
    return changed
