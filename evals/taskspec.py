"""Tasks as data: a YAML per task names its files and fields, the prompt, choices, target, few-shot rule and metrics.

    align eval --model runs/base --tasks arc_challenge,hellaswag --data_dir ~/evaldata
    align eval --model runs/base --tasks my_task.yaml --task_data my_task=data/my_task.jsonl

Built-in specs live in evals/tasks/<name>.yaml; a user's task is any YAML file with the same keys. The keys are those of
lm-evaluation-harness 0.4.13's task YAMLs with the same meaning (`doc_to_text`, `doc_to_choice`, `doc_to_target` as a
field name, a Jinja template or a literal; `description`, `target_delimiter`, `fewshot_delimiter`, the splits,
`fewshot_config.sampler`, `num_fewshot`, `metric_list`, `generation_kwargs`, `filter_list`, `include`), so lm-eval's
prompt text can be pasted in. lm-eval's Python hooks (`!function`) are data here too, as Jinja expressions:
- `layouts`: the public file layouts a task reads, each with the fields it requires and expressions that turn its rows
  into the task's fields (the original ARC JSONL's question.stem becomes the hub layout's question);
- `process_docs`: new fields computed per document (hellaswag's clean-up, winogrande's contexts);
- `process_results: {true_probability_mass: EXPR}`: truthfulqa_mc2's normalised probability on the true answers;
- `subtasks: FIELD`: one task per value of a field (MMLU's subjects), few-shot examples from the same value.
A task's files come from `data_files` globs under a directory the user names, or a hub dataset (`dataset_path`).
"""

from __future__ import annotations

import ast
import difflib
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path

from alignment.errors import UserError

TASKS_DIR = Path(__file__).parent / "tasks"
OUTPUT_TYPES = ("multiple_choice", "generate_until")
METRICS = {"multiple_choice": ("acc", "acc_norm", "acc_bytes", "exact_match"), "generate_until": ("exact_match",)}
FILTERS = ("regex", "take_first", "remove_whitespace")
FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default generation length

# every key a spec may hold, with what it means (an unknown key is an error naming the closest of these)
KEYS = {
    "task": "the task's name", "version": "the spec's version (bump when prompt, data rule or metric change)",
    "include": "a spec file (relative to this one) whose keys this one extends", "scoring": "a label for reports",
    "output_type": "multiple_choice or generate_until", "description": "a template put before the shots",
    "dataset_path": "hub dataset name, used when no local files are given", "dataset_name": "its configuration",
    "data_files": "split -> globs of local files, relative to the task's data directory",
    "layouts": "accepted file layouts",
    "process_docs": "field -> Jinja expression, computed per document", "subtasks": "a field whose values are tasks",
    "training_split": "split name", "validation_split": "split name", "test_split": "split name",
    "fewshot_split": "split the shots come from", "fewshot_config": "sampler (default, first_n) and samples",
    "num_fewshot": "default number of shots", "doc_to_text": "the question", "doc_to_target": "the answer",
    "doc_to_choice": "the choices", "target_delimiter": "between question and answer",
    "fewshot_delimiter": "after a shot",
    "metric_list": "metrics", "generation_kwargs": "until, max_gen_toks, do_sample, temperature",
    "filter_list": "answer extraction before the metric", "process_results": "true_probability_mass: EXPR",
    "metadata": "lm-eval's metadata (version)", "tag": "ignored (lm-eval's task groups)", "repeats": "must be 1",
    "should_decontaminate": "ignored", "doc_to_decontamination_query": "ignored",
}
LAYOUT_KEYS = ("name", "requires", "fields", "csv_fieldnames", "labels_file")
METRIC_KEYS = ("metric", "aggregation", "higher_is_better", "ignore_case", "ignore_punctuation", "ignore_numbers",
               "regexes_to_ignore")
GENERATION_KEYS = ("until", "max_gen_toks", "do_sample", "temperature")


class DocError(Exception):
    """A document the spec cannot use (raised by `fail` and `choice_index` inside a template)."""


def _fail(message):
    raise DocError(str(message))


def _choice_index(value, *label_sets):
    """The index of `value` in the first label set holding it (labels as a list or a string of characters)."""
    key = str(value).strip()
    for labels in label_sets:
        labels = [str(x) for x in labels]
        if key in labels:
            return labels.index(key)
    raise DocError(f"{value!r} is not one of " + " or ".join(", ".join(map(str, s)) for s in label_sets))


