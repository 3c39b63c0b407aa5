"""Does llama.cpp run our GGUF export as transformers runs the Hugging Face directory? (issue 15)

    pip install -e '.[gguf]' llama-cpp-python      # compiles llama.cpp (about 25 minutes on 2 cores)
    PYTHONPATH=. python benchmarks/gguf_llamacpp.py --workdir /tmp/gguf-bench
    PYTHONPATH=. python benchmarks/gguf_llamacpp.py --workdir /tmp/gguf-dpo --model_dir runs/tiny/dpo/merged --text FILE

Without --model_dir it first trains a model with the suite's own stages (`align tokenizer`, `align prepare`,
`align pretrain`, 'tiny' preset) on the first 36,000 lines of ../shared/data/pretrain/tinyshakespeare.txt and holds
out the last 4,000 lines. Then it exports f16 and q8_0 GGUF files with `align export --format gguf` and checks,
with llama.cpp (through llama-cpp-python) against transformers (fp32):

1. tokenization: llama.cpp's token ids equal ours on every held-out paragraph, on the whole held-out file, on
   hand-picked edge cases (digit runs, contractions, whitespace runs, tabs, non-Latin text, emoji) and on a chat with
   control tokens, and decoding; a vocabulary trained on code (runs of spaces) under "smollm" and under "gpt-2"
   shows that "smollm" is the value that splits text as our pre-tokenizer does;
2. f16: greedy continuations of text and chat prompts, token for token, and llama-cpp-python's chat API (the
   GGUF's template, temperature 0) giving transformers' greedy answer and stopping where it stops;
3. q8_0 (and f16): perplexity over the held-out text in non-overlapping windows, next to transformers' fp32
   perplexity on the same windows; q8_0 must be within --ppl_tolerance (relative).

Prints a summary and writes results.json into the work directory; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "pretrain" / "tinyshakespeare.txt"

EDGE_CASES = [
    "In 1599, 42 men paid 3.50 each; 1000000 = 10^6.",
    "I'll say it's theirs, you're sure? We've 'RE and 'M; he'd've.",
    "two  spaces,   three,\ttab,\t\ttwo tabs, trailing   ",
    "\n\nnew\n\n\nlines \n \n",
    "naïve café — “quotes” ‘single’ … Здравствуй, мир! 你好，世界 こんにちは",
    "emoji 🚀🦙 and 😶\u200d🌫️ joined; math ∑x² ≤ ∞",
    "    indented code: def f(x):\n        return x**2  # 2x",
    "<|im_start|> written as plain text is not a control token",
]
# numbers after a run of spaces: where GPT-2's regex alone and our digit-first split disagree
SPACES_BEFORE_DIGITS = ["x = [\n    1,\n    22,\n]", "    42", "a  1", "f(x,  2)", "  3 + 4",
                        "| 10 |   7 |\n|  2 |  13 |"]
CHAT_PROMPTS = ["What is your name?", "Who is the best friend of Alice?", "What is 7 + 8?"]


def train_model(work: Path, steps: int) -> tuple[Path, Path]:
    """Tokenizer, packed shards and a pretrained 'tiny' model on Shakespeare; returns (model dir, held-out file)."""
    from pretrain.data import PrepareConfig
    from pretrain.data import main as prepare
    from pretrain.tokenizer import TokenizerConfig
    from pretrain.tokenizer import main as train_tokenizer
    from pretrain.train import PretrainConfig
    from pretrain.train import main as pretrain

    lines = SHAKESPEARE.read_text().splitlines(keepends=True)
    train, heldout = work / "train.txt", work / "heldout.txt"
    train.write_text("".join(lines[:36000]))
    heldout.write_text("".join(lines[36000:]))
    base = work / "base"
    if not (base / "config.json").is_file():
        train_tokenizer(TokenizerConfig(files=[str(train)], txt_split="paragraph", vocab_size=2048, reference="none",
                                        output_dir=str(work / "tokenizer"), overwrite=True))
        prepare(PrepareConfig(tokenizer=str(work / "tokenizer"), files=[str(train)], output_dir=str(work / "packed"),
                              overwrite=True))
        pretrain(PretrainConfig(data_dir=str(work / "packed"), tokenizer=str(work / "tokenizer"),
                                output_dir=str(work / "pretrain"), export_dir=str(base), preset="tiny", max_steps=steps,
                                batch_size=8, lr=3e-3, warmup_steps=30,
                                eval_interval=steps // 2, save_interval=steps, num_samples=1, sample_prompt="ROMEO:",
                                overwrite=True))
    return base, heldout


def check_tokenization(llm, tok, texts: list[str]) -> dict:
    """Count texts whose llama.cpp token ids differ from ours (data text: special-token strings stay text), and
    texts whose ids llama.cpp decodes to other text than transformers does."""
    from alignment.tokens import encode_text

    bad, bad_decode, first = 0, 0, None
    for text in texts:
        ours = encode_text(tok, text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        bad_decode += llm.detokenize(ours).decode("utf-8", errors="replace") != tok.decode(ours)
        if ours != theirs:
            bad += 1
            if first is None:
                k = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                first = {"text": text[:80], "ours": tok.convert_ids_to_tokens(ours[k:k + 4]),
                         "llama.cpp": tok.convert_ids_to_tokens(theirs[k:k + 4])}
    return {"texts": len(texts), "different": bad, "decoded_different": bad_decode, "first_difference": first}


def pre_tokenizer_ablation(work: Path) -> dict:
    """Which tokenizer.ggml.pre makes llama.cpp split like our pre-tokenizer? A vocabulary trained with our trainer
    on indented code (this repository's Python files) has tokens for runs of spaces, where GPT-2's regex alone and
    our digit-first split disagree ("    42": GPT-2's regex keeps one space with the digits). Writes the same
    vocabulary under each value (vocab-only use) and counts texts tokenized differently from ours: held-out files,
    then numbers after runs of spaces."""
    from unittest import mock

    import llama_cpp
    import torch
    from transformers import AutoTokenizer

    import pretrain.export as export_mod
    from pretrain.model import Llama, shape_from_preset
    from pretrain.tokenizer import TokenizerConfig
    from pretrain.tokenizer import main as train_tokenizer

    files = sorted(p for d in ("alignment", "pretrain", "recipes", "evals", "tests") for p in (ROOT / d).rglob("*.py"))
    texts = [p.read_text() for p in files]
    held = texts[::5]
    (work / "code.txt").write_text("\n\n\n".join(t for i, t in enumerate(texts) if i % 5))
    train_tokenizer(TokenizerConfig(files=[str(work / "code.txt")], txt_split="\n\n\n", vocab_size=1024,
                                    reference="none", output_dir=str(work / "code-tokenizer"), overwrite=True))
    tok = AutoTokenizer.from_pretrained(work / "code-tokenizer")
    torch.manual_seed(0)
    model = Llama(shape_from_preset("test", len(tok)))
    out = {"held_out_files": len(held), "space_run_tokens": sum("ĠĠ" in t for t in tok.get_vocab())}
    cases = {"files": held, "spaces_before_digits": SPACES_BEFORE_DIGITS}
    for pre in ("smollm", "gpt-2"):
        path = work / f"code-{pre}.gguf"
        with mock.patch.object(export_mod, "gguf_pre_tokenizer", return_value=pre):
            export_mod.save_gguf(model, tok, path, "f32")
        llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
        out[pre] = {k: check_tokenization(llm, tok, texts) for k, texts in cases.items()}
        del llm
    return out


def greedy_hf(model, ids: list[int], n: int) -> list[int]:
    """n greedy tokens after ids with transformers (full forward each step: the reference, no cache involved)."""
    import torch

    out = list(ids)
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([out])).logits[0, -1].argmax()))
    return out[len(ids):]


def greedy_llama(llm, ids: list[int], n: int) -> tuple[list[int], list[float]]:
    """n greedy tokens after ids with llama.cpp (its KV cache), and the top-1 minus top-2 logit margin of each."""
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out, margins = [], []
    for _ in range(n):
        logits = np.asarray(llm.scores[llm.n_tokens - 1])
        top2 = np.sort(logits)[-2:]
        out.append(int(logits.argmax()))
        margins.append(float(top2[1] - top2[0]))
        llm.eval([out[-1]])
    return out, margins


def nll_hf(model, windows: list[list[int]]) -> float:
    """Total next-token negative log-likelihood (nats) over the windows with transformers."""
    import torch

    total = 0.0
    with torch.no_grad():
        for w in windows:
            logits = model(torch.tensor([w])).logits[0, :-1].double()  # (T-1, V)
            total += float(torch.nn.functional.cross_entropy(logits, torch.tensor(w[1:]), reduction="sum"))
    return total


def nll_llama(llm, windows: list[list[int]]) -> float:
    """Total next-token negative log-likelihood (nats) over the windows with llama.cpp (logits of every position)."""
    import numpy as np

    total = 0.0
    for w in windows:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[: len(w) - 1], dtype=np.float64)  # (T-1, V)
        m = logits.max(axis=1, keepdims=True)
        logz = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
        total += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True, help="Scratch directory (model, GGUF files, results.json).")
    ap.add_argument("--model_dir", default=None, help="LlamaForCausalLM directory (default: train one on Shakespeare).")
    ap.add_argument("--text", default=None, help="Held-out text for tokens and perplexity (default: Shakespeare's).")
    ap.add_argument("--steps", type=int, default=300, help="Pretraining steps of the model trained here.")
    ap.add_argument("--window", type=int, default=256, help="Tokens per perplexity window.")
    ap.add_argument("--max_tokens", type=int, default=32768, help="Held-out tokens scored at most.")
    ap.add_argument("--new_tokens", type=int, default=48, help="Greedy tokens per prompt.")
    ap.add_argument("--ppl_tolerance", type=float, default=0.01, help="Allowed relative q8_0 perplexity difference.")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()

    import jinja2
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignment.tokens import encode_chat, encode_text
    from pretrain.export import ExportConfig, special_ids
    from pretrain.export import main as export

    torch.set_num_threads(a.threads)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if a.model_dir:
        model_dir, heldout = Path(a.model_dir), Path(a.text or work / "heldout.txt")
    else:
        model_dir, heldout = train_model(work, a.steps)
        heldout = Path(a.text) if a.text else heldout
    text = heldout.read_text()
    ggufs = {t: export(ExportConfig(model_dir=str(model_dir), format="gguf", gguf_type=t,
                                    output_dir=str(work / f"gguf-{t}"), overwrite=True)) for t in ("f16", "q8_0")}

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    n_ctx = hf.config.max_position_embeddings

    def load(path, **kw):
        return llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=a.threads, logits_all=True,
                               verbose=False, **kw)

    llm = load(ggufs["f16"])
    results: dict = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {a.threads} threads",
                     "llama_cpp_python": llama_cpp.__version__, "model_dir": str(model_dir), "heldout": str(heldout),
                     "parameters": sum(p.numel() for p in hf.parameters()),
                     "gguf_pre": llm.metadata.get("tokenizer.ggml.pre")}

    # 1. tokenization
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    results["tokenize_paragraphs"] = check_tokenization(llm, tok, paragraphs)
    results["tokenize_whole_file"] = check_tokenization(llm, tok, [text])
    results["tokenize_edge_cases"] = check_tokenization(llm, tok, EDGE_CASES)
    # a chat rendered with the template stored in the GGUF, its control tokens parsed by llama.cpp
    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who has 42 apples?"},
             {"role": "assistant", "content": "Nobody, I'd say."}]
    rendered = jinja2.Environment().from_string(llm.metadata["tokenizer.chat_template"]).render(messages=convo)
    ours = encode_chat(tok, convo)["input_ids"]
    results["tokenize_chat_with_control_tokens"] = {
        "equal": ours == llm.tokenize(rendered.encode(), add_bos=False, special=True),
        "control_tokens": sum(i in tok.all_special_ids for i in ours)}
    results["pre_tokenizer_on_code"] = pre_tokenizer_ablation(work)

    # 2. f16 greedy continuations, token for token: text prompts, and chat prompts ending in the assistant's turn
    starts = [p.split("\n")[0] for p in paragraphs[:: max(1, len(paragraphs) // 6)]][:6]
    prompts = [("text", p) for p in ["ROMEO:\n", "First Citizen:\nWe are accounted poor citizens"] + starts]
    prompts += [("chat", q) for q in CHAT_PROMPTS]
    greedy = []
    for kind, p in prompts:
        if kind == "chat":
            ids = encode_chat(tok, [{"role": "user", "content": p}], add_generation_prompt=True)["input_ids"]
        else:
            ids = encode_text(tok, p)
        want = greedy_hf(hf, ids, a.new_tokens)
        got, margins = greedy_llama(llm, ids, a.new_tokens)
        k = next((i for i, (x, y) in enumerate(zip(want, got)) if x != y), None)
        greedy.append({"prompt": p, "kind": kind, "equal": want == got, "first_difference": k,
                       "min_margin": round(min(margins), 4), "text": tok.decode(got)[:60]})
    results["greedy_f16"] = greedy

    # llama-cpp-python's chat API (the GGUF's template, greedy): the same answer, ended by <|im_end|>
    stops = special_ids(tok)["stop"]
    chat_api = []
    for q in CHAT_PROMPTS:
        messages = [{"role": "user", "content": q}]
        want = greedy_hf(hf, encode_chat(tok, messages, add_generation_prompt=True)["input_ids"], a.new_tokens)
        end = next((i for i, t in enumerate(want) if t in stops), None)  # None: no stop within new_tokens
        got = llm.create_chat_completion(messages=messages, temperature=0, max_tokens=a.new_tokens)["choices"][0]
        stopped_alike = (end is None) == (got["finish_reason"] == "length")
        same = got["message"]["content"] == tok.decode(want[:end]) and stopped_alike
        chat_api.append({"prompt": q, "answer": got["message"]["content"], "finish_reason": got["finish_reason"],
                         "equal": same})
    results["chat_completion_f16"] = chat_api

    # 3. perplexity on the held-out text, same windows for every engine
    ids = encode_text(tok, text)[: a.max_tokens]
    windows = [ids[i:i + a.window] for i in range(0, len(ids) - 1, a.window) if len(ids[i:i + a.window]) > 1]
    n = sum(len(w) - 1 for w in windows)
    ppl = {"tokens": n, "window": a.window, "transformers_fp32": math.exp(nll_hf(hf, windows) / n),
           "llama.cpp_f16": math.exp(nll_llama(llm, windows) / n)}
    del llm
    q8 = load(ggufs["q8_0"])
    ppl["llama.cpp_q8_0"] = math.exp(nll_llama(q8, windows) / n)
    for k in ("llama.cpp_f16", "llama.cpp_q8_0"):
        ppl[f"{k}_rel_diff"] = ppl[k] / ppl["transformers_fp32"] - 1
    ppl["tolerance"] = a.ppl_tolerance
    results["perplexity"] = ppl
    results["file_mb"] = {t: round(p.stat().st_size / 1e6, 2) for t, p in ggufs.items()}
    results["seconds"] = round(time.time() - t0, 1)

    checked = [results[k] for k in ("tokenize_paragraphs", "tokenize_whole_file", "tokenize_edge_cases")]
    checked += results["pre_tokenizer_on_code"]["smollm"].values()
    ok = {
        "tokenization": all(c["different"] == 0 and c["decoded_different"] == 0 for c in checked)
        and results["tokenize_chat_with_control_tokens"]["equal"],
        "greedy_f16": all(g["equal"] for g in greedy) and all(c["equal"] for c in chat_api),
        "q8_0_perplexity": abs(ppl["llama.cpp_q8_0_rel_diff"]) <= a.ppl_tolerance,
    }
    results["ok"] = ok
    (work / "results.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")

    tp = results["tokenize_paragraphs"]
    print(f"tokenizer.ggml.pre = {results['gguf_pre']}; llama-cpp-python {results['llama_cpp_python']}; "
          f"{results['parameters']:,} parameters")
    print(f"1. tokenization: {tp['texts'] - tp['different']}/{tp['texts']} held-out paragraphs equal, whole file "
          f"{'equal' if results['tokenize_whole_file']['different'] == 0 else 'DIFFERENT'}, edge cases "
          f"{len(EDGE_CASES) - results['tokenize_edge_cases']['different']}/{len(EDGE_CASES)}, "
          f"chat with control tokens "
          f"{'equal' if results['tokenize_chat_with_control_tokens']['equal'] else 'DIFFERENT'}")
    code = results["pre_tokenizer_on_code"]
    print(f"   decoded text equal: {all(c['decoded_different'] == 0 for c in checked)}; a vocabulary trained on code "
          f"({code['space_run_tokens']} tokens for runs of spaces): texts tokenized unlike ours "
          + "; ".join(f"pre = {pre}: {code[pre]['files']['different']}/{code[pre]['files']['texts']} held-out files, "
                      f"{code[pre]['spaces_before_digits']['different']}/{len(SPACES_BEFORE_DIGITS)} "
                      "numbers after spaces"
                      for pre in ("smollm", "gpt-2")))
    print(f"2. greedy f16: {sum(g['equal'] for g in greedy)}/{len(greedy)} prompts equal for {a.new_tokens} tokens "
          f"(smallest top-1/top-2 logit margin {min(g['min_margin'] for g in greedy):.3f}); chat API: "
          f"{sum(c['equal'] for c in chat_api)}/{len(chat_api)} answers equal, finish reasons "
          f"{[c['finish_reason'] for c in chat_api]}")
    print(f"3. perplexity over {n:,} held-out tokens ({a.window}-token windows): "
          f"transformers fp32 {ppl['transformers_fp32']:.4f}, llama.cpp f16 {ppl['llama.cpp_f16']:.4f} "
          f"({ppl['llama.cpp_f16_rel_diff']:+.3%}), q8_0 {ppl['llama.cpp_q8_0']:.4f} "
          f"({ppl['llama.cpp_q8_0_rel_diff']:+.3%}; tolerance {a.ppl_tolerance:.1%})")
    print(f"checks: {ok}; {results['seconds']} s; results in {work / 'results.json'}")
    return 0 if all(ok.values()) else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
