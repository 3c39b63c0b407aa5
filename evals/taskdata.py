"""Task data: where a spec's files are, which layout they are in, the documents they hold, and each one's shots.

    align eval --model M --tasks arc_challenge --data_dir ~/evaldata          # each spec's data_files globs under it
    align eval --model M --tasks arc_challenge --task_data arc_challenge=~/data/ARC-V1-Feb2018-2/ARC-Challenge
    align eval --model M --tasks gsm8k --task_data gsm8k.test=test.jsonl,gsm8k.train=train.jsonl

Files are read with the suite's one reader (alignment.data.read_file_rows; a hub dataset name with read_rows). The
first row decides the layout (the first of the spec's `layouts` whose fields it has; a headerless CSV layout by its
number of cells); every row is checked against it, mapped to the task's fields and passed through `process_docs`.
Shots are drawn as lm-eval 0.4.13 draws them, before any model work, and every prompt, choice list and label is
checked then too, so bad data is one error line before the model loads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from alignment.errors import UserError

from .taskspec import FEWSHOT_SEED, TASKS_DIR, Layout, TaskSpec, _file_stem, _labels_path, _where, has_path


def parse_task_data(entries: list[str]) -> dict[str, dict[str | None, str]]:
    """`TASK=PATH` (the task's directory, or its scored split's file) and `TASK.SPLIT=PATH` -> {task: {split: path}}."""
    out: dict[str, dict[str | None, str]] = {}
    for e in entries:
        key, sep, path = e.partition("=")
        if not sep or not key or not path:
            raise UserError(f"task_data: {e!r}; expected TASK=PATH or TASK.SPLIT=PATH (a directory, file, glob or "
                            "hub name)")
        task, _, split = key.partition(".")
        out.setdefault(task, {})[split or None] = path
    return out


def _find(root: Path, globs: list[str]) -> list[Path]:
    from alignment.data import LOCAL_SUFFIXES

    for g in globs:
        hits = sorted(p for p in root.glob(g) if p.is_file() and not p.name.endswith(".lst"))
        if hits:
            return hits
    if not globs:  # a spec without file names: every data file in the directory
        return sorted(p for p in root.rglob("*") if p.is_file() and any(p.name.endswith(s) or p.name.endswith(s + ".gz")
                                                                       for s in LOCAL_SUFFIXES))
    return []


def split_source(spec: TaskSpec, split: str, data_dir: str | None, task_data: dict) -> list[Path] | str:
    """Where a split's rows are: local files (explicit, or the spec's globs under the task's directory: --task_data
    TASK=DIR, else --data_dir, else a user's YAML's own directory), else the spec's hub dataset. One clear error
    naming what was looked for when there is nothing."""
    mine = task_data.get(spec.task, {})
    explicit = mine.get(split)
    root = None
    if isinstance(explicit, list):  # several files of one split (mmlu_test_files)
        missing = [f for f in explicit if not Path(f).expanduser().is_file()]
        if missing:
            raise UserError(f"{missing[0]}: task file not found")
        return [Path(f).expanduser() for f in explicit]
    if explicit is not None:
        p = Path(explicit).expanduser()
        if p.is_file():
            return [p]
        if p.is_dir():
            files = _find(p, spec.data_files.get(split, [])) or _find(p, [])
            if not files:
                raise UserError(f"task_data {spec.task}.{split}: {p} holds no data files")
            return files
        hits = sorted(Path().glob(explicit)) if any(ch in explicit for ch in "*?[") else []
        if hits:
            return hits
        from alignment.data import looks_local

        if looks_local(explicit):
            raise UserError(f"task_data {spec.task}.{split}: {explicit}: no such file or directory")
        return explicit  # a hub dataset name
    if None in mine:
        p = Path(mine[None]).expanduser()
        if p.is_file():
            if split == spec.eval_split:
                return [p]
            root = None
        elif p.is_dir():
            root = p
        else:
            raise UserError(f"task_data {spec.task}: {mine[None]}: no such file or directory")
    elif data_dir:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise UserError(f"data_dir: {data_dir}: not a directory")
    elif spec.path and Path(spec.path).parent.resolve() != TASKS_DIR.resolve() and spec.data_files.get(split):
        root = Path(spec.path).parent  # a user's spec: its data_files are relative to the YAML itself
    if root is not None:
        files = _find(root, spec.data_files.get(split, []))
        if files:
            return files
    if spec.dataset_path and root is None and None not in mine:
        return spec.dataset_path
    looked = ", ".join(spec.data_files.get(split, [])) or "data files"
    raise UserError(f"{spec.task}: no {split!r} split found{f' under {root}' if root else ''} (looked for {looked}); "
                    f"give --task_data {spec.task}=DIR or --task_data {spec.task}.{split}=FILE")


def read_split(spec: TaskSpec, source: list[Path] | str, split: str) -> list[dict]:
    """Documents of one split: rows in one of the spec's layouts, mapped to the task's fields, then process_docs.
    Each document remembers its place (`_where`) for error messages."""
    from alignment.data import read_file_rows, read_rows

    docs = []
    if isinstance(source, str):  # a hub dataset: the rows are in the hub layout
        import inspect

        # alignment.data.read_rows takes the hub configuration once it has a `config` parameter (asked of the lead)
        kw = {"config": spec.dataset_name} if "config" in inspect.signature(read_rows).parameters else {}
        rows = read_rows(source, split, **kw)
        layout = _detect(spec, rows, Path(source)) if spec.layouts else None
        for r in rows:
            docs.append(_map_row(spec, layout, r.data, r.where, Path(source)))
    else:
        for path in source:
            rows = read_file_rows(path)
            layout = None
            if spec.layouts:
                layout = _detect(spec, rows, path)
                if layout.csv_fieldnames:
                    rows = read_file_rows(path, fieldnames=layout.csv_fieldnames)
            labels = _sibling_labels(path, layout, len(rows)) if layout and layout.labels_file else None
            for i, r in enumerate(rows):
                data = dict(r.data) if isinstance(r.data, dict) else r.data
                if labels is not None:
                    data[layout.labels_file["field"]] = labels[i]
                docs.append(_map_row(spec, layout, data, r.where, path))
    if not docs:
        raise UserError(f"{spec.task}: the {split!r} split has no rows")
    return docs


def _csv_width(path: Path) -> int:
    """Cells in a CSV file's first record (a headerless file's first row is data, so its names can repeat)."""
    import csv
    import io

    from alignment.data import read_text

    return len(next(csv.reader(io.StringIO(read_text(path))), []))


def _detect(spec: TaskSpec, rows: list, path: Path) -> Layout:
    """The first of the spec's layouts the file's first row fits (a headerless CSV layout: by its number of cells)."""
    data = rows[0].data if rows and isinstance(rows[0].data, dict) else {}
    for layout in spec.layouts:
        if layout.csv_fieldnames:
            if _base_suffix(path) == ".csv" and _csv_width(path) == len(layout.csv_fieldnames):
                return layout
        elif rows and layout.matches(data, path):
            return layout
    if not rows:
        raise UserError(f"{path}: no rows; expected a {spec.task} file")
    row = rows[0]
    found = ", ".join(sorted(map(str, data))) if data else type(row.data).__name__
    raise UserError(f"{row.where}: {spec.task}: fields found: {found}; expected one of the layouts: "
                    + "; ".join(lay.describe() for lay in spec.layouts))


def _base_suffix(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).suffix.lower()


def _sibling_labels(path: Path, layout: Layout, n: int) -> list[int]:
    from alignment.data import read_text

    lp = _labels_path(path, layout.labels_file)
    lines = [ln.strip() for ln in read_text(lp).splitlines() if ln.strip()]
    if len(lines) != n:
        raise UserError(f"{lp}: {len(lines)} labels for the {n} rows of {path.name}; expected one label per row")
    out = []
    for i, ln in enumerate(lines, 1):
        if not ln.lstrip("-").isdigit():
            raise UserError(f"{lp}:{i}: label {ln!r}; expected an integer")
        out.append(int(ln))
    return out


def _map_row(spec: TaskSpec, layout: Layout | None, data, where: str, path: Path) -> dict:
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a JSON object (a mapping of fields), got {type(data).__name__}")
    doc = dict(data)
    if layout is not None:
        missing = [p for p in layout.requires if not has_path(data, p)]
        if missing:
            raise UserError(f"{where}: {spec.task}: missing {', '.join(missing)} of the layout {layout.name}")
        doc.update(spec.evaluate_fields(layout.fields, {**data, "file_stem": _file_stem(path)}, where))
    doc.update(spec.evaluate_fields(spec.process_docs, doc, where, sequential=True))
    doc["_where"], doc["_file"] = where, str(path)
    return doc


BOOKKEEPING = ("_where", "_file")


def public(doc: dict) -> dict:
    """A document without its bookkeeping (what is hashed, compared and shown)."""
    return {k: v for k, v in doc.items() if k not in BOOKKEEPING}


# ---------------------------------------------------------------------------------------------------- few-shot


class FewshotSampler:
    """lm-eval's samplers: `first_n` takes the first n; `default` draws with one Random(seed) per task, in document
    order, n + 1 then drops the scored document when shots come from the scored split."""

    def __init__(self, pool: list[dict], sampler: str, exclude_eval_doc: bool, seed: int = FEWSHOT_SEED):
        self.pool = pool
        self.sampler = sampler
        self.exclude = exclude_eval_doc
        self.rnd = random.Random(seed)

    def sample(self, n: int, doc: dict) -> list[dict]:
        if n == 0:
            return []
        eq = lambda a, b: public(a) == public(b)  # noqa: E731 - lm-eval compares documents with ==
        if self.sampler == "first_n":
            pool = [x for x in self.pool if not eq(x, doc)] if self.exclude else self.pool
            return pool[:n]
        if not self.exclude:
            return self.rnd.sample(self.pool, n)
        res = [x for x in self.rnd.sample(self.pool, n + 1) if not eq(x, doc)][:n]
        if len(res) < n:  # duplicates of the scored document were drawn: draw again from the rest (lm-eval)
            res = self.rnd.sample([x for x in self.pool if not eq(x, doc)], n)
        return res


@dataclass
class TaskData:
    """One scored task (a subtask of a spec with `subtasks`): its documents, each one's shots, where they came from."""

    spec: TaskSpec
    name: str
    docs: list[dict]
    shots: list[list[dict]]
    num_fewshot: int
    source: str
    pool: list[dict] = field(default_factory=list)  # where the shots were drawn from
    group: str | None = None