def _regex_replace(string, pattern, repl, count: int = 0):
    return re.sub(pattern, repl, string, count=count)


_ENV = None


def jinja_env():
    """lm-eval's Jinja environment (strict undefined, trailing newline kept, regex_replace), plus fail and
    choice_index."""
    global _ENV
    if _ENV is None:
        from jinja2 import BaseLoader, Environment, StrictUndefined

        _ENV = Environment(loader=BaseLoader(), undefined=StrictUndefined, keep_trailing_newline=True)
        _ENV.filters["regex_replace"] = _regex_replace
        _ENV.filters["choice_index"] = _choice_index
        _ENV.globals["fail"] = _fail
    return _ENV


@functools.lru_cache(maxsize=512)
def _compiled(source: str, expression: bool):
    """A compiled template or expression (compiling costs far more than rendering; specs reuse a handful)."""
    env = jinja_env()
    return env.compile_expression(source, undefined_to_none=False) if expression else env.from_string(source)


@functools.lru_cache(maxsize=64)
def _sequence(items: tuple) -> object:
    """One template that sets each (name, expression) in turn; its module holds the values."""
    return jinja_env().from_string("".join(f"{{% set {k} = ({e}) %}}" for k, e in items))


def _force(value):
    """Raise the error of any undefined value inside a native result (compile_expression returns it silently)."""
    from jinja2 import Undefined

    if isinstance(value, Undefined):
        str(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _force(v)
    elif isinstance(value, dict):
        for v in value.values():
            _force(v)
    return value


@dataclass
class Layout:
    """One accepted file layout: the fields its rows hold and how they become the task's fields."""

    name: str
    requires: list[str] = field(default_factory=list)
    fields: dict[str, str] = field(default_factory=dict)
    csv_fieldnames: list[str] | None = None  # a CSV without a header row
    labels_file: dict | None = None  # {suffix, field}: labels in a sibling file, one per line (PIQA's X-labels.lst)

    def matches(self, row: dict, path: Path) -> bool:
        if self.labels_file and not _labels_path(path, self.labels_file).is_file():
            return False
        return all(has_path(row, p) for p in self.requires)

    def describe(self) -> str:
        extra = f" + {self.labels_file['suffix']} beside the file" if self.labels_file else ""
        return f"{self.name} ({', '.join(self.requires or self.csv_fieldnames or [])}{extra})"


def has_path(row, dotted: str) -> bool:
    """Whether `row` holds the dotted field path (question.stem)."""
    cur = row
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return False
        cur = cur[part]
    return True


def _labels_path(path: Path, spec: dict) -> Path:
    return path.with_name(_file_stem(path) + spec["suffix"])


def _file_stem(path: Path) -> str:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return Path(name).stem


@dataclass
class TaskSpec:
    """A parsed, checked task YAML."""

    task: str
    version: str
    output_type: str
    doc_to_text: object
    doc_to_target: object
    metric_list: list[dict]
    doc_to_choice: object = None
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    dataset_path: str | None = None
    dataset_name: str | None = None
    data_files: dict[str, list[str]] = field(default_factory=dict)
    layouts: list[Layout] = field(default_factory=list)
    process_docs: dict[str, str] = field(default_factory=dict)
    training_split: str | None = None
    validation_split: str | None = None
    test_split: str | None = None
    fewshot_split: str | None = None
    sampler: str = "default"
    samples: list[dict] | None = None
    num_fewshot: int | None = None
    generation_kwargs: dict = field(default_factory=dict)
    filter_list: list[dict] = field(default_factory=list)
    process_results: dict | None = None
    subtasks: str | None = None
    scoring: str = ""
    path: str = ""

    # ------------------------------------------------------------------------------------------------ splits

    @property
    def eval_split(self) -> str:
        """The split that is scored: test if the spec names one, else validation (lm-eval's rule)."""
        return self.test_split or self.validation_split

    @property
    def shots_split(self) -> str | None:
        """Where shots come from: fewshot_split, else training, else validation, else the scored split (lm-eval)."""
        return self.fewshot_split or self.training_split or self.validation_split or self.test_split

    @property
    def exclude_eval_doc(self) -> bool:
        """lm-eval drops the scored document from its shots when fewshot_split equals test_split (both unset counts)."""
        return self.fewshot_split == self.test_split

    # ------------------------------------------------------------------------------------------------ templates

    def error(self, doc: dict, message: str) -> UserError:
        """A one-line error naming the document's place and the task."""
        return UserError(f"{_where(doc)}: {self.task}: {message}")

    def evaluate(self, expr: str, variables: dict, key: str, where: str):
        """A Jinja expression's native value (a list stays a list); errors name the row and the key."""
        try:
            return _force(_compiled(expr, True)(**variables))
        except DocError as e:
            raise UserError(f"{where}: {key} {e}") from None
        except Exception as e:  # noqa: BLE001 - any failure of a user's expression on a user's row is a data error
            raise UserError(f"{where}: {self.task}: {key} {expr!r} failed on this row "
                            f"({type(e).__name__}: {e})") from None

    def evaluate_fields(self, exprs: dict[str, str], variables: dict, where: str, sequential: bool = False) -> dict:
        """Several expressions on one row in one Jinja context (each alone costs a context): all on the same
        variables, or `sequential`ly, each seeing the fields before it. A failure is reported as `evaluate` does."""
        if not exprs:
            return {}
        try:
            if sequential:
                module = _sequence(tuple(exprs.items())).make_module(variables)
                return _force({k: getattr(module, k) for k in exprs})
            values = _compiled("[" + ", ".join(f"({e})" for e in exprs.values()) + "]", True)(**variables)
            return _force(dict(zip(exprs, values)))
        except Exception:  # noqa: BLE001 - evaluate one by one, so the error names the field that failed
            seen, out = dict(variables), {}
            for k, e in exprs.items():
                out[k] = self.evaluate(e, seen if sequential else variables, k, where)
                seen[k] = out[k]
            return out

    def render(self, template: str, doc: dict, key: str):
        """A Jinja template rendered on a document (lm-eval's apply_template)."""
        try:
            return _compiled(template, False).render(**doc)
        except DocError as e:
            raise UserError(f"{_where(doc)}: {self.task} {key}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise self.error(doc, f"{key} failed on this document ({type(e).__name__}: {e})") from None

    def text(self, doc: dict):
        """doc_to_text with lm-eval's semantics: a field, a template (all digits + choices -> an int), or an int."""
        v = self.doc_to_text
        if isinstance(v, int) or not isinstance(v, str):
            return v
        if v in doc:
            return doc[v]
        s = self.render(v, doc, "doc_to_text")
        return ast.literal_eval(s) if s.isdigit() and self.doc_to_choice is not None else s

    def target(self, doc: dict):
        """doc_to_target with lm-eval's semantics (a digit string with choices is an index; "[..]" a list)."""
        v = self.doc_to_target
        if not isinstance(v, str):
            return v
        if v in doc:
            return doc[v]
        s = self.render(v, doc, "doc_to_target")
        if s.isdigit() and self.doc_to_choice is not None:
            return ast.literal_eval(s)
        if len(s) >= 2 and s[0] == "[" and s[-1] == "]":
            try:
                return ast.literal_eval(s)
            except (SyntaxError, ValueError):
                return s
        return s

    def choices(self, doc: dict) -> list[str]:
        """doc_to_choice: a field, a template rendering a Python list, or a literal list; checked non-empty strings."""
        v = self.doc_to_choice
        if isinstance(v, str):
            if v in doc:
                out = doc[v]
            else:
                s = self.render(v, doc, "doc_to_choice")
                try:
                    out = ast.literal_eval(s)
                except (SyntaxError, ValueError):
                    raise self.error(doc, f"doc_to_choice rendered {s[:80]!r}; expected a list") from None
        elif isinstance(v, dict):
            out = list(v.values())
        else:
            out = v
        if not isinstance(out, (list, tuple)) or not out:
            raise self.error(doc, f"no choices ({out!r}); expected a non-empty list of strings")
        if not all(isinstance(c, str) for c in out):
            raise self.error(doc, f"choices {out!r}; expected strings")
        return list(out)

    def gold(self, doc: dict, choices: list[str]) -> int:
        """The index of the right choice (a target index, or the text of a choice); refused when outside the choices."""
        g = self.text(doc) if self.multiple_input(doc) else self.target(doc)
        if isinstance(g, str) and not self.multiple_input(doc):
            if g not in choices:
                raise self.error(doc, f"target {g!r} is not one of the {len(choices)} choices")
            g = choices.index(g)
        if isinstance(g, list):
            raise self.error(doc, f"doc_to_target gave a list {g!r}; expected one answer (several are not supported)")
        if isinstance(g, bool) or not isinstance(g, int) or not 0 <= g < len(choices):
            raise self.error(doc, f"label {g!r} is outside the {len(choices)} choices; expected 0-{len(choices) - 1}")
        return g

    def multiple_input(self, doc: dict) -> bool:
        """lm-eval's 'multiple inputs' (winogrande): doc_to_text gives an int, each choice is a context."""
        return self.output_type == "multiple_choice" and isinstance(self.text(doc), int)

    # ------------------------------------------------------------------------------------------------ prompts

    def turns(self, doc: dict, shots: list[dict]) -> list[list[tuple[str, str, str]]]:
        """The prompt as (role, content, delimiter) turns, as lm-eval's fewshot_context builds it: the description
        (system), each shot as question + target delimiter and answer + few-shot delimiter, then the question.
        One list per context: several for multiple-input tasks (one per choice), else one."""
        head: list[tuple[str, str, str]] = []
        desc = ""
        if self.description:
            d = self.description
            desc = doc[d] if d in doc else self.render(d, doc, "description")
        if desc:
            head.append(("system", desc, ""))
        for s in shots:
            q = self.text(s)
            c = self.choices(s) if self.doc_to_choice is not None else None
            a = self.target(s)
            if isinstance(q, int) and c is not None:  # multiple inputs: the shot's context is its right choice
                q, c = c[q], None
            head += _qa_turns(q, c, a, self.target_delimiter, self.fewshot_delimiter)
        q = self.text(doc)
        if self.multiple_input(doc):
            return [head + [("user", ctx, "")] for ctx in self.choices(doc)]
        return [head + [("user", str(q), "")]]


def _where(doc: dict) -> str:
    return doc.get("_where", "document") if isinstance(doc, dict) else "document"


def _qa_turns(q, c, a, tgt_delim: str, few_delim: str) -> list[tuple[str, str, str]]:
    """One shot (lm-eval's build_qa_turn without gen_prefix): the question, then the answer when there is one."""
    if a is None or a == "":
        return [("user", str(q), "")]
    answer = c[a] if c and isinstance(a, int) else a[0] if isinstance(a, list) else a
    return [("user", str(q), tgt_delim), ("assistant", str(answer), few_delim)]


def plain_text(turns: list[tuple[str, str, str]]) -> str:
    """The prompt as one string: each turn's content followed by its delimiter."""
    return "".join(c + d for _, c, d in turns)


def chat_messages(turns: list[tuple[str, str, str]], multiturn: bool) -> list[dict]:
    """The prompt as chat messages: shots as user/assistant turns, or (not multiturn) folded into one user message
    after the system message, as lm-eval's multiturn_to_singleturn does."""
    if multiturn:
        return [{"role": r, "content": c} for r, c, _ in turns]
    system = [{"role": "system", "content": turns[0][1]}] if turns[0][0] == "system" else []
    rest = turns[len(system):]
    return system + [{"role": "user", "content": plain_text(rest[:-1]) + rest[-1][1]}]


# ---------------------------------------------------------------------------------------------------- loading specs


def builtin_tasks() -> list[str]:
    """Names of the specs shipped in evals/tasks/."""
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def is_spec_name(name: str) -> bool:
    """A built-in spec name or a path to a task YAML."""
    return name in builtin_tasks() or name.endswith((".yaml", ".yml"))


def _read_yaml(path: Path, stack: tuple = ()) -> dict:
    """A spec's keys, its `include` (relative to it) merged under them."""
    import yaml

    from alignment.data import read_text

    if path in stack:
        raise UserError(f"{path}: include loops back to itself")
    if not path.is_file():
        raise UserError(f"{path}: task spec not found; expected a YAML file or one of {', '.join(builtin_tasks())}")
    try:
        raw = yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else "?"
        raise UserError(f"{path}:{line}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a YAML mapping of task keys, got {type(raw).__name__}")
    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), list(KEYS), n=1)
        raise UserError(f"{path}: unknown key {unknown[0]!r}" + (f"; did you mean {close[0]!r}?" if close else
                                                                 f"; expected keys: {', '.join(KEYS)}"))
    if "include" in raw:
        base = _read_yaml(path.parent / str(raw["include"]), stack + (path,))
        raw = {**base, **{k: v for k, v in raw.items() if k != "include"}}
    return raw


