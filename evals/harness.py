"""`align eval`: score one model on perplexity, task specs (multiple choice, generation), preference pairs, win rate.

    align eval --model runs/tiny/sft/merged --tasks perplexity,mmlu --output runs/tiny/eval/sft.json \\
        --perplexity_files runs/tiny/data/corpus/heldout.jsonl --mmlu_dir runs/tiny/data/mmlu
    align eval --config recipes/mmlu/eval.yaml --model runs/base --num_fewshot 5
    align eval --model Qwen/Qwen2.5-0.5B --tasks mmlu,arc_challenge,hellaswag,piqa,truthfulqa_mc2,winogrande,gsm8k \\
        --mmlu_dir ~/data/mmlu --data_dir ~/data --output runs/eval/qwen.json

A task is a spec (evals/tasks/<name>.yaml, or the path of a user's YAML; evals/taskspec.py documents the keys); its
files are found under --data_dir or --task_data TASK=DIR (TASK.SPLIT=FILE for one split), else read from the hub.

Writes FILE.json (the versioned report), FILE.md, FILE.png and, with --log_samples, FILE.samples.jsonl. In Python:

    from evals.harness import evaluate
    from evals.report import write_report
    report, samples = evaluate("runs/tiny/sft/merged", tasks=["mmlu"], mmlu_dir="runs/tiny/data/mmlu")
    write_report(report, "runs/tiny/eval/sft.json", samples)
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from alignment.config import parse_config
from alignment.errors import UserError, exit_on_user_error

from .report import build_report, metric_names, write_report

SPECIAL_TASKS = ("perplexity", "preference", "dpo", "winrate", "answers")  # the rest are specs in evals/tasks/


@dataclass
class EvalConfig:
    """What to score and how; every field is also a `--key value` option."""

    model: str = field(default="runs/tiny/base", metadata={"help": "Hugging Face causal LM directory (with tokenizer)."})
    adapter: str | None = field(default=None, metadata={"help": "PEFT LoRA adapter directory applied to --model."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Load the model in 8-bit with bitsandbytes."})
    load_in_4bit: bool = field(default=False, metadata={"help": "Load the model in 4-bit NF4 with bitsandbytes."})
    tasks: list[str] = field(default_factory=lambda: ["perplexity", "mmlu"], metadata={
        "help": f"Any of {', '.join(SPECIAL_TASKS)}, a spec in evals/tasks/ (mmlu, arc_easy, arc_challenge, hellaswag, "
                "piqa, truthfulqa_mc1, truthfulqa_mc2, winogrande, gsm8k, ...) or a task YAML file (comma-separated or "
                "repeated)."})
    output: str = field(default="runs/tiny/eval/report.json", metadata={"help": "Report path (.json); .md and .png are written beside it."})
    # perplexity
    perplexity_files: list[str] = field(default_factory=list, metadata={"help": "Text files (.txt/.jsonl/.json/.parquet, globs) to score."})
    perplexity_dataset: str | None = field(default=None, metadata={"help": "A `datasets` name or local dataset directory to score."})
    perplexity_dataset_config: str | None = field(default=None, metadata={"help": "Its configuration name."})
    perplexity_split: str = field(default="test", metadata={"help": "Its split."})
    text_column: str = field(default="text", metadata={"help": "Column holding the text (.jsonl/.parquet/datasets)."})
    txt_split: str = field(default="file", metadata={"help": ".txt documents: file, paragraph, line, or a separator line."})
    stride: int | None = field(default=None, metadata={"help": "Rolling-window stride in tokens (default: the context length, as lm-eval)."})
    # task specs
    data_dir: str | None = field(default=None, metadata={
        "help": "Directory holding the tasks' downloaded files (each spec's data_files say which names it looks for)."})
    task_data: list[str] = field(default_factory=list, metadata={
        "help": "TASK=PATH (the task's directory, or the file of its scored split) or TASK.SPLIT=PATH (a file, "
                "directory, glob or hub name)."})
    fewshot_seed: int = field(default=1234, metadata={"help": "Seed of the few-shot sampler (lm-eval's default 1234)."})
    max_gen_toks: int | None = field(default=None, metadata={
        "help": "Generation tasks: tokens per answer (default: the spec's, lm-eval's 256)."})
    mmlu_dir: str | None = field(default=None, metadata={"help": "MMLU directory with test/ and dev/ (<subject>_test.csv, <subject>_dev.csv)."})
    mmlu_test_files: list[str] = field(default_factory=list, metadata={"help": "Test files (.csv or cais/mmlu .jsonl/.parquet)."})
    mmlu_dev_files: list[str] = field(default_factory=list, metadata={"help": "Dev (few-shot) files."})
    subjects: list[str] = field(default_factory=list, metadata={"help": "Only these subjects (default: all found)."})
    num_fewshot: int | None = field(default=None, metadata={
        "help": "Few-shot examples per question (default: each task's own; MMLU: the first n dev rows)."})
    scoring: str = field(default="letter", metadata={
        "help": "MMLU: letter (' A'..' D' after 'Answer:', lm-eval's mmlu) or cloze (answer texts, acc_norm: "
                "mmlu_continuation)."})
    apply_chat_template: bool = field(default=False, metadata={"help": "Render prompts with the tokenizer's chat template (empty target delimiter)."})
    fewshot_as_multiturn: bool = field(default=True, metadata={"help": "With a chat template: shots as user/assistant turns (lm-eval's default)."})
    # preference and generation
    preference_files: list[str] = field(default_factory=list, metadata={"help": "Preference pairs (.jsonl/.jsonl.gz: TRL rows or hh-rlhf "
                                                                                "dialogues)."})
    reward_model: str | None = field(default=None, metadata={"help": "Reward model directory (sequence classification, 1 label)."})
    reference_model: str | None = field(default=None, metadata={"help": "Reference policy for DPO accuracy, win rate and KL."})
    beta: float = field(default=0.1, metadata={"help": "DPO beta of the implicit reward."})
    prompts_file: str | None = field(default=None, metadata={"help": "Held-out prompts (.jsonl with 'prompt') for the win rate."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens sampled per response for the win rate."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (1.0 keeps the KL estimate unbiased)."})
    num_samples: int = field(default=1, metadata={"help": "Win rate: responses sampled per prompt from each model; a prompt's "
                                                  "outcome is the share of its k*k comparisons won (less noise, same quantity)."})
    # generative answers
    answer_files: list[str] = field(default_factory=list, metadata={"help": "Questions with ground truth (.jsonl prompt rows, "
                                                                    "e.g. qa/test.jsonl of `align data tinyworld`) for the answers task."})
    checker: str = field(default="tinyworld", metadata={"help": "How the answers task checks an answer: tinyworld."})
    answer_max_new_tokens: int = field(default=48, metadata={"help": "Answers task: longest answer in tokens (greedy)."})
    # run
    batch_size: int = field(default=16, metadata={"help": "Sequences per forward pass (results do not depend on it)."})
    limit: int | None = field(default=None, metadata={"help": "Score only the first n items of each task (for quick checks)."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling."})
    log_samples: bool = field(default=False, metadata={"help": "Write per-item records to FILE.samples.jsonl."})
    device: str | None = field(default=None, metadata={"help": "cuda or cpu (default: cuda when available)."})
    progress: bool = field(default=True, metadata={"help": "Show tqdm progress bars."})


def _split(items) -> list[str]:
    """Accept lists given as repeated values, comma-separated strings, or both."""
    return [t.strip() for item in ([items] if isinstance(items, str) else items or []) for t in str(item).split(",") if t.strip()]


def _task_list(tasks) -> list[str]:
    from .taskspec import builtin_tasks, is_spec_name

    names = _split(tasks)
    for t in names:
        if t not in SPECIAL_TASKS and not is_spec_name(t):
            known = ", ".join(SPECIAL_TASKS + tuple(builtin_tasks()))
            raise UserError(f"tasks: unknown task {t!r}; expected any of {known} or a task YAML file")
    if not names:
        raise UserError(f"tasks: expected at least one of {', '.join(SPECIAL_TASKS)} or a task spec")
    return names


def load_spec_tasks(cfg: EvalConfig, names: list[str]) -> list:
    """Every spec task's documents and shots (TaskData), read and checked before any model work."""
    from .taskdata import load_task, parse_task_data
    from .taskspec import load_spec

    task_data = parse_task_data(_split(cfg.task_data))
    out = []
    for name in names:
        if name in SPECIAL_TASKS:
            continue
        if name == "mmlu":
            if cfg.scoring not in ("letter", "cloze"):
                raise UserError(f"scoring: {cfg.scoring!r} is not one of letter, cloze")
            spec = load_spec("mmlu" if cfg.scoring == "letter" else "mmlu_continuation")
            spec.task = "mmlu"  # cloze keeps the name: reports and the pipeline read mmlu / mmlu_<subject>
            mine = task_data.setdefault("mmlu", {})
            if cfg.mmlu_dir:
                if not Path(cfg.mmlu_dir, "test").is_dir():
                    raise UserError(f"{cfg.mmlu_dir}: expected an MMLU directory with test/ (and dev/) subfolders")
                mine.setdefault(None, cfg.mmlu_dir)
            for split, files in (("test", cfg.mmlu_test_files), ("dev", cfg.mmlu_dev_files)):
                if _split(files):
                    mine[split] = _split(files)
            if not mine and not cfg.data_dir:
                raise UserError("mmlu: no task files; set mmlu_dir or mmlu_test_files")
        else:
            spec = load_spec(name)
        subtasks = _split(cfg.subjects) if spec.subtasks else None
        out += load_task(spec, cfg.data_dir, task_data, cfg.num_fewshot, cfg.limit, subtasks, cfg.fewshot_seed)
    return out


