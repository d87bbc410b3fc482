"""The coordinator's Prometheus metrics (names follow Prometheus conventions: chorus_ prefix, units).

Every metric has `model_name`, as vLLM's do: the model the request named, as OpenAI clients name it:
the ensemble's id (MODEL_NAME, "chorus"), or a member's name for a request to that member alone.
Metrics about one member model also have `member`, that model's name (the `model_name` of its
workers' own metrics).
"""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

from coordinator.convert import ENSEMBLE_ID

MODEL_NAME = ENSEMBLE_ID  # the whole ensemble's model_name

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_FIRST_TOKEN_BUCKETS = (*_LATENCY_BUCKETS, 300, 600)  # a long prompt's prefill behind others' takes minutes
# A request may run for an hour (long generations at low throughput): buckets up to 3600 s keep the
# percentiles of slow requests measurable instead of clamped at the last bucket.
_E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 20, 30, 45, 60, 120, 300, 600, 900, 1200, 1800, 2700, 3600)
# Tokens per request, 1-2-5 steps (as vLLM's) up to a million.
_TOKEN_BUCKETS = (*(m * 10**e for e in range(6) for m in (1, 2, 5)), 1_000_000)

# Why a request failed (chorus_request_failures_total's `reason`), as the front ends answer it:
FAILURE_REASONS = (
    "invalid",  # INVALID_ARGUMENT / HTTP 400 (also a worker's INVALID_ARGUMENT: a prompt past its context)
    "overloaded",  # RESOURCE_EXHAUSTED / 429: the coordinator at limits.max_running, or a worker's KV slots full
    "not_ready",  # a model has no ready worker: UNAVAILABLE / 503
    "draining",  # this coordinator is shutting down: UNAVAILABLE / 503
    "worker_lost",  # a member's worker died or hung mid-request (policy fail): UNAVAILABLE / 503
    "worker_draining",  # a member's worker is shutting down and refused or ended the session: UNAVAILABLE / 503
    "worker_failed",  # a member's worker raised on the request (INTERNAL from the worker): INTERNAL / 500
    "deadline",  # the client's deadline passed: DEADLINE_EXCEEDED
    "cancelled",  # the client went away (cancelled the call, closed the connection)
    "internal",  # anything else: a bug in the coordinator (UNKNOWN / 500)
)

TIME_TO_FIRST_TOKEN = Histogram(
    "chorus_time_to_first_token_seconds",
    "Time from request start to its first chosen token.",
    ["model_name", "strategy"],
    buckets=_FIRST_TOKEN_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "chorus_inter_token_latency_seconds",
    "Time between consecutive chosen tokens.",
    ["model_name", "strategy"],
    buckets=_LATENCY_BUCKETS,
)
E2E_LATENCY = Histogram(
    "chorus_e2e_request_latency_seconds",
    "Time from request start to its end, per finished conversation.",
    ["model_name", "strategy", "finish_reason"],
    buckets=_E2E_BUCKETS,
)
REQUEST_PROMPT_TOKENS = Histogram(
    "chorus_request_prompt_tokens",
    "Prompt tokens per finished conversation (its longest member tokenization).",
    ["model_name"],
    buckets=_TOKEN_BUCKETS,
)
REQUEST_GENERATION_TOKENS = Histogram(
    "chorus_request_generation_tokens",
    "Generated (chosen) tokens per finished conversation.",
    ["model_name"],
    buckets=_TOKEN_BUCKETS,
)
REQUEST_FAILURES = Counter(
    "chorus_request_failures_total",
    "Requests that failed, by reason; once per request, as its front end answered.",
    ["model_name", "reason"],
)
PROMPT_TOKENS = Counter("chorus_prompt_tokens_total", "Prompt tokens, per member model.", ["model_name", "member"])
GENERATION_TOKENS = Counter(
    "chorus_generation_tokens_total", "Chosen (union) tokens generated.", ["model_name", "strategy"]
)
REQUESTS_RUNNING = Gauge("chorus_requests_running", "Conversations being generated now.", ["model_name"])
STEPS = Counter("chorus_steps_total", "Decoding steps.", ["model_name", "strategy"])
STEPS_ENSEMBLED = Counter(
    "chorus_steps_ensembled_total", "Steps where more than one model was asked.", ["model_name", "strategy"]
)
MODEL_ASKED = Counter(
    "chorus_model_steps_total", "Steps where a model was asked.", ["model_name", "strategy", "member"]
)
MODEL_AGREED = Counter(
    "chorus_model_agreement_total",
    "Steps where a model's own top choice was the chosen token.",
    ["model_name", "strategy", "member"],
)
MEMBER_QUEUE = Histogram(
    "chorus_member_queue_seconds",
    "Time a member's step waited in its worker's queue before its first forward pass (the worker's own report).",
    ["model_name", "member"],
    buckets=_LATENCY_BUCKETS,
)