def load_spec(name_or_path: str) -> TaskSpec:
    """A built-in spec by name (evals/tasks/<name>.yaml) or a user's YAML file, checked: unknown or missing keys,
    wrong types, unknown metrics and filters, and template syntax are one error naming the file and key."""
    p = Path(name_or_path)
    path = p if name_or_path.endswith((".yaml", ".yml")) else TASKS_DIR / f"{name_or_path}.yaml"
    raw = _read_yaml(path)
    where = str(path)
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    version = raw.get("version", meta.get("version"))
    missing = [k for k in ("task", "output_type", "doc_to_text", "doc_to_target", "metric_list") if raw.get(k) is None]
    if version is None:
        missing.append("version")
    if raw.get("output_type") == "multiple_choice" and raw.get("doc_to_choice") is None:
        missing.append("doc_to_choice")
    if not (raw.get("test_split") or raw.get("validation_split")):
        missing.append("test_split (or validation_split)")
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}; a task spec needs task, version, output_type, "
                        "doc_to_text, doc_to_target, metric_list, a test or validation split (and doc_to_choice for "
                        "multiple_choice)")
    if raw["output_type"] not in OUTPUT_TYPES:
        raise UserError(f"{where}: output_type {raw['output_type']!r}; expected one of {', '.join(OUTPUT_TYPES)}")
    if raw.get("repeats", 1) != 1:
        raise UserError(f"{where}: repeats {raw['repeats']!r}; expected 1 (greedy answers do not repeat)")
    fs = raw.get("fewshot_config") or {}
    if (not isinstance(fs, dict) or set(fs) - {"sampler", "samples"}
            or fs.get("sampler", "default") not in ("default", "first_n")):
        raise UserError(f"{where}: fewshot_config {fs!r}; expected {{sampler: default | first_n, "
                        "samples: [documents]}}")
    spec = TaskSpec(
        task=_str(raw, "task", where), version=str(version), output_type=raw["output_type"],
        doc_to_text=raw["doc_to_text"], doc_to_target=raw["doc_to_target"], doc_to_choice=raw.get("doc_to_choice"),
        metric_list=_metrics(raw, where), description=raw.get("description") or "",
        target_delimiter=_str(raw, "target_delimiter", where, " "),
        fewshot_delimiter=_str(raw, "fewshot_delimiter", where, "\n\n"), dataset_path=raw.get("dataset_path"),
        dataset_name=raw.get("dataset_name"), data_files=_data_files(raw, where), layouts=_layouts(raw, where),
        process_docs=_expressions(raw, "process_docs", where), training_split=raw.get("training_split"),
        validation_split=raw.get("validation_split"), test_split=raw.get("test_split"),
        fewshot_split=raw.get("fewshot_split"), sampler=fs.get("sampler", "default"), samples=fs.get("samples"),
        num_fewshot=raw.get("num_fewshot"), generation_kwargs=_generation(raw, where), filter_list=_filters(raw, where),
        process_results=raw.get("process_results"), subtasks=raw.get("subtasks"),
        scoring=str(raw.get("scoring") or raw["output_type"]), path=where)
    if spec.num_fewshot is not None and (not isinstance(spec.num_fewshot, int) or spec.num_fewshot < 0):
        raise UserError(f"{where}: num_fewshot {spec.num_fewshot!r}; expected an integer >= 0")
    if spec.process_results is not None and (not isinstance(spec.process_results, dict)
                                             or set(spec.process_results) != {"true_probability_mass"}):
        raise UserError(f"{where}: process_results {spec.process_results!r}; expected "
                        "{true_probability_mass: EXPRESSION}")
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice", "description"):
        v = getattr(spec, key)
        if isinstance(v, str) and ("{{" in v or "{%" in v):
            _compile(v, f"{where}: {key}")
    return spec