def evaluate(model: str, tasks=("perplexity",), **options) -> tuple[dict, list[dict]]:
    """Score `model` on `tasks` (options are EvalConfig fields); returns (report dict, per-item samples)."""
    names = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise UserError(f"evaluate: unknown option(s) {', '.join(unknown)}")
    cfg = EvalConfig(model=model, tasks=list(tasks) if not isinstance(tasks, str) else [tasks], **options)
    return run(cfg)


def run(cfg: EvalConfig) -> tuple[dict, list[dict]]:
    """Run every configured task on the model; returns (report dict, samples)."""
    from .scoring import scoring_model

    from alignment.io import check_writable_file

    t0 = time.time()
    check_writable_file(cfg.output, ".json")
    from alignment.modeling import check_model_dir

    check_model_dir(cfg.model, "model")
    tasks = _task_list(cfg.tasks)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    for name in ("batch_size", "max_new_tokens", "num_samples", "answer_max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name}: {getattr(cfg, name)}; expected a positive integer")
    if ((cfg.num_fewshot is not None and cfg.num_fewshot < 0) or cfg.temperature < 0
            or (cfg.limit is not None and cfg.limit < 1) or (cfg.max_gen_toks is not None and cfg.max_gen_toks < 1)):
        raise UserError("num_fewshot, temperature, limit, max_gen_toks: expected num_fewshot >= 0, temperature >= 0 "
                        "(0 = greedy), limit >= 1 and max_gen_toks >= 1")
    # read and check every input before the (slow) model work, so bad input fails fast with nothing written
    docs = None
    if "perplexity" in tasks:
        from alignment.data import iter_documents

        if not cfg.perplexity_files and not cfg.perplexity_dataset:
            raise UserError("perplexity: set perplexity_files or perplexity_dataset")
        docs = list(iter_documents(cfg.perplexity_files, cfg.perplexity_dataset, cfg.perplexity_dataset_config,
                                   cfg.perplexity_split, cfg.text_column, cfg.txt_split, key="perplexity_files"))
        if not docs:
            raise UserError(f"{', '.join(cfg.perplexity_files) or cfg.perplexity_dataset}: no documents (empty text?)")
        docs = docs[:cfg.limit] if cfg.limit else docs
    specs = load_spec_tasks(cfg, tasks)
    pairs = prompts = None
    if {"preference", "dpo"} & set(tasks):
        from .preference import read_pairs

        if not cfg.preference_files:
            raise UserError("preference: set preference_files")
        if "preference" in tasks and not cfg.reward_model:
            raise UserError("preference: set reward_model (a sequence-classification model directory)")
        if "dpo" in tasks and not cfg.reference_model:
            raise UserError("dpo: set reference_model")
        pairs = [p for f in _split(cfg.preference_files) for p in read_pairs(f)]
        pairs = pairs[:cfg.limit] if cfg.limit else pairs
    if "winrate" in tasks:
        from .preference import read_prompts

        if not (cfg.reward_model and cfg.reference_model and cfg.prompts_file):
            raise UserError("winrate: set reward_model, reference_model and prompts_file")
        if cfg.num_samples < 1:
            raise UserError(f"winrate: num_samples must be at least 1, got {cfg.num_samples}")
        prompts = read_prompts(cfg.prompts_file, cfg.limit)
    answer_rows = None
    if "answers" in tasks:
        from .generative import read_answer_rows

        if not cfg.answer_files:
            raise UserError("answers: set answer_files (questions with ground truth, e.g. runs/tiny/data/qa/test.jsonl)")
        answer_rows = read_answer_rows(_split(cfg.answer_files), cfg.checker, cfg.limit)
    for name in ("reward_model", "reference_model"):
        if getattr(cfg, name):
            from alignment.modeling import check_model_dir

            check_model_dir(getattr(cfg, name), name)
    lm = scoring_model(cfg.model, cfg.adapter, cfg.load_in_8bit, cfg.load_in_4bit, device=cfg.device)
    for name, on in (("max_new_tokens", prompts is not None), ("answer_max_new_tokens", answer_rows is not None)):
        if on and getattr(cfg, name) >= lm.max_length:
            raise UserError(f"{name}: {getattr(cfg, name)} leaves no room for a prompt in the model's context of {lm.max_length} tokens")
    results: dict = {}
    samples: list[dict] = []
    if docs is not None:
        from .perplexity import evaluate_perplexity

        r, s = evaluate_perplexity(lm, docs, stride=cfg.stride, batch_size=cfg.batch_size, progress=cfg.progress)
        r["source"] = cfg.perplexity_files or cfg.perplexity_dataset
        results["perplexity"] = r
        samples += s
    mc = [t for t in specs if t.spec.output_type == "multiple_choice"]
    if mc:
        from .multiple_choice import evaluate_mc

        r, s = evaluate_mc(lm, mc, cfg.apply_chat_template, cfg.fewshot_as_multiturn, cfg.batch_size, cfg.progress)
        results.update(r)
        samples += s
    gen = [t for t in specs if t.spec.output_type == "generate_until"]
    if gen:
        from .generative import evaluate_generate_until

        r, s = evaluate_generate_until(lm, gen, cfg.apply_chat_template, cfg.fewshot_as_multiturn, cfg.batch_size,
                                       cfg.max_gen_toks, cfg.progress)
        results.update(r)
        samples += s
    if pairs is not None:
        from .preference import evaluate_dpo_accuracy, evaluate_reward_accuracy

        if "preference" in tasks:
            r, s = evaluate_reward_accuracy(cfg.reward_model, pairs, cfg.batch_size)
            results["reward_accuracy"] = r
            samples += s
        if "dpo" in tasks:
            r, s = evaluate_dpo_accuracy(lm, cfg.reference_model, pairs, cfg.beta, cfg.batch_size)
            results["dpo_accuracy"] = r
            samples += s
    if prompts is not None:
        from .preference import evaluate_win_rate

        r, s = evaluate_win_rate(lm, cfg.reference_model, cfg.reward_model, prompts, cfg.max_new_tokens, cfg.temperature,
                                 cfg.seed, cfg.batch_size, cfg.num_samples)
        results["win_rate"] = r
        samples += s
    if answer_rows is not None:
        from .generative import evaluate_answers

        r, s = evaluate_answers(lm, answer_rows, cfg.answer_max_new_tokens, cfg.batch_size, source=", ".join(_split(cfg.answer_files)))
        results["answers"] = r
        samples += s
    model_info = {"path": cfg.model, "adapter": cfg.adapter, "hash": lm.model_hash, "tokenizer_hash": lm.tokenizer_hash,
                  "max_length": lm.max_length, "load_in_8bit": cfg.load_in_8bit, "load_in_4bit": cfg.load_in_4bit}
    return build_report(model_info, results, dataclasses.asdict(cfg), cfg.seed, time.time() - t0), samples


def main(cfg: EvalConfig) -> dict:
    """Evaluate, write the report files, print a summary; returns the report."""
    if not cfg.output.endswith(".json"):
        raise UserError(f"output: {cfg.output!r} must end in .json")
    report, samples = run(cfg)
    paths = write_report(report, cfg.output, samples if cfg.log_samples else None)
    for name, r in report["results"].items():
        shown = ", ".join(f"{k} {r[k]:.4f}" for k in metric_names(r) if isinstance(r.get(k), float))
        print(f"eval {name} (n={r.get('n')}, {r.get('num_fewshot')}-shot, {r.get('scoring')}): {shown}")
    print(f"eval: report -> {paths['json']} (+ .md, .png{', .samples.jsonl' if 'samples' in paths else ''}) "
          f"in {report['wall_time_s']:.1f}s", file=sys.stderr)
    return report


@exit_on_user_error
def cli(argv=None) -> None:
    (cfg,) = parse_config([EvalConfig], argv)
    main(cfg)


if __name__ == "__main__":
    cli()
