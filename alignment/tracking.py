"""Metric logging for the stages that run their own loop (pretrain, PPO): metrics.jsonl plus `report_to` trackers.

TRL-trained stages (sft, reward, dpo, rloo, grpo) log through TrainingArguments.report_to; these stages take the
same names (`tensorboard`, `wandb`, `none`) so a recipe reads the same everywhere.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

TRACKERS = ("tensorboard", "wandb", "none")


def check_report_to(report_to) -> list[str]:
    """The tracker names of a `report_to` value (a name or a list), validated."""
    names = [report_to] if isinstance(report_to, str) else list(report_to or [])
    for name in names:
        if name not in TRACKERS:
            raise UserError(f"report_to: unknown tracker {name!r}; expected any of {', '.join(TRACKERS)}")
    return [n for n in names if n != "none"]


class Trackers:
    """Append metrics to `<output_dir>/metrics.jsonl` and forward them to the trackers named in report_to.

    `history` (earlier lines, e.g. from a resumed checkpoint) is written first, so a resumed run's file has no gaps
    and no duplicates. `active=False` (a non-zero rank) makes every call a no-op."""

    def __init__(self, output_dir: str | Path, report_to, project: str, config: dict | None = None,
                 history: list[dict] | None = None, active: bool = True):
        self.active = active
        self.path = Path(output_dir) / "metrics.jsonl"
        self.tb = self.wandb = None
        names = check_report_to(report_to)
        if not active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "w") as f:
            f.writelines(self._line(m, m.get("step")) for m in history or [])
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("report_to: tensorboard is not installed (pip install tensorboard)") from None
            self.tb = SummaryWriter(str(Path(output_dir) / "tensorboard"))
        if "wandb" in names:
            try:
                import wandb
            except ImportError:
                raise UserError("report_to: wandb is not installed (pip install wandb)") from None
            self.wandb = wandb.init(project=project, config=config or {}, dir=str(output_dir))

    @staticmethod
    def _line(metrics: dict, step) -> str:
        return json.dumps({"step": step, **{k: v for k, v in metrics.items() if k != "step"}}) + "\n"

    def log(self, metrics: dict, step: int) -> None:
        """One line of metrics for `step` (numbers forwarded to tensorboard / wandb)."""
        if not self.active:
            return
        with open(self.path, "a") as f:
            f.write(self._line(metrics, step))
        numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(numbers, step=step)

    def close(self) -> None:
        """Flush and close the trackers."""
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