def _str(raw: dict, key: str, where: str, default=None) -> str:
    v = raw.get(key, default)
    if not isinstance(v, str):
        raise UserError(f"{where}: {key} {v!r}; expected a string")
    return v


def _compile(template: str, where: str, expression: bool = False):
    from jinja2 import TemplateSyntaxError

    try:
        return _compiled(template, expression)
    except TemplateSyntaxError as e:
        kind = "expression" if expression else "template"
        raise UserError(f"{where}: not a valid Jinja {kind} ({e.message})") from None


def _expressions(raw: dict, key: str, where: str) -> dict[str, str]:
    v = raw.get(key) or {}
    if not isinstance(v, dict) or not all(isinstance(e, str) for e in v.values()):
        raise UserError(f"{where}: {key}: expected a mapping of field name to Jinja expression")
    for name, expr in v.items():
        _compile(expr, f"{where}: {key}.{name}", expression=True)
    return dict(v)


def _data_files(raw: dict, where: str) -> dict[str, list[str]]:
    v = raw.get("data_files") or {}
    if not isinstance(v, dict):
        raise UserError(f"{where}: data_files: expected a mapping of split name to a list of globs")
    out = {}
    for split, globs in v.items():
        globs = [globs] if isinstance(globs, str) else globs
        if not isinstance(globs, list) or not all(isinstance(g, str) for g in globs):
            raise UserError(f"{where}: data_files.{split}: expected a list of globs")
        out[str(split)] = globs
    return out


