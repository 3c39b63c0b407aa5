"""Generation for the server: the served models, an admission cap, worker threads over the one sampler, and a
streamer that turns token ids into text deltas.

`Engine.submit` admits a request or refuses it at once (`Busy`, HTTP 503) when `max_pending` requests are already
running or waiting: a request the server cannot start soon is better refused than left hanging. Admitted requests run
on `max_parallel` worker threads in arrival order, each one call of `alignment.sampling.generate` with a `TokenStream`
attached. The slot is given back when the generation ends, not when its client leaves, so the cap bounds the work
actually in flight.

Sampling draws from torch's global RNG, and `generate` seeds it per call: sampled requests therefore take turns on
one lock (a seed gives the same answer however busy the server is), while greedy requests, which draw nothing, are run
unseeded and in parallel.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..sampling import Answer, Halt, SamplingParams, TokenStream, generate


class Busy(Exception):
    """The admission cap is reached: the request is refused (HTTP 503) instead of queued."""


@dataclass
class ServedModel:
    """One model the server answers for: its public name, where it was loaded from, the loaded model and tokenizer."""

    name: str
    path: str
    model: object
    tokenizer: object
    stop_ids: list[int]
    context: int


class Job:
    """One admitted request: its streamer, a cancel flag, and the future of its answers."""

    def __init__(
        self, served: ServedModel, prompt_ids: list[int], params: SamplingParams, stop_strings=(), on_text=None
    ):
        self.served, self.prompt_ids, self.params = served, prompt_ids, params
        self.cancelled = threading.Event()
        self.stream = TokenStream(
            served.tokenizer, params.num_return_sequences, served.stop_ids, stop_strings, on_text, self.cancelled
        )
        self.future = None

    def cancel(self) -> None:
        """Stop the generation (its client went away): dropped before it starts, halted at its next token after."""
        self.cancelled.set()
        if self.future is not None:
            self.future.cancel()


class Engine:
    """The served models and the generation workers with the admission cap."""

    def __init__(
        self,
        models: list[ServedModel],
        max_pending: int = 16,
        max_parallel: int = 1,
        generate_options: dict | None = None,
    ):
        self.models = {m.name: m for m in models}
        self.max_pending, self.max_parallel = max_pending, max_parallel
        self.generate_options = dict(generate_options or {})  # e.g. {"draft_model": ...}, passed to `generate`
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="align-generate")
        self._lock = threading.Lock()
        self._rng = threading.Lock()
        self.pending = self.running = self.completed = self.refused = self.tokens = 0
        self._jobs: set[Job] = set()

    def submit(
        self, served: ServedModel, prompt_ids: list[int], params: SamplingParams, stop_strings=(), on_text=None
    ) -> Job:
        """Admit a generation (or raise Busy) and start it when a worker is free; returns its Job."""
        job = Job(served, prompt_ids, params, stop_strings, on_text)
        with self._lock:
            if self.pending >= self.max_pending:
                self.refused += 1
                raise Busy(
                    f"server busy: {self.pending} requests are running or waiting, the most it admits "
                    f"(max_pending {self.max_pending}); retry later"
                )
            self.pending += 1
            self._jobs.add(job)
        job.future = self._pool.submit(self._run, job)
        job.future.add_done_callback(lambda f: self._release(job, f))
        return job

    def _release(self, job: Job, future) -> None:
        with self._lock:
            self.pending -= 1
            self._jobs.discard(job)
            if not future.cancelled() and future.exception() is None:
                self.completed += 1
                self.tokens += sum(a.tokens for a in future.result())

    def _run(self, job: Job) -> list[Answer]:
        if job.cancelled.is_set():
            return job.stream.close()
        params = job.params
        if params.greedy:  # greedy draws no random numbers: leave the RNG to the sampled requests
            params = dataclasses.replace(params, seed=None)
        with self._lock:
            self.running += 1
        try:
            with contextlib.nullcontext() if params.greedy else self._rng:
                try:
                    generate(
                        job.served.model,
                        job.served.tokenizer,
                        [job.prompt_ids],
                        params,
                        streamer=job.stream,
                        **self.generate_options,
                    )
                except Halt:
                    pass
            return job.stream.close()
        finally:
            with self._lock:
                self.running -= 1

    def status(self) -> dict:
        """Counters for /health."""
        with self._lock:
            return {
                "pending": self.pending,
                "running": self.running,
                "cancelling": sum(j.cancelled.is_set() for j in self._jobs),
                "max_pending": self.max_pending,
                "max_parallel": self.max_parallel,
                "completed": self.completed,
                "refused": self.refused,
                "generated_tokens": self.tokens,
            }

    def shutdown(self) -> None:
        """Stop every generation (waiting ones are dropped, running ones halt at their next token) and the workers."""
        with self._lock:
            jobs = list(self._jobs)
        for job in jobs:
            job.cancel()
        self._pool.shutdown(wait=True, cancel_futures=True)