def effective_fewshot(spec: TaskSpec, requested: int | None) -> int:
    """lm-eval's rule: a spec that fixes num_fewshot: 0 keeps it; otherwise the request, else the spec's default."""
    if spec.num_fewshot == 0:
        return 0
    return requested if requested is not None else (spec.num_fewshot or 0)


def load_task(spec: TaskSpec, data_dir: str | None = None, task_data: dict | None = None,
              num_fewshot: int | None = None, limit: int | None = None, subtasks: list[str] | None = None,
              seed: int = FEWSHOT_SEED) -> list[TaskData]:
    """Read a spec's scored split (and its few-shot split when shots are asked for) and draw every document's shots,
    before any model work; returns one TaskData per subtask (or one)."""
    task_data = task_data or {}
    n = effective_fewshot(spec, num_fewshot)
    src = split_source(spec, spec.eval_split, data_dir, task_data)
    docs = read_split(spec, src, spec.eval_split)
    pool: list[dict] = []
    if n > 0:
        if spec.samples is not None:
            pool = [dict(s, _where=f"{spec.path}: fewshot_config.samples[{i}]") for i, s in enumerate(spec.samples)]
        elif spec.shots_split == spec.eval_split:
            pool = docs
        else:
            pool = read_split(spec, split_source(spec, spec.shots_split, data_dir, task_data), spec.shots_split)
    groups = _group(spec, docs, subtasks)
    pools = _group(spec, pool, None) if spec.subtasks else {None: pool}
    out = []
    for key, group_docs in groups.items():
        scored = group_docs[:limit] if limit else group_docs
        shots_pool = pools.get(key, []) if spec.subtasks else pool
        need = n + 1 if spec.exclude_eval_doc and spec.sampler == "default" else n
        if n and len(shots_pool) < need:
            where = f"{spec.task}" + (f"_{key}" if key is not None else "")
            most = max(0, len(shots_pool) - (need - n))
            raise UserError(f"{where}: num_fewshot={n} but the few-shot split {spec.shots_split!r} has "
                            f"{len(shots_pool)} documents; expected at most {most} shots")
        sampler = FewshotSampler(shots_pool, spec.sampler, spec.exclude_eval_doc, seed)
        shots = [sampler.sample(n, d) for d in scored]
        for d, s in zip(scored, shots):  # every template, choice list and label checked before any model work
            spec.turns(d, s)
            if spec.output_type == "multiple_choice":
                spec.gold(d, spec.choices(d))
        if spec.sampler == "first_n" and any(len(s) < n for s in shots):
            raise UserError(f"{spec.task}: num_fewshot={n} but the few-shot split has fewer documents besides the "
                            "scored one")
        name = spec.task if key is None else f"{spec.task}_{key}"
        source = src if isinstance(src, str) else ", ".join(dict.fromkeys(d["_file"] for d in group_docs))
        group = spec.task if key is not None else None
        out.append(TaskData(spec, name, scored, shots, n, source, shots_pool, group=group))
    return out


def _group(spec: TaskSpec, docs: list[dict], only: list[str] | None) -> dict:
    if not spec.subtasks:
        return {None: docs}
    groups: dict = {}
    for d in docs:
        if spec.subtasks not in d:
            raise UserError(f"{_where(d)}: {spec.task}: no {spec.subtasks!r} field to group subtasks by")
        groups.setdefault(str(d[spec.subtasks]), []).append(d)
    if only:
        missing = [s for s in only if s not in groups]
        if missing:
            raise UserError(f"{spec.task}: {spec.subtasks} {', '.join(missing)} not found; available: "
                            f"{', '.join(sorted(groups))}")
        groups = {k: groups[k] for k in only}
    return {k: groups[k] for k in sorted(groups)}