def _layouts(raw: dict, where: str) -> list[Layout]:
    v = raw.get("layouts") or []
    if not isinstance(v, list):
        raise UserError(f"{where}: layouts: expected a list of {{name, requires, fields}}")
    out = []
    for i, item in enumerate(v):
        if not isinstance(item, dict) or "name" not in item or set(item) - set(LAYOUT_KEYS):
            bad = sorted(set(item) - set(LAYOUT_KEYS)) if isinstance(item, dict) else item
            raise UserError(f"{where}: layouts[{i}]: {bad!r}; expected keys {', '.join(LAYOUT_KEYS)} (name required)")
        lab = item.get("labels_file")
        if lab is not None and (not isinstance(lab, dict) or set(lab) != {"suffix", "field"}):
            raise UserError(f"{where}: layouts[{i}].labels_file: expected {{suffix, field}}")
        out.append(Layout(name=str(item["name"]), requires=list(item.get("requires") or []),
                          fields=_expressions(item, "fields", f"{where}: layouts[{i}]"),
                          csv_fieldnames=item.get("csv_fieldnames"), labels_file=lab))
    return out


def _metrics(raw: dict, where: str) -> list[dict]:
    v = raw["metric_list"]
    allowed = METRICS[raw["output_type"]] if raw["output_type"] in METRICS else ()
    if not isinstance(v, list) or not v:
        raise UserError(f"{where}: metric_list: expected a non-empty list of {{metric: NAME, ...}}")
    for m in v:
        if not isinstance(m, dict) or "metric" not in m or set(m) - set(METRIC_KEYS):
            raise UserError(f"{where}: metric_list entry {m!r}; expected keys {', '.join(METRIC_KEYS)} "
                            "(metric required)")
        if m["metric"] not in allowed and not raw.get("process_results"):
            raise UserError(f"{where}: metric {m['metric']!r}; expected one of {', '.join(allowed)} for "
                            f"{raw['output_type']}")
        if m.get("aggregation", "mean") != "mean":
            raise UserError(f"{where}: metric {m['metric']}: aggregation {m['aggregation']!r}; expected mean")
    return v