# Series that exist from the start (0, not absent), so rate() and alerts on them work before the first event.
REQUESTS_RUNNING.labels(MODEL_NAME)
for _reason in FAILURE_REASONS:
    REQUEST_FAILURES.labels(MODEL_NAME, _reason)


def member_queued(model_name: str | None, member: str, queue_ms: float) -> None:
    """A member's step result said it waited queue_ms in its worker (behind other sessions' passes)."""
    MEMBER_QUEUE.labels(model_name or MODEL_NAME, member).observe(queue_ms / 1000)


def count_failure(reason: str, model_name: str = MODEL_NAME) -> None:
    """One failed request (a reason of FAILURE_REASONS); coordinator.failures.count_failure classifies."""
    REQUEST_FAILURES.labels(model_name, reason).inc()


class RequestMetrics:
    """Records one conversation's metrics as it is generated."""

    def __init__(self, strategy: str, model_names: list[str], model: str | None = None) -> None:
        """model_names: the models generating it; model: the member the request named (None: the ensemble)."""
        self._model_name = model or MODEL_NAME
        self._strategy = strategy
        self._models = model_names
        self._started = time.perf_counter()
        self._last_token: float | None = None
        self._prompt_tokens = 0
        self._generated = 0
        REQUESTS_RUNNING.labels(self._model_name).inc()

    def opened(self, prompt_tokens: list[int]) -> None:
        for name, n in zip(self._models, prompt_tokens, strict=True):
            PROMPT_TOKENS.labels(self._model_name, name).inc(n)
        self._prompt_tokens = max(prompt_tokens, default=0)  # as the OpenAI API's usage.prompt_tokens

    def step(self, ensembled: bool, top_choices: dict[int, int], chosen: int) -> None:
        """top_choices: each asked model's own most likely union entry."""
        STEPS.labels(self._model_name, self._strategy).inc()
        if ensembled:
            STEPS_ENSEMBLED.labels(self._model_name, self._strategy).inc()
        for i, top in top_choices.items():
            MODEL_ASKED.labels(self._model_name, self._strategy, self._models[i]).inc()
            if top == chosen:
                MODEL_AGREED.labels(self._model_name, self._strategy, self._models[i]).inc()

    def token(self) -> None:
        now = time.perf_counter()
        if self._last_token is None:
            TIME_TO_FIRST_TOKEN.labels(self._model_name, self._strategy).observe(now - self._started)
        else:
            INTER_TOKEN_LATENCY.labels(self._model_name, self._strategy).observe(now - self._last_token)
        self._last_token = now
        self._generated += 1
        GENERATION_TOKENS.labels(self._model_name, self._strategy).inc()

    def finished(self, reason: str) -> None:
        E2E_LATENCY.labels(self._model_name, self._strategy, reason).observe(time.perf_counter() - self._started)
        REQUEST_PROMPT_TOKENS.labels(self._model_name).observe(self._prompt_tokens)
        REQUEST_GENERATION_TOKENS.labels(self._model_name).observe(self._generated)

    def close(self) -> None:
        REQUESTS_RUNNING.labels(self._model_name).dec()
