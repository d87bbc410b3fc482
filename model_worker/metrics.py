"""The worker's Prometheus metrics. Every one has `model_name`, the worker's model name (--name), as vLLM's
metrics do."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

STEP_LATENCY = Histogram(
    "chorus_worker_forward_seconds",
    "Duration of one (batched) forward pass.",
    ["model_name"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BATCH_SIZE = Histogram(
    "chorus_worker_batch_size", "Sessions sharing one forward pass.", ["model_name"], buckets=(1, 2, 4, 8, 16, 32, 64)
)
QUEUE_DEPTH = Gauge("chorus_worker_queue_depth", "Steps waiting for the next forward pass.", ["model_name"])
SESSIONS = Gauge("chorus_worker_sessions", "Open sessions (each holds a KV cache).", ["model_name"])
KV_CACHE_BYTES = Gauge("chorus_worker_kv_cache_bytes", "Memory of the KV blocks the sessions hold.", ["model_name"])
KV_CACHED_BYTES = Gauge(
    "chorus_worker_kv_prefix_cached_bytes",
    "Memory of the KV blocks kept for prefix-cache hits that no session holds (on CPU resident: it grows "
    "toward the KV budget with distinct prompts, then the least recently used are reused).",
    ["model_name"],
)
# vLLM's vllm:kv_cache_usage_perc (also a fraction, 0-1, despite its name).
KV_USAGE = Gauge(
    "chorus_worker_kv_usage_ratio",
    "KV blocks held by sessions as a fraction of the pool (the fullest group).",
    ["model_name"],
)
TOKENS_FED = Histogram(
    "chorus_worker_tokens_fed",
    "Tokens fed per session step (1 = plain decode).",
    ["model_name"],
    buckets=(1, 2, 4, 8, 16, 64, 256, 1024, 4096),
)
# vLLM's prefix_cache_queries / prefix_cache_hits (in tokens).
PREFIX_CACHE_QUERIES = Counter(
    "chorus_worker_prefix_cache_queries", "Tokens of new feeds looked up in the prefix cache.", ["model_name"]
)
PREFIX_CACHE_HITS = Counter(
    "chorus_worker_prefix_cache_hits", "Tokens taken from the prefix cache instead of computed.", ["model_name"]
)
PREFIX_CACHE_EVICTIONS = Counter(
    "chorus_worker_prefix_cache_evictions", "Cached KV blocks whose space was reused.", ["model_name"]
)
PASS_PHASE = Histogram(
    "chorus_worker_pass_phase_seconds",
    "Time of each phase of a forward pass (pass_clock.py): dispatch, wait (CUDA), prepare, forward, rows, "
    "return, and the device's own time for the pass (CUDA).",
    ["model_name", "phase"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5),
)
GRAPH_CAPTURES = Counter(
    "chorus_worker_cuda_graph_captures",
    "CUDA graphs captured (one per decode pass shape met; each capture holds up that pass by a fraction of a second).",
    ["model_name"],
)