def _generation(raw: dict, where: str) -> dict:
    v = raw.get("generation_kwargs") or {}
    if not isinstance(v, dict) or set(v) - set(GENERATION_KEYS):
        raise UserError(f"{where}: generation_kwargs {v!r}; expected keys {', '.join(GENERATION_KEYS)}")
    if v.get("do_sample") or float(v.get("temperature") or 0.0) != 0.0:
        raise UserError(f"{where}: generation_kwargs: only greedy decoding (do_sample: false, temperature: 0) "
                        "is supported")
    until = v.get("until", [raw.get("fewshot_delimiter", "\n\n")])  # lm-eval's default stop is the few-shot delimiter
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(u, str) for u in until):
        raise UserError(f"{where}: generation_kwargs.until: expected a list of strings")
    n = v.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if not isinstance(n, int) or n < 1:
        raise UserError(f"{where}: generation_kwargs.max_gen_toks {n!r}; expected an integer >= 1")
    return {"until": until, "max_gen_toks": n}


def _filters(raw: dict, where: str) -> list[dict]:
    v = raw.get("filter_list") or []
    if not isinstance(v, list):
        raise UserError(f"{where}: filter_list: expected a list of {{name, filter: [{{function, ...}}]}}")
    for f in v:
        if not isinstance(f, dict) or set(f) != {"name", "filter"} or not isinstance(f["filter"], list):
            raise UserError(f"{where}: filter_list entry {f!r}; expected {{name, filter: [{{function, ...}}]}}")
        for step in f["filter"]:
            if not isinstance(step, dict) or step.get("function") not in FILTERS:
                raise UserError(f"{where}: filter {f['name']}: {step!r}; expected functions {', '.join(FILTERS)}")
            if step["function"] == "regex":
                try:
                    re.compile(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))
                except re.error as e:
                    raise UserError(f"{where}: filter {f['name']}: regex_pattern: {e}") from None
    return v
