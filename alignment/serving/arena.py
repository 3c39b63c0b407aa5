"""The blind arena: one prompt to two models, answers shown as A and B with the sides drawn at random, and a person's
vote kept as training data.

Files in `votes_dir` (created at the first vote):
- `preferences.jsonl`: one row per decisive vote (A or B better) in TRL's conversational preference format, which
  `align reward` and `align dpo` read as training data: {"prompt": [messages], "chosen": [{"role": "assistant",
  "content": ...}], "rejected": [...]}. A vote between two answers that are the same text, or where one is empty,
  makes no row (the trainers refuse such pairs) but is logged.
- `votes.jsonl`: every vote (tie and both bad included) with the model identities, the answers, the sampling settings
  and whether it made a preference row.

Appending a line is read + write: the whole file with the new line is written to a temp sibling and renamed over the
old one (`alignment.io.atomic_write_bytes`), under a thread lock and an flock on `votes_dir/.votes.lock`. A reader
(`align dpo`, the tally) therefore sees the file with or without the new row, never half a row, even when the server
dies mid-write or the disk fills; an O_APPEND write would be cheaper but can leave a torn last line that makes the
next `align dpo` on that file fail. Rewriting costs O(file size) per vote, a few milliseconds for thousands of votes
at the rate people vote.

The tally orients each pair of models as the server lists them (--model before --model2) and reports the first's win
rate over the second with `alignment.stats.win_rate` (ties and both bad count half), the statistic `align eval`
reports for reward-model win rate.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write_bytes
from ..stats import win_rate

VOTES = ("A", "B", "tie", "both_bad")
PREFERENCES_FILE, VOTES_FILE, LOCK_FILE = "preferences.jsonl", "votes.jsonl", ".votes.lock"
_append_lock = threading.Lock()


class ArenaError(Exception):
    """A request the arena cannot act on: `status` is the HTTP status (404 unknown battle, 409 wrong state)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class Side:
    """One side of a battle: which model answers (hidden from the page until the vote) and its answer."""

    model: str
    state: str = "new"  # new -> running -> done | stopped | failed
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0


