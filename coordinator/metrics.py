"""The coordinator's Prometheus metrics (names follow Prometheus conventions: chorus_ prefix, units)."""

from __future__ import annotations

import time

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

TIME_TO_FIRST_TOKEN = Histogram(
    "chorus_time_to_first_token_seconds", "Time from request start to its first chosen token.", ["strategy"],
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
INTER_TOKEN_LATENCY = Histogram(
    "chorus_inter_token_latency_seconds", "Time between consecutive chosen tokens.", ["strategy"],
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
E2E_LATENCY = Histogram(
    "chorus_e2e_request_latency_seconds", "Time from request start to its end.", ["strategy", "finish_reason"],
    buckets=_LATENCY_BUCKETS,
)  # fmt: skip
PROMPT_TOKENS = Counter("chorus_prompt_tokens_total", "Prompt tokens, per member model.", ["model"])
GENERATION_TOKENS = Counter("chorus_generation_tokens_total", "Chosen (union) tokens generated.", ["strategy"])
REQUESTS_RUNNING = Gauge("chorus_requests_running", "Conversations being generated now.")
STEPS = Counter("chorus_steps_total", "Decoding steps.", ["strategy"])
STEPS_ENSEMBLED = Counter("chorus_steps_ensembled_total", "Steps where more than one model was asked.", ["strategy"])
MODEL_ASKED = Counter("chorus_model_steps_total", "Steps where a model was asked.", ["strategy", "model"])
MODEL_AGREED = Counter(
    "chorus_model_agreement_total", "Steps where a model's own top choice was the chosen token.", ["strategy", "model"]
)


class RequestMetrics:
    """Records one conversation's metrics as it is generated."""

    def __init__(self, strategy: str, model_names: list[str]) -> None:
        self._strategy = strategy
        self._models = model_names
        self._started = time.perf_counter()
        self._last_token: float | None = None
        REQUESTS_RUNNING.inc()

    def opened(self, prompt_tokens: list[int]) -> None:
        for name, n in zip(self._models, prompt_tokens, strict=True):
            PROMPT_TOKENS.labels(name).inc(n)

    def step(self, ensembled: bool, top_choices: dict[int, int], chosen: int) -> None:
        """top_choices: each asked model's own most likely union entry."""
        STEPS.labels(self._strategy).inc()
        if ensembled:
            STEPS_ENSEMBLED.labels(self._strategy).inc()
        for i, top in top_choices.items():
            MODEL_ASKED.labels(self._strategy, self._models[i]).inc()
            if top == chosen:
                MODEL_AGREED.labels(self._strategy, self._models[i]).inc()

    def token(self) -> None:
        now = time.perf_counter()
        if self._last_token is None:
            TIME_TO_FIRST_TOKEN.labels(self._strategy).observe(now - self._started)
        else:
            INTER_TOKEN_LATENCY.labels(self._strategy).observe(now - self._last_token)
        self._last_token = now
        GENERATION_TOKENS.labels(self._strategy).inc()

    def finished(self, reason: str) -> None:
        E2E_LATENCY.labels(self._strategy, reason).observe(time.perf_counter() - self._started)

    def close(self) -> None:
        REQUESTS_RUNNING.dec()
