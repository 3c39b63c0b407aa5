"""The one way data becomes token ids: special-token safe.

Text that comes from data (corpus documents, message contents) may contain the literal string of a special
token, e.g. a web page quoting "<|im_end|>". Such text must never turn into the control id, or a document could
end a turn, forge a role, or hide an end-of-text. Only the chat template and the pipeline insert control ids.

- `encode_text(tok, text)`: data text -> ids; special-token strings are split into ordinary byte tokens.
- `encode_document(tok, text)`: as above plus the end-of-text id (what pretraining packs).
- `encode_chat(tok, messages, ...)`: the chat template's control tokens as ids, message contents as plain text,
  and a mask of the assistant tokens (the `{% generation %}` spans, end-of-turn token included).
"""

from __future__ import annotations

import re

from .errors import UserError

ROLES = ("system", "user", "assistant")
# private-use code points: cannot be produced by the template, and we strip them from data before rendering
_PH_OPEN, _PH_CLOSE = "\ue000", "\ue001"
_PH_RE = re.compile(f"{_PH_OPEN}(\\d+){_PH_CLOSE}")


def encode_text(tokenizer, text: str) -> list[int]:
    """Encode data text as plain text: a literal special-token string never becomes its control id."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def encode_document(tokenizer, text: str) -> list[int]:
    """Encode one pretraining document and append the end-of-text id (the document separator)."""
    if tokenizer.eos_token_id is None:
        raise UserError("tokenizer has no eos_token (end of text); expected one to separate documents")
    return encode_text(tokenizer, text) + [tokenizer.eos_token_id]


def validate_messages(messages, where: str = "messages") -> list[dict]:
    """Check a conversation: a non-empty list of {role, content} with known roles and string contents."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise UserError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}[{i}]: expected a mapping with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise UserError(f"{where}[{i}]: unknown role {m['role']!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}[{i}]: content must be a string, got {type(m['content']).__name__}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def encode_chat(tokenizer, messages, add_generation_prompt: bool = False, chat_template: str | None = None) -> dict:
    """Render `messages` with the chat template and encode them safely.

    Returns {"input_ids": [...], "assistant_masks": [...]} where assistant_masks is 1 on the tokens inside the
    template's `{% generation %}` spans (assistant contents and their end-of-turn token)."""
    from .compat import render_chat_template

    messages = validate_messages(messages)
    template = chat_template or tokenizer.chat_template
    if not template:
        raise UserError("tokenizer has no chat_template; expected one (train it with `align tokenizer`)")
    contents = [m["content"].replace(_PH_OPEN, "").replace(_PH_CLOSE, "") for m in messages]
    placeheld = [{"role": m["role"], "content": f"{_PH_OPEN}{i}{_PH_CLOSE}"} for i, m in enumerate(messages)]
    rendered, spans = render_chat_template(template, placeheld, add_generation_prompt, **tokenizer.special_tokens_map)

    def in_generation(pos: int) -> bool:
        return any(a <= pos < b for a, b in spans)

    ids: list[int] = []
    mask: list[int] = []
    cursor = 0
    for m in list(_PH_RE.finditer(rendered)) + [None]:
        end = m.start() if m else len(rendered)
        piece = rendered[cursor:end]
        if piece:  # template text: its control tokens are meant to be control ids
            enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            mask += [int(in_generation(cursor + s)) for s, _ in enc["offset_mapping"]]
        if m is None:
            break
        content_ids = encode_text(tokenizer, contents[int(m.group(1))])
        ids += content_ids
        mask += [int(in_generation(m.start()))] * len(content_ids)
        cursor = m.end()
    return {"input_ids": ids, "assistant_masks": mask}


def encode_prompt(tokenizer, prompt) -> list[int]:
    """A prompt as generation input: messages (or a string, as one user turn) through the chat template with the
    generation prompt; a plain string for a tokenizer without a chat template (a base model continues the text)."""
    if isinstance(prompt, str) and not tokenizer.chat_template:
        return encode_text(tokenizer, prompt)
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return encode_chat(tokenizer, messages, add_generation_prompt=True)["input_ids"]


def reply_ids(tokenizer, prompt_ids: list[int], prompt, reply: str, where: str = "reply") -> list[int]:
    """The ids of an assistant reply after `prompt_ids` (= encode_prompt(prompt)), ending at its end-of-turn token:
    what a reward model reads its score at. A string prompt without a chat template continues as plain text."""
    if isinstance(prompt, str) and not tokenizer.chat_template:
        return encode_text(tokenizer, prompt + reply)[len(prompt_ids):]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    full = encode_chat(tokenizer, messages + [{"role": "assistant", "content": reply}])["input_ids"]
    if full[: len(prompt_ids)] != prompt_ids:
        raise UserError(f"{where}: the chat template renders the prompt differently alone and before a reply; "
                        "expected the generation prompt to be a prefix of the conversation")
    ids = full[len(prompt_ids):]
    # stop right after the end-of-turn token: the template's trailing newline is not part of the reply
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end in ids:
        ids = ids[: len(ids) - ids[::-1].index(im_end)]
    return ids


def tokenizer_hash(path) -> str:
    """Content hash (16 hex) of the tokenizer that turns text into ids: tokenizer.json, else the slow tokenizer files.

    Identifies the tokenizer of packed shards, caches and eval reports; the chat template is not part of it (what a
    template renders is part of the tokenized data, which caches hash themselves)."""
    import hashlib
    from pathlib import Path

    d = Path(str(path))
    files = [d / "tokenizer.json"] if (d / "tokenizer.json").is_file() else sorted(
        f for f in d.glob("*") if f.name in ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt"))
    if not files:
        raise UserError(f"{d}: no tokenizer files to hash; expected tokenizer.json (or tokenizer.model)")
    h = hashlib.sha256()
    for f in files:
        h.update(f.read_bytes())
    return h.hexdigest()[:16]