@dataclass
class Battle:
    """One prompt put to two models."""

    id: str
    messages: list[dict]
    settings: dict
    sides: dict[str, Side]
    created: float = field(default_factory=time.time)
    vote: str | None = None


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive flock on `path` (servers sharing a votes_dir take turns); a no-op where fcntl does not exist."""
    try:
        import fcntl
    except ImportError:  # Windows: the thread lock still serialises this process's writers
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def append_jsonl(path: Path, obj) -> None:
    """Append one JSON line to `path` atomically (read, add the line, write a temp sibling, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _append_lock, _file_lock(path.parent / LOCK_FILE):
        old = path.read_bytes() if path.is_file() else b""
        if old and not old.endswith(b"\n"):
            old += b"\n"
        atomic_write_bytes(path, old + (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8"))


def preference_row(messages: list[dict], chosen: str, rejected: str) -> dict:
    """A TRL conversational preference row: what `align reward` / `align dpo` train on."""
    return {
        "prompt": messages,
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


def _finite(x):
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


class Arena:
    """Battles in memory (the most recent `keep`), votes on disk in `votes_dir`."""

    def __init__(self, votes_dir, models: list[str], keep: int = 256):
        self.votes_dir = Path(votes_dir)
        self.models = list(models)
        self.keep = keep
        self.battles: OrderedDict[str, Battle] = OrderedDict()
        self._lock = threading.Lock()

    def new_battle(self, messages: list[dict], settings: dict, pair: tuple[str, str]) -> Battle:
        """Start a battle between the two models of `pair`, put on sides A and B in a random order."""
        a, b = pair if secrets.randbelow(2) == 0 else pair[::-1]
        battle = Battle(secrets.token_hex(8), messages, settings, {"A": Side(a), "B": Side(b)})
        with self._lock:
            self.battles[battle.id] = battle
            while len(self.battles) > self.keep:  # bounded memory: the oldest unvoted battles are forgotten
                self.battles.popitem(last=False)
        return battle

    def get(self, battle_id: str) -> Battle:
        """The battle with this id (404 when unknown or forgotten)."""
        with self._lock:
            battle = self.battles.get(battle_id)
        if battle is None:
            raise ArenaError(
                404,
                f"battle {battle_id!r}: unknown (or older than the last {self.keep}); "
                "expected an id from POST /arena/battles",
            )
        return battle

    def start_side(self, battle_id: str, side: str) -> tuple[Battle, Side]:
        """Mark a side as generating (each side is answered once)."""
        if side not in ("A", "B"):
            raise ArenaError(404, f"side {side!r}: expected A or B")
        battle = self.get(battle_id)
        with self._lock:
            s = battle.sides[side]
            if s.state != "new":
                raise ArenaError(
                    409, f"battle {battle_id}: side {side} is already {s.state}; expected each side to be answered once"
                )
            s.state = "running"
        return battle, s

    def vote(self, battle_id: str, vote: str) -> dict:
        """Record a vote: always in votes.jsonl, and as a preference row when it is decisive between two different,
        non-empty answers. Returns what was recorded and which model was on which side."""
        if vote not in VOTES:
            raise ArenaError(400, f"vote: {vote!r}; expected one of {', '.join(VOTES)}", "vote")
        battle = self.get(battle_id)
        with self._lock:
            if battle.vote is not None:
                raise ArenaError(409, f"battle {battle_id}: already voted {battle.vote}; expected one vote per battle")
            for name, s in battle.sides.items():
                if s.state != "done":
                    raise ArenaError(
                        409,
                        f"battle {battle_id}: answer {name} is {s.state}; expected both answers finished before a vote",
                    )
            battle.vote = vote
        a, b = battle.sides["A"], battle.sides["B"]
        winner = {"A": a, "B": b}.get(vote)
        loser = {"A": b, "B": a}.get(vote)
        row, why_not = None, None
        if winner is not None:
            if not winner.text.strip() or not loser.text.strip():
                why_not = "an answer is empty"
            elif winner.text.strip() == loser.text.strip():
                why_not = "the two answers are the same text"
            else:
                row = preference_row(battle.messages, winner.text, loser.text)
        log = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "battle": battle.id,
            "vote": vote,
            "model_a": a.model,
            "model_b": b.model,
            "winner": winner.model if winner else None,
            "prompt": battle.messages,
            "answer_a": a.text,
            "answer_b": b.text,
            "finish_a": a.finish_reason,
            "finish_b": b.finish_reason,
            "settings": battle.settings,
            "preference_row": row is not None,
        }
        try:
            append_jsonl(self.votes_dir / VOTES_FILE, log)
            if row is not None:
                append_jsonl(self.votes_dir / PREFERENCES_FILE, row)
        except BaseException:
            with self._lock:
                battle.vote = None  # nothing was kept: the person may vote again
            raise
        return {
            "battle": battle.id,
            "vote": vote,
            "models": {"A": a.model, "B": b.model},
            "preference_row": row is not None,
            "note": why_not or ("saved as a preference row" if row else "logged (not a preference: no winner)"),
        }

    def tally(self) -> dict:
        """Per pair of models: counts and the first model's win rate over the second with its standard error."""
        path = self.votes_dir / VOTES_FILE
        votes, unreadable = [], 0
        if path.is_file():
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    v = json.loads(line)
                    votes.append((str(v["model_a"]), str(v["model_b"]), v.get("winner"), str(v["vote"])))
                except (ValueError, KeyError, TypeError):
                    unreadable += line.strip() != ""
        rank = {m: i for i, m in enumerate(self.models)}
        pairs: dict[tuple[str, str], list] = {}
        for a, b, winner, vote in votes:
            first, second = sorted((a, b), key=lambda m: (rank.get(m, len(rank)), m))
            pairs.setdefault((first, second), []).append((winner, vote))
        out = []
        for (first, second), vs in pairs.items():
            scores = win_rate([1.0 if w == first else 0.0 for w, _ in vs], [1.0 if w == second else 0.0 for w, _ in vs])
            out.append(
                {
                    "model": first,
                    "opponent": second,
                    "votes": len(vs),
                    "wins": sum(w == first for w, _ in vs),
                    "losses": sum(w == second for w, _ in vs),
                    "ties": sum(v == "tie" for _, v in vs),
                    "both_bad": sum(v == "both_bad" for _, v in vs),
                    "win_rate": _finite(scores["win_rate"]),
                    "win_rate_stderr": _finite(scores["win_rate_stderr"]),
                    "win_rate_ci95": [_finite(x) for x in scores["win_rate_ci95"]],
                }
            )
        return {
            "votes_file": str(path),
            "preferences_file": str(self.votes_dir / PREFERENCES_FILE),
            "pairs": out,
            "unreadable_lines": unreadable,
        }
