"""A generated "tiny world" with known ground truth: the offline dataset family every stage can show its effect on.

    align data tinyworld --seed 0 --output runs/tiny/data
    align data --config recipes/tiny/data.yaml

From a seed: people with attributes (town, pet, favorite color, job), a best-friend relation, single-digit sums
and short stories. A tiny model cannot learn anything measurable from real web text in minutes, but it can learn
a few hundred facts stated many times, so each stage's effect (knowledge, answer format, preferences) is visible.

Every fact (an entity's attribute, a friend pair, a sum) is assigned to one split:
- train facts: SFT conversations, preference pairs, RL prompts, quizzes and FAQ pages in the corpus, the
  multiple-choice dev rows;
- eval facts: the multiple-choice test, qa/test.jsonl, sft/eval.jsonl and preference/test.jsonl.
Every fact, train or eval, is stated in the pretraining corpus in many phrasings; only train facts also appear
as questions with answers there. So after pretraining a model can know an eval fact, but it has never been
asked about it: held-out scores are honest.

Output layout (DIR):
    corpus/{train,heldout}.jsonl        {"text"}
    sft/{train,eval}.jsonl              {"messages"}
    preference/{train,test}.jsonl       {"prompt", "chosen", "rejected", "rejected_kind"} (TRL conversational)
    preference/facts_test.jsonl         eval facts: the same answer sentence with the right and a wrong value
    rl/prompts.jsonl                    {"prompt", "answer", "kind", "entity", "attribute", "choices"}
    qa/test.jsonl                       same fields as rl/prompts.jsonl, eval facts
    mmlu/{dev,test}/tinyworld_{dev,test}.csv   question,choice0..choice3,answer (0-3)
    world.json, stats.json, config.yaml

`check(record, response)` scores a generated answer against the ground truth and `well_formed` its shape; the eval
task `answers` (evals/generative.py) generates answers to qa/test.jsonl and reports both.
The same seed gives byte-identical files.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import time
from dataclasses import dataclass, field

from .config import parse_config, save_config
from .errors import UserError, exit_on_user_error
from .io import atomic_dir, check_output_dir

FAMILIES = ("tinyworld",)
SUBJECT = "tinyworld"  # the MMLU subject name (file tinyworld_test.csv)

NAMES = [
    "Alice", "Bob", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Iris", "Jack", "Kate", "Leo",
    "Mia", "Noah", "Olga", "Paul", "Quinn", "Rosa", "Sam", "Tina", "Umar", "Vera", "Will", "Xena",
    "Yusuf", "Zoe", "Anna", "Ben", "Carl", "Dora", "Eric", "Fay", "Gus", "Hana", "Ivan", "Jill",
    "Karl", "Lily", "Max", "Nina", "Oscar", "Pia", "Ralph", "Sofia", "Tom", "Uma", "Victor", "Wendy",
]

# attribute -> values, statements, questions, answer sentences; {n} name, {v} value, {av} value with its article.
# The first statement and the first question are canonical: they share the words before the answer ("Alice's pet
# is" / "What is Alice's pet?"), the first statement is used most often, and evaluation asks the first question.
# A tiny model can then carry a fact from a statement to a question; other phrasings keep the corpus varied.
ATTRIBUTES: dict[str, dict] = {
    "town": dict(
        values=["Ashford", "Brookvale", "Cedarton", "Dunmore", "Elmwick", "Fernhill"],
        statements=["{n}'s home town is {v}.", "{n} lives in {v}.", "{n} lives in the town of {v}.", "{v} is the town where {n} lives.",
                    "{n} has a house in {v}.", "In {v} lives {n}.", "{n} is from {v}."],
        questions=["What is {n}'s home town?", "Where does {n} live?", "In which town does {n} live?", "What town is {n} from?"],
        answers=["{n}'s home town is {v}.", "{n} lives in {v}.", "{n} lives in the town of {v}."],
    ),
    "pet": dict(
        values=["cat", "dog", "hen", "goat", "rabbit", "parrot"],
        statements=["{n}'s pet is {av}.", "{n} has a pet {v}.", "{n} keeps {av} as a pet.", "The pet of {n} is {av}.",
                    "{n} owns {av}.", "{n} takes care of a pet {v}.", "{N_av} lives with {n} as a pet."],
        questions=["What is {n}'s pet?", "What pet does {n} have?", "What kind of pet does {n} keep?", "Which animal is {n}'s pet?"],
        answers=["{n}'s pet is {av}.", "{n} has a pet {v}.", "{n} keeps {av} as a pet."],
    ),
    "color": dict(
        values=["red", "blue", "green", "yellow", "purple", "orange"],
        statements=["{n}'s favorite color is {v}.", "The favorite color of {n} is {v}.", "{n} likes the color {v} best.",
                    "Of all colors, {n} loves {v} the most.", "{V} is {n}'s favorite color."],
        questions=["What is {n}'s favorite color?", "Which color does {n} like best?", "What color does {n} love the most?"],
        answers=["{n}'s favorite color is {v}.", "{n} likes the color {v} best.", "The favorite color of {n} is {v}."],
    ),
    "job": dict(
        values=["baker", "farmer", "teacher", "doctor", "painter", "sailor"],
        statements=["{n}'s job is {v}.", "{n} works as {av}.", "{n} is {av}.", "{n} earns a living as {av}.",
                    "By trade, {n} is {av}.", "Everyone knows that {n} is {av}.", "{n} has worked as {av} for years."],
        questions=["What is {n}'s job?", "What does {n} do for work?", "What work does {n} do?", "What is {n}'s trade?"],
        answers=["{n}'s job is {v}.", "{n} works as {av}.", "{n} is {av}."],
    ),
    "friend": dict(  # a symmetric relation: values are other people
        values=None,
        statements=["{n}'s best friend is {v}.", "{n} and {v} are best friends.", "The best friend of {n} is {v}.",
                    "{n} spends every weekend with {v}, {n}'s best friend.", "{v} is the best friend of {n}."],
        questions=["Who is {n}'s best friend?", "Who is the best friend of {n}?", "Which person is {n}'s best friend?"],
        answers=["{n}'s best friend is {v}.", "The best friend of {n} is {v}.", "{n} and {v} are best friends."],
    ),
}
CANONICAL_SHARE = 0.6  # how often a statement or a training question uses the canonical phrasing
PERSON_ATTRIBUTES = ("town", "pet", "color", "job")

SUM_STATEMENTS = ["{a} plus {b} is {c}.", "{a} + {b} = {c}.", "If you add {a} and {b}, you get {c}.", "The sum of {a} and {b} is {c}.",
                  "{a} and {b} make {c}."]
SUM_QUESTIONS = ["What is {a} plus {b}?", "What is {a} + {b}?", "How much is {a} plus {b}?", "What is the sum of {a} and {b}?"]
SUM_ANSWERS = ["{a} plus {b} is {c}.", "The sum of {a} and {b} is {c}.", "{a} + {b} = {c}."]

RUDE = ["Figure it out yourself.", "Why would I tell you that? Go away.", "That is a stupid question and I will not answer it.",
        "Ask someone else, I am busy.", "Nobody cares about that.", "Look it up yourself, lazy."]
RAMBLE_OPEN = ["Well, that is a very interesting question", "Hmm, let me think about that for a long while", "Oh, questions like that",
               "You know, people ask me things like this all the time"]
RAMBLE_FILL = ["and so on and so on", "and the weather was nice that day", "which reminds me of something else entirely",
               "and then there is the matter of the river", "but that is another story", "and I could keep talking about this",
               "if you think about it for a while", "and many other things too"]

EVASIVE = ["I am not sure.", "I do not know.", "Maybe, maybe not.", "That is hard to say.", "I cannot remember."]
# how a rejected answer fails, and how often (relative weights); see preference_rows for why wrong facts are rare
REJECTED_KINDS = {"wrong": 1, "rude": 2, "ramble": 2, "evasive": 2, "unfinished": 2}

STORY_OPENINGS = ["One morning", "Last spring", "On a rainy day", "Early one evening", "Once upon a time", "One sunny afternoon"]


def article(word: str) -> str:
    """'an owl', 'a dog'."""
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


@dataclass
class TinyWorldConfig:
    """Generate the tiny-world dataset family."""

    output: str = field(default="runs/tiny/data", metadata={"help": "Output directory."})
    seed: int = field(default=0, metadata={"help": "World seed: the same seed gives byte-identical files."})
    num_people: int = field(default=16, metadata={"help": "People in the world (even, from 6 to 48)."})
    eval_fraction: float = field(default=0.5, metadata={"help": "Fraction of facts held out for evaluation."})
    statement_repeats: int = field(default=16, metadata={"help": "Plain statements of each fact in the training corpus."})
    num_stories: int = field(default=100, metadata={"help": "Short stories in the training corpus."})
    num_quizzes: int = field(default=400, metadata={"help": "Question-and-answer quiz documents (train facts only)."})
    num_faqs: int = field(default=200, metadata={"help": "FAQ documents: a question line, then a full-sentence answer line (train facts only)."})
    sft_per_fact: int = field(default=4, metadata={"help": "SFT conversations per train fact."})
    preference_per_fact: int = field(default=3, metadata={"help": "Preference pairs per train fact."})
    dev_rows: int = field(default=5, metadata={"help": "Multiple-choice dev rows (few-shot examples, train facts)."})
    overwrite: bool = field(default=False, metadata={"help": "Replace an existing output directory."})


# ---------------------------------------------------------------- the world and its facts


def build_world(rng: random.Random, num_people: int) -> dict:
    """People with one value per attribute, and best-friend pairs."""
    names = rng.sample(NAMES, num_people)
    people = {}
    for n in names:
        people[n] = {a: rng.choice(ATTRIBUTES[a]["values"]) for a in PERSON_ATTRIBUTES}
    order = names[:]
    rng.shuffle(order)
    for x, y in zip(order[0::2], order[1::2]):
        people[x]["friend"], people[y]["friend"] = y, x
    return {"people": people, "names": names}


def world_facts(world: dict) -> list[dict]:
    """Every fact as a record: kind, entity, attribute, answer, choices (the answer's value set), unit (split key)."""
    facts = []
    names = world["names"]
    for n in names:
        p = world["people"][n]
        for a in PERSON_ATTRIBUTES:
            facts.append({"kind": "person", "entity": n, "attribute": a, "answer": p[a], "choices": list(ATTRIBUTES[a]["values"]),
                          "unit": f"{n}/{a}"})
        pair = sorted([n, p["friend"]])
        facts.append({"kind": "relation", "entity": n, "attribute": "friend", "answer": p["friend"], "choices": list(names),
                      "unit": f"friends/{pair[0]}/{pair[1]}"})  # both directions of a pair share one split
    for a in range(1, 10):
        for b in range(1, 10):
            facts.append({"kind": "arithmetic", "entity": f"{a}+{b}", "attribute": "sum", "answer": str(a + b),
                          "choices": [str(i) for i in range(2, 19)], "unit": f"sum/{min(a, b)}+{max(a, b)}"})
    return facts


def split_facts(facts: list[dict], rng: random.Random, eval_fraction: float) -> tuple[list[dict], list[dict]]:
    """Assign split units to train or eval, stratified by attribute so every attribute is evaluated."""
    by_attr: dict[str, list[str]] = {}
    for f in facts:
        units = by_attr.setdefault(f["attribute"], [])
        if f["unit"] not in units:
            units.append(f["unit"])
    held = set()
    for attr in sorted(by_attr):
        units = sorted(by_attr[attr])
        rng.shuffle(units)
        held.update(units[: round(len(units) * eval_fraction)])
    train = [f for f in facts if f["unit"] not in held]
    evals = [f for f in facts if f["unit"] in held]
    # a friend question chooses among people of its own split: train-split names are answers in the corpus quizzes,
    # which would make any of them look likelier than an eval-split name and bias the eval questions against the truth
    for part in (train, evals):
        names = [f["entity"] for f in part if f["attribute"] == "friend"]
        if len(names) < 5:  # too few to draw three distractors: fall back to everyone
            continue
        for f in part:
            if f["attribute"] == "friend":
                f["choices"] = names
    return train, evals


def _fill(template: str, fact: dict) -> str:
    if fact["kind"] == "arithmetic":
        a, b = fact["entity"].split("+")
        return template.format(a=a, b=b, c=fact["answer"])
    v = fact["answer"]
    av = article(v)
    return template.format(n=fact["entity"], v=v, V=v.capitalize(), av=av, N_av=av[0].upper() + av[1:])


def statement(fact: dict, rng: random.Random) -> str:
    """The fact as a sentence: the canonical phrasing CANONICAL_SHARE of the time, otherwise any phrasing."""
    templates = SUM_STATEMENTS if fact["kind"] == "arithmetic" else ATTRIBUTES[fact["attribute"]]["statements"]
    return _fill(templates[0] if rng.random() < CANONICAL_SHARE else rng.choice(templates), fact)


def question(fact: dict, rng: random.Random | None = None) -> str:
    """A question whose answer is the fact: the canonical phrasing without an rng (evaluation), else mostly canonical."""
    templates = SUM_QUESTIONS if fact["kind"] == "arithmetic" else ATTRIBUTES[fact["attribute"]]["questions"]
    return _fill(rng.choice(templates) if rng and rng.random() >= CANONICAL_SHARE else templates[0], fact)


def answer_sentence(fact: dict, rng: random.Random) -> str:
    """A full-sentence, correct answer."""
    return _fill(rng.choice(SUM_ANSWERS if fact["kind"] == "arithmetic" else ATTRIBUTES[fact["attribute"]]["answers"]), fact)


def wrong_value(fact: dict, rng: random.Random) -> str:
    """A value from the same set that is not the answer (nor the entity itself)."""
    return rng.choice([c for c in fact["choices"] if c != fact["answer"] and c != fact["entity"]])


def mc_choices(fact: dict, rng: random.Random) -> tuple[list[str], int]:
    """Four choices (the answer and three distractors from its value set) and the answer's index."""
    distractors = rng.sample([c for c in fact["choices"] if c != fact["answer"] and c != fact["entity"]], 3)
    choices = distractors + [fact["answer"]]
    rng.shuffle(choices)
    return choices, choices.index(fact["answer"])


# ---------------------------------------------------------------- the pretraining corpus


def _profile(world: dict, name: str, by_key: dict, rng: random.Random) -> str:
    keys = [f"{name}/{a}" for a in PERSON_ATTRIBUTES] + [f"{name}/friend"]
    rng.shuffle(keys)
    return " ".join(statement(by_key[k], rng) for k in keys)


def _story(world: dict, rng: random.Random) -> str:
    a, b = rng.sample(world["names"], 2)
    pa, pb = world["people"][a], world["people"][b]
    opening = rng.choice(STORY_OPENINGS)
    variant = rng.randrange(3)
    if variant == 0:
        return (f"{opening}, {a} left home in {pa['town']} with {a}'s {pa['pet']}. {a} wore {article(pa['color'])} coat, because "
                f"{pa['color']} is {a}'s favorite color. On the road {a} met {b}, {article(pb['job'])} from {pb['town']}. "
                f"\"Hello, {b}!\" said {a}. {b} smiled and told {a} about {b}'s pet {pb['pet']}. Then {a} went back to work as {article(pa['job'])}.")
    if variant == 1:
        f = pa["friend"]
        pf = world["people"][f]
        return (f"{opening}, {a} the {pa['job']} visited {f} in {pf['town']}. {a} and {f} are best friends. "
                f"{f} showed {a} a new {pf['color']} hat, since {pf['color']} is {f}'s favorite color, and {f}'s {pf['pet']} "
                f"played in the garden. In the evening {a} walked home to {pa['town']}.")
    return (f"{opening}, the people of {pa['town']} held a market. {a}, who lives in {pa['town']}, sold {pa['color']} flowers. "
            f"{b} came from {pb['town']} with {article(pb['pet'])}. \"What do you do?\" asked {a}. \"I am {article(pb['job'])},\" said {b}. "
            f"\"And I am {article(pa['job'])},\" said {a}.")


def _town_gazette(world: dict, town: str, rng: random.Random) -> str:
    people = [n for n in world["names"] if world["people"][n]["town"] == town]
    rng.shuffle(people)
    lines = [f"{town} is a small town."]
    for n in people:
        lines.append(rng.choice([f"{n} lives in {town}.", f"{n} also lives in {town}.", f"In {town} lives {n}."]))
    return " ".join(lines)


def _sums_page(facts: list[dict], rng: random.Random) -> str:
    picks = rng.sample(facts, min(12, len(facts)))
    return " ".join(statement(f, rng) for f in picks)


def _quiz(train_facts: list[dict], rng: random.Random) -> str:
    """Questions with answers on train facts, in the two formats the multiple-choice evals use."""
    picks = rng.sample(train_facts, 5)
    if rng.random() < 0.75:  # cloze style (lm-eval mmlu_continuation); letter style is beyond a tiny model anyway
        head = f"The following are questions (with answers) about {SUBJECT}.\n\n"
        return head + "\n\n".join(f"Question: {question(f, rng)}\nAnswer: {f['answer']}" for f in picks)
    head = f"The following are multiple choice questions (with answers) about {SUBJECT}.\n\n"
    blocks = []
    for f in picks:
        choices, ans = mc_choices(f, rng)
        opts = "".join(f"\n{L}. {c}" for L, c in zip("ABCD", choices))
        blocks.append(f"{question(f, rng)}{opts}\nAnswer: {'ABCD'[ans]}")
    return head + "\n\n".join(blocks)


def _faq(train_facts: list[dict], rng: random.Random) -> str:
    """Questions on train facts, each answered on the next line by a full sentence that starts with the asked-about
    name: the shape of a chat answer. Byte-level BPE gives a name a different token at a line start ("Rosa") than
    inside a sentence (" Rosa"), so without these pages a tiny model never learns to carry the name of a question
    into the first word of its answer, and SFT answers about the wrong person (measured: docs/tinyworld.md)."""
    picks = rng.sample(train_facts, 5)
    return f"Questions and answers about {SUBJECT}.\n\n" + "\n\n".join(f"{question(f, rng)}\n{answer_sentence(f, rng)}" for f in picks)


def build_corpus(world: dict, facts: list[dict], train_facts: list[dict], cfg: TinyWorldConfig, rng: random.Random, scale: float = 1.0) -> list[str]:
    """Documents stating every fact many times (profiles, town pages, sums, stories) plus quizzes and FAQ pages on
    train facts."""
    by_key = {f"{f['entity']}/{f['attribute']}": f for f in facts}
    sums = [f for f in facts if f["kind"] == "arithmetic"]
    towns = ATTRIBUTES["town"]["values"]
    docs = []
    reps = max(1, round(cfg.statement_repeats * scale))
    for _ in range(reps):
        docs += [_profile(world, n, by_key, rng) for n in world["names"]]
        docs += [_town_gazette(world, t, rng) for t in towns]
        shuffled = sums[:]
        rng.shuffle(shuffled)
        docs += [" ".join(statement(f, rng) for f in shuffled[i: i + 9]) for i in range(0, len(shuffled), 9)]
    docs += [_story(world, rng) for _ in range(max(1, round(cfg.num_stories * scale)))]
    docs += [_sums_page(sums, rng) for _ in range(max(1, round(len(sums) * scale)))]
    train_only = [f for f in train_facts]
    docs += [_quiz(train_only, rng) for _ in range(max(1, round(cfg.num_quizzes * scale)))]
    if cfg.num_faqs:  # drawn last: with num_faqs 0 the corpus is the one of earlier versions
        docs += [_faq(train_only, rng) for _ in range(max(1, round(cfg.num_faqs * scale)))]
    rng.shuffle(docs)
    return docs


# ---------------------------------------------------------------- post-training data


def ramble(rng: random.Random) -> str:
    """A long answer that never gets to the point."""
    words = [rng.choice(RAMBLE_OPEN)] + [rng.choice(RAMBLE_FILL) for _ in range(rng.randint(8, 12))]
    return ", ".join(words) + ", and"


def rejected_answer(fact: dict, kind: str, rng: random.Random) -> str:
    """A clearly worse answer: a wrong fact, a rude refusal, rambling that never answers, an evasion, or a
    sentence cut off before the answer."""
    if kind == "wrong":
        return answer_sentence(dict(fact, answer=wrong_value(fact, rng)), rng)
    if kind == "rude":
        return rng.choice(RUDE)
    if kind == "evasive":
        return rng.choice(EVASIVE)
    if kind == "unfinished":
        sentence = answer_sentence(fact, rng)
        return sentence[: sentence.rindex(fact["answer"])].rstrip()
    return ramble(rng)


def qa_record(fact: dict, rng: random.Random | None) -> dict:
    """An RL / QA prompt with its ground-truth fields (what `check` reads); the canonical question without an rng."""
    return {"prompt": [{"role": "user", "content": question(fact, rng)}], "answer": fact["answer"], "kind": fact["kind"],
            "entity": fact["entity"], "attribute": fact["attribute"], "choices": fact["choices"]}


def sft_rows(facts: list[dict], per_fact: int, rng: random.Random) -> list[dict]:
    """Conversations: the user asks, the assistant answers in one full sentence (and the template ends the turn)."""
    rows = []
    for f in facts:
        for _ in range(per_fact):
            msgs = [{"role": "user", "content": question(f, rng)}, {"role": "assistant", "content": answer_sentence(f, rng)}]
            if rng.random() < 0.15:  # a few two-turn conversations
                g = rng.choice(facts)
                msgs += [{"role": "user", "content": question(g, rng)}, {"role": "assistant", "content": answer_sentence(g, rng)}]
            rows.append({"messages": msgs})
    rng.shuffle(rows)
    return rows


def preference_rows(facts: list[dict], per_fact: int, rng: random.Random) -> list[dict]:
    """Pairs on the same prompt: chosen correct, polite and complete; rejected one of REJECTED_KINDS.

    Wrong facts are one pair in nine: on held-out facts a tiny reward model ranks a wrong fact at chance (measured:
    0.44 on 18 pairs, docs/benchmarks.md) while every failure of manner is learnt (1.0), so many more wrong-fact
    pairs would cap held-out pair accuracy below the 0.9 the demo asks for."""
    rows = []
    for f in facts:
        for _ in range(per_fact):
            kind = rng.choices(list(REJECTED_KINDS), weights=list(REJECTED_KINDS.values()))[0]
            rows.append({"prompt": [{"role": "user", "content": question(f, rng)}],
                         "chosen": [{"role": "assistant", "content": answer_sentence(f, rng)}],
                         "rejected": [{"role": "assistant", "content": rejected_answer(f, kind, rng)}],
                         "rejected_kind": kind})
    rng.shuffle(rows)
    return rows


def wrong_fact_rows(facts: list[dict], rng: random.Random) -> list[dict]:
    """One pair per fact that differs only in the fact: the same answer sentence with the right value and with a wrong one
    (the canonical question). Held out, they measure whether a reward model judges facts rather than manner."""
    rows = []
    for f in facts:
        template = rng.choice(SUM_ANSWERS if f["kind"] == "arithmetic" else ATTRIBUTES[f["attribute"]]["answers"])
        rows.append({"prompt": [{"role": "user", "content": question(f)}],
                     "chosen": [{"role": "assistant", "content": _fill(template, f)}],
                     "rejected": [{"role": "assistant", "content": _fill(template, dict(f, answer=wrong_value(f, rng)))}],
                     "rejected_kind": "wrong_fact"})
    return rows


def mmlu_rows(facts: list[dict], rng: random.Random, questions: list[str] | None = None) -> list[list]:
    """One four-way question per fact: question, choice0..choice3, answer index."""
    rows = []
    for i, f in enumerate(facts):
        choices, ans = mc_choices(f, rng)
        rows.append([questions[i] if questions else question(f, rng), *choices, ans])
    return rows


# ---------------------------------------------------------------- the ground-truth checker

_NUM = re.compile(r"-?\d+")


def _mentions(text: str, value: str) -> bool:
    return re.search(rf"(?<![A-Za-z0-9]){re.escape(value)}(?![A-Za-z0-9])", text, flags=re.IGNORECASE) is not None


def check(record: dict, response: str) -> bool:
    """True when `response` states the record's answer and no competing value of the same kind.

    Sums: the last number in the response is the answer. Attributes and relations: the answer is mentioned
    (whole word, any case), and neither another value of its set nor a person other than the asked-about one is."""
    if not isinstance(response, str) or not response.strip():
        return False
    answer = str(record["answer"])
    if record.get("kind") == "arithmetic":
        nums = _NUM.findall(response)
        return bool(nums) and nums[-1] == answer
    if not _mentions(response, answer):
        return False
    # a competing value, or another person ("Bob lives in Ashford" does not answer where Alice lives)
    others = [c for c in list(record.get("choices", [])) + NAMES if c not in (answer, record.get("entity"))]
    return not any(_mentions(response, c) for c in others)


def about_the_asked(record: dict, response: str) -> bool:
    """True when the answer is about what was asked: it names the asked person and no other (people questions), or
    both numbers of the sum (arithmetic). A partial, still verifiable, signal: the wrong person is the commonest error."""
    if not isinstance(response, str):
        return False
    if record.get("kind") == "arithmetic":
        return all(_mentions(response, x) for x in str(record["entity"]).split("+"))
    entity = record.get("entity")
    return bool(entity) and _mentions(response, entity) and not any(_mentions(response, n) for n in NAMES
                                                                     if n not in (entity, record.get("answer")))


def well_formed(response: str, stopped: bool, max_words: int = 30) -> bool:
    """A well-formed answer: generation ended at end-of-turn, one short sentence-like text, no role markers."""
    text = response.strip()
    return (stopped and 0 < len(text.split()) <= max_words and text[-1] in ".!?"
            and "<|" not in text and "\n" not in text)


# ---------------------------------------------------------------- writing


def _jsonl(rows: list) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _csv(rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["question", "choice0", "choice1", "choice2", "choice3", "answer"])
    w.writerows(rows)
    return buf.getvalue()


def _check_cfg(cfg: TinyWorldConfig) -> None:
    # a best-friend question has four choices: the answer and three other people besides the one asked about
    if not 6 <= cfg.num_people <= len(NAMES) or cfg.num_people % 2:
        raise UserError(f"num_people: {cfg.num_people}; expected an even number from 6 to {len(NAMES)}")
    if not 0 < cfg.eval_fraction < 1:
        raise UserError(f"eval_fraction: {cfg.eval_fraction}; expected a number between 0 and 1")
    if cfg.num_faqs < 0:
        raise UserError(f"num_faqs: {cfg.num_faqs}; expected 0 or a positive integer")
    for name in ("statement_repeats", "num_stories", "num_quizzes", "sft_per_fact", "preference_per_fact", "dev_rows"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name}: {getattr(cfg, name)}; expected a positive integer")


def main(cfg: TinyWorldConfig) -> dict:
    """Build the world from the seed, derive every split from it, write the directory atomically; returns stats."""
    t0 = time.time()
    _check_cfg(cfg)
    check_output_dir(cfg.output, cfg.overwrite)
    # one generator per product, each seeded from (seed, name): adding a product never changes the others
    rngs = {k: random.Random(f"{cfg.seed}/{k}") for k in ("world", "split", "corpus", "heldout", "sft", "pref", "rl", "qa", "mmlu",
                                                          "facts")}
    world = build_world(rngs["world"], cfg.num_people)
    facts = world_facts(world)
    train, evals = split_facts(facts, rngs["split"], cfg.eval_fraction)

    corpus = build_corpus(world, facts, train, cfg, rngs["corpus"])
    heldout = build_corpus(world, facts, train, cfg, rngs["heldout"], scale=0.05)
    sft_train, sft_eval = sft_rows(train, cfg.sft_per_fact, rngs["sft"]), sft_rows(evals, 1, rngs["sft"])
    pref_train, pref_test = preference_rows(train, cfg.preference_per_fact, rngs["pref"]), preference_rows(evals, 1, rngs["pref"])
    facts_test = wrong_fact_rows(evals, rngs["facts"])
    rl = [qa_record(f, rngs["rl"]) for f in train]
    qa = [qa_record(f, None) for f in evals]  # evaluation asks the canonical question
    dev_facts = rngs["mmlu"].sample(train, cfg.dev_rows)
    mmlu_dev, mmlu_test = mmlu_rows(dev_facts, rngs["mmlu"]), mmlu_rows(evals, rngs["mmlu"], [r["prompt"][0]["content"] for r in qa])

    stats = {
        "seed": cfg.seed, "people": cfg.num_people, "facts": len(facts), "train_facts": len(train), "eval_facts": len(evals),
        "corpus_docs": len(corpus), "corpus_chars": sum(map(len, corpus)), "heldout_docs": len(heldout),
        "sft_train": len(sft_train), "sft_eval": len(sft_eval), "preference_train": len(pref_train), "preference_test": len(pref_test),
        "preference_facts_test": len(facts_test),
        "rl_prompts": len(rl), "qa_test": len(qa), "mmlu_dev": len(mmlu_dev), "mmlu_test": len(mmlu_test),
    }
    files = {
        "corpus/train.jsonl": _jsonl({"text": d} for d in corpus),
        "corpus/heldout.jsonl": _jsonl({"text": d} for d in heldout),
        "sft/train.jsonl": _jsonl(sft_train), "sft/eval.jsonl": _jsonl(sft_eval),
        "preference/train.jsonl": _jsonl(pref_train), "preference/test.jsonl": _jsonl(pref_test),
        "preference/facts_test.jsonl": _jsonl(facts_test),
        "rl/prompts.jsonl": _jsonl(rl), "qa/test.jsonl": _jsonl(qa),
        f"mmlu/dev/{SUBJECT}_dev.csv": _csv(mmlu_dev), f"mmlu/test/{SUBJECT}_test.csv": _csv(mmlu_test),
        "world.json": json.dumps({"people": world["people"], "eval_units": sorted({f["unit"] for f in evals})}, indent=1, ensure_ascii=False) + "\n",
        "stats.json": json.dumps(stats, indent=1) + "\n",
    }
    with atomic_dir(cfg.output, cfg.overwrite, stage="data") as tmp:
        for rel, text in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_text(text, encoding="utf-8")
        save_config(tmp, cfg)
    print(f"tinyworld: seed {cfg.seed}, {stats['facts']} facts ({stats['train_facts']} train / {stats['eval_facts']} eval), "
          f"corpus {stats['corpus_docs']} docs / {stats['corpus_chars'] / 1e6:.2f}M chars, sft {stats['sft_train']}, "
          f"preference {stats['preference_train']}, rl {stats['rl_prompts']}, qa {stats['qa_test']}, mmlu test {stats['mmlu_test']} "
          f"-> {cfg.output} in {time.time() - t0:.1f}s")
    return stats


@exit_on_user_error
def cli(argv=None) -> None:
    """`align data [tinyworld] --seed N --output DIR` (the family word is optional: tinyworld is the only one)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and not argv[0].startswith("-"):
        family = argv.pop(0)
        if family not in FAMILIES:
            raise UserError(f"command line: unknown dataset family {family!r}; expected one of {', '.join(FAMILIES)}")
    (cfg,) = parse_config([TinyWorldConfig], argv)
    main(cfg)


if __name__ == "__main__":
    cli()
