"""`align serve` under load on loopback: latency and tokens/s of 16 concurrent streaming clients, the 17th refused.

    python benchmarks/serve_load.py --model runs/tiny/dpo/merged [--clients 16] [--max_tokens 64] [--rounds 2]
    python benchmarks/serve_load.py --model runs/tiny/dpo/merged --model2 runs/tiny/sft/merged --screenshots docs/img

For each server setting (max_parallel x torch threads) it starts `align serve` as a subprocess on 127.0.0.1 (port 0),
then sends `clients` chat requests at once with the official openai client, streaming, greedy, each a different
tiny-world question, `rounds` times. Per request: time to the first token, total latency, tokens (usage). Then it
refills the server to max_pending (= clients) and sends one more request, which must be refused with 503. The same
questions through `alignment.sampling.generate` one by one, without a server, give the baseline tokens/s.
Every request goes to 127.0.0.1; the loops are bounded by `clients` x `rounds`. Prints one Markdown table.

With --screenshots DIR it also drives the page in headless chromium (Debian's chromium + chromedriver) and saves
serve_chat.png, serve_arena.png and serve_phone.png there (the README's pictures).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = [
    "What is Rosa's pet?", "In which town does Rosa live?", "What is Rosa's job?", "What is 9 plus 5?",
    "What is the sum of 7 and 8?", "What is 3 plus 4?", "Who is Rosa's best friend?", "What is 6 plus 6?",
    "What is Alice's favorite color?", "In which town does Alice live?", "What is Alice's job?", "What is 2 plus 9?",
    "What is the sum of 5 and 5?", "What is Alice's pet?", "Who is Alice's best friend?", "What is 8 plus 1?",
]


class Server:
    """`align serve` in a subprocess on 127.0.0.1 and a free port."""

    def __init__(self, args: list[str], threads: int):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = [sys.executable, "-m", "alignment.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--cpu_threads", str(threads), *args]
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        self.url = None
        for line in self.proc.stderr:  # the start line names the address
            m = re.search(r" at (http://127\.0\.0\.1:\d+)/", line)
            if m:
                self.url = m.group(1)
                break
        if self.url is None:
            raise SystemExit(f"align serve did not start: {self.proc.wait()}")
        threading.Thread(target=lambda: [None for _ in self.proc.stderr], daemon=True).start()  # keep draining stderr

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health") as r:
            return json.loads(r.read())

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def stream_one(client, model: str, question: str, max_tokens: int, temperature: float = 0.0) -> dict:
    """One streaming chat request: seconds to the first token and to the end, and its completion tokens."""
    t0 = time.perf_counter()
    first, tokens = None, 0
    for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], temperature=temperature,
                                                max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content and first is None:
            first = time.perf_counter() - t0
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"ttft": first if first is not None else float("nan"), "latency": time.perf_counter() - t0, "tokens": tokens}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def load(server: Server, model: str, clients: int, max_tokens: int, rounds: int) -> dict:
    """`rounds` bursts of `clients` concurrent streams, then the refused extra request."""
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    stream_one(client, model, QUESTIONS[0], max_tokens)  # warm-up
    results, wall = [], 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            results += list(pool.map(lambda q: stream_one(client, model, q, max_tokens), [QUESTIONS[i % len(QUESTIONS)] for i in range(clients)]))
        wall += time.perf_counter() - t0
    # the extra request: fill the server with `clients` long answers (temperature 2 rarely ends a turn before
    # max_tokens, and sampled requests take turns), then send one more while they are all admitted
    refused = {"status": None, "seconds": None}
    with ThreadPoolExecutor(clients) as pool:
        futures = [pool.submit(stream_one, client, model, QUESTIONS[i % len(QUESTIONS)], max_tokens, 2.0) for i in range(clients)]
        for _ in range(20_000):
            if server.health()["pending"] >= clients:
                break
            time.sleep(0.002)
        body = json.dumps({"model": model, "messages": [{"role": "user", "content": "one more"}], "max_tokens": 8}).encode()
        req = urllib.request.Request(server.url + "/v1/chat/completions", data=body, headers={"Content-Type": "application/json"})
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(req) as r:
                refused["status"] = r.status
        except urllib.error.HTTPError as e:
            refused["status"], refused["message"] = e.code, json.loads(e.read())["error"]["message"]
        refused["seconds"] = time.perf_counter() - t0
        fill = [f.result() for f in futures]
    refused["fill_tokens"] = sum(r["tokens"] for r in fill)
    lat, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "tokens": tokens, "tokens_per_s": tokens / wall, "ttft_p50": statistics.median(ttft),
            "ttft_max": max(ttft), "lat_p50": statistics.median(lat), "lat_p95": pct(lat, 0.95), "lat_max": max(lat),
            "refused": refused}


def baseline(model_dir: str, max_tokens: int, clients: int, threads: int) -> float:
    """Tokens/s of the same questions through alignment.sampling.generate one by one, without a server."""
    import torch

    from alignment.modeling import load_model, load_tokenizer
    from alignment.sampling import SamplingParams, generate
    from alignment.tokens import encode_prompt

    torch.set_num_threads(threads)
    tok = load_tokenizer(model_dir)
    model = load_model(model_dir, tokenizer=tok)
    prompts = [encode_prompt(tok, [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]) for i in range(clients)]
    params = SamplingParams(max_new_tokens=max_tokens, temperature=0, seed=None)
    generate(model, tok, prompts[:1], params)  # warm-up
    t0 = time.perf_counter()
    n = sum(len(generate(model, tok, [p], params)[0][0].token_ids) for p in prompts)
    return n / (time.perf_counter() - t0)


def screenshots(model: str, model2: str, out: Path) -> None:
    """The page in headless chromium: a chat, an arena battle after the vote, and the arena on a phone-width screen."""
    import shutil

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as votes:
        server = Server(["--model", model, "--model2", model2, "--votes_dir", votes], threads=1)
        opts = Options()
        opts.binary_location = shutil.which("chromium")
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,760"):
            opts.add_argument(arg)
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
        wait = WebDriverWait(driver, 300)
        try:
            driver.get(server.url + "/")
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
            for name, value in (("temperature", "0"), ("max_tokens", "48")):
                driver.find_element(By.ID, name).clear()
                driver.find_element(By.ID, name).send_keys(value)
            driver.find_element(By.ID, "system").send_keys("Answer in one sentence.")
            for i, q in enumerate(["What is Rosa's pet?", "In which town does Rosa live?", "What is 9 plus 5?"]):
                driver.find_element(By.ID, "prompt").send_keys(q, Keys.ENTER)
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-done='1']")) == i + 1)
            driver.find_element(By.TAG_NAME, "summary").click()  # fold the settings: the conversation is the picture
            driver.execute_script("window.scrollTo(0, 0)")
            driver.save_screenshot(str(out / "serve_chat.png"))
            driver.find_element(By.ID, "tab-arena").click()
            driver.find_element(By.TAG_NAME, "summary").click()
            driver.find_element(By.ID, "temperature").clear()
            driver.find_element(By.ID, "temperature").send_keys("1")
            driver.find_element(By.TAG_NAME, "summary").click()
            # the DPO model often answers as its SFT model does: battles until the two answers differ (the same
            # answers get a tie, which the log keeps and the preference file does not)
            for i, q in enumerate(["What is Rosa's job?", "Who is Rosa's best friend?", "What is the sum of 7 and 8?",
                                   "What is Alice's pet?", "In which town does Alice live?"]):
                driver.find_element(By.ID, "prompt").send_keys(q, Keys.ENTER)
                wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".battle[data-state='ready']")) == 1)
                box = driver.find_element(By.CSS_SELECTOR, ".battle[data-state='ready']")
                a, b = (box.find_element(By.CSS_SELECTOR, f".side[data-side='{s}'] .body").text for s in "AB")
                box.find_element(By.CSS_SELECTOR, f"button[data-vote='{'tie' if a == b else 'A'}']").click()
                wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, ".battle[data-state='ready']"))
                if a != b:
                    break
            driver.save_screenshot(str(out / "serve_arena.png"))
            driver.set_window_size(390, 800)
            driver.save_screenshot(str(out / "serve_phone.png"))
        finally:
            driver.quit()
            server.close()
    print(f"screenshots -> {out}/serve_chat.png, serve_arena.png, serve_phone.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="runs/tiny/dpo/merged")
    ap.add_argument("--model2", default=None, help="with --screenshots: the arena's second model")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--max_tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settings", default="1x1,1x2,2x1,4x1", help="max_parallel x torch threads, comma separated")
    ap.add_argument("--screenshots", default=None, help="save the page's pictures in this directory")
    args = ap.parse_args()
    if not Path(args.model, "config.json").is_file():
        raise SystemExit(f"{args.model}: not a model directory (run `make demo` first, or pass --model)")
    if args.screenshots:
        screenshots(args.model, args.model2 or args.model, Path(args.screenshots))
        return
    rows = []
    for setting in args.settings.split(","):
        parallel, threads = map(int, setting.split("x"))
        base = baseline(args.model, args.max_tokens, args.clients, threads)
        server = Server(["--model", args.model, "--max_pending", str(args.clients), "--max_parallel", str(parallel),
                         "--max_tokens", str(args.max_tokens)], threads)
        try:
            r = load(server, args.model.rstrip("/"), args.clients, args.max_tokens, args.rounds)
        finally:
            server.close()
        rows.append((parallel, threads, base, r))
        print(f"{setting}: {json.dumps({k: v for k, v in r.items()}, default=str)}", file=sys.stderr)
    print(f"\n{args.clients} concurrent streaming clients x {args.rounds} rounds, greedy, max_tokens {args.max_tokens}, model {args.model}\n")
    print("| max_parallel | torch threads | requests | tokens | tokens/s (server) | tokens/s (sampler alone, one by one) "
          "| first token p50 / max (s) | latency p50 / p95 / max (s) | request 17 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for parallel, threads, base, r in rows:
        ref = r["refused"]
        print(f"| {parallel} | {threads} | {r['requests']} | {r['tokens']} | {r['tokens_per_s']:.0f} | {base:.0f} | "
              f"{r['ttft_p50']:.2f} / {r['ttft_max']:.2f} | {r['lat_p50']:.2f} / {r['lat_p95']:.2f} / {r['lat_max']:.2f} | "
              f"{ref['status']} in {ref['seconds'] * 1000:.0f} ms (the 16 before it: {ref['fill_tokens']} tokens) |")


if __name__ == "__main__":
    main()
