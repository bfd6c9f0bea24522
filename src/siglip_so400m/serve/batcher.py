"""Dynamic batching across requests, and the server's Prometheus metrics (written by hand).

One worker thread owns the model: it takes the oldest queued item, waits at most `max_wait_s` from
that item's arrival for more of the same kind (texts and images never share a batch), runs one
forward pass on up to `max_batch` items and hands each item its row. torch releases the GIL while
it computes, so the event loop and the decoding threads keep going. The queue is bounded in items:
a request whose items do not all fit is refused whole (the caller answers 503), so memory never
grows with the load.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..model import SigLIP

KINDS = ("text", "image")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class QueueFull(Exception):
    """The batch queue cannot take a request's items now: answer 503 and let the client retry."""


class Closed(Exception):
    """The batcher is shutting down and takes no new work."""


@dataclass
class _Item:
    kind: str
    x: Tensor  # (L,) int64 token ids or (3, S, S) float32 pixels
    future: Future = field(default_factory=Future)
    t: float = field(default_factory=time.monotonic)


class Histogram:
    """A Prometheus histogram: cumulative counts per upper bound, plus sum and count."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)  # the last is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value

    def lines(self, name: str, labels: str) -> list[str]:
        sep = "," if labels else ""
        out, total = [], 0
        for bound, n in zip([*map(_num, self.buckets), "+Inf"], self.counts, strict=True):
            total += n
            out.append(f'{name}_bucket{{{labels}{sep}le="{bound}"}} {total}')
        brace = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{brace} {self.sum:.6f}", f"{name}_count{brace} {total}"]
        return out


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


class Metrics:
    """Counters and histograms the server exposes at GET /metrics; every method is thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.latency: dict[str, Histogram] = {}
        self.batch_size = {k: Histogram(BATCH_BUCKETS) for k in KINDS}
        self.batch_seconds = {k: Histogram(LATENCY_BUCKETS) for k in KINDS}
        self.items: Counter[str] = Counter()
        self.labels: Counter[str] = Counter()  # label-embedding memory: "hit" or "miss"
        self.in_flight = 0
        self.unanswered = 0  # requests whose response never went out whole

    def request_started(self) -> None:
        with self._lock:
            self.in_flight += 1

    def request_done(self, endpoint: str, status: int, seconds: float, complete: bool = True) -> None:
        with self._lock:
            self.in_flight -= 1
            if not complete:
                self.unanswered += 1
                return
            self.requests[endpoint, status] += 1
            self.latency.setdefault(endpoint, Histogram(LATENCY_BUCKETS)).observe(seconds)

    def batch_done(self, kind: str, size: int, seconds: float) -> None:
        with self._lock:
            self.batch_size[kind].observe(size)
            self.batch_seconds[kind].observe(seconds)
            self.items[kind] += size

    def label_cache(self, hits: int, misses: int) -> None:
        with self._lock:
            self.labels["hit"] += hits
            self.labels["miss"] += misses

    def answered(self, endpoint: str) -> int:
        with self._lock:
            return sum(n for (e, _), n in self.requests.items() if e == endpoint)

    def render(self, queue_depth: dict[str, int], max_queue: int) -> str:
        """The Prometheus text exposition format, version 0.0.4."""
        with self._lock:
            out = ["# HELP siglip_requests_total HTTP requests answered, by endpoint and status.",
                   "# TYPE siglip_requests_total counter"]
            out += [f'siglip_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items())]
            out += ["# HELP siglip_request_errors_total HTTP requests answered with a 4xx or 5xx status.",
                    "# TYPE siglip_request_errors_total counter"]
            out += [f'siglip_request_errors_total{{endpoint="{e}",status="{s}"}} {n}'
                    for (e, s), n in sorted(self.requests.items()) if s >= 400]
            out += ["# HELP siglip_request_duration_seconds Time from request start to response end.",
                    "# TYPE siglip_request_duration_seconds histogram"]
            for e, h in sorted(self.latency.items()):
                out += h.lines("siglip_request_duration_seconds", f'endpoint="{e}"')
            out += ["# HELP siglip_batch_size Items per model forward pass.",
                    "# TYPE siglip_batch_size histogram"]
            for k in KINDS:
                out += self.batch_size[k].lines("siglip_batch_size", f'kind="{k}"')
            out += ["# HELP siglip_batch_duration_seconds Time of one model forward pass.",
                    "# TYPE siglip_batch_duration_seconds histogram"]
            for k in KINDS:
                out += self.batch_seconds[k].lines("siglip_batch_duration_seconds", f'kind="{k}"')
            out += ["# HELP siglip_items_total Items (texts, images) embedded.",
                    "# TYPE siglip_items_total counter"]
            out += [f'siglip_items_total{{kind="{k}"}} {self.items[k]}' for k in KINDS]
            out += ["# HELP siglip_label_cache_total Classify labels found in (hit) or added to (miss) "
                    "the shared label-embedding memory.", "# TYPE siglip_label_cache_total counter"]
            out += [f'siglip_label_cache_total{{result="{r}"}} {self.labels[r]}' for r in ("hit", "miss")]
            out += ["# HELP siglip_queue_depth Items waiting for the model.",
                    "# TYPE siglip_queue_depth gauge"]
            out += [f'siglip_queue_depth{{kind="{k}"}} {queue_depth.get(k, 0)}' for k in KINDS]
            out += ["# HELP siglip_queue_capacity Items the queue holds before answering 503.",
                    "# TYPE siglip_queue_capacity gauge", f"siglip_queue_capacity {max_queue}",
                    "# HELP siglip_requests_unanswered_total Requests ended before their whole "
                    "response went out (client gone, or the shutdown's grace period over).",
                    "# TYPE siglip_requests_unanswered_total counter",
                    f"siglip_requests_unanswered_total {self.unanswered}",
                    "# HELP siglip_requests_in_flight HTTP requests being handled.",
                    "# TYPE siglip_requests_in_flight gauge", f"siglip_requests_in_flight {self.in_flight}"]
        return "\n".join(out) + "\n"


class Batcher:
    """Gathers texts and images from concurrent requests into model batches on one worker thread."""

    def __init__(self, model: SigLIP, *, max_batch: int, max_wait_s: float, max_queue: int,
                 metrics: Metrics, delay_s: float = 0.0, max_calls: int = 16,
                 collate_images: Callable[[list], Any] = torch.stack):
        if max_batch < 1 or max_queue < 1 or max_wait_s < 0 or max_calls < 1:
            raise ValueError("max_batch, max_queue and max_calls must be at least 1, max_wait_s at least 0")
        self.model = model
        self.device = next(model.parameters()).device
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        # Calls waiting for the worker (each embeds one classify request's new labels: up to
        # --max-labels x 32 templates texts), bounded like the item queue.
        self.max_calls = max_calls
        self.metrics = metrics
        # The image processor's own batching: a stack, or SigLIP 2 NaFlex images of different shapes
        # padded into one batch (the model masks the padding, or on CPU packs the images' own tokens).
        self.collate_images = collate_images
        # Test hook only (SIGLIP_SO400M_SERVE_TEST_DELAY_MS): a slow model, to fill the queue.
        self.delay_s = delay_s
        self._queues: dict[str, deque[_Item]] = {k: deque() for k in KINDS}
        self._calls: deque[tuple[Callable[[], object], Future]] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="siglip-model", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def depth(self) -> dict[str, int]:
        with self._cond:
            return {k: len(q) for k, q in self._queues.items()}

    def submit(self, items: Sequence[tuple[str, Tensor]]) -> list[Future]:
        """Queue (kind, tensor) items, all or none; each future gets that item's (D,) raw
        embedding in the model's dtype. Raises QueueFull or Closed."""
        new = [_Item(kind, x) for kind, x in items]
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if sum(map(len, self._queues.values())) + len(new) > self.max_queue:
                raise QueueFull(f"the batch queue is full ({self.max_queue} items)")
            for item in new:
                self._queues[item.kind].append(item)
            self._cond.notify()
        return [item.future for item in new]

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn on the worker thread, between batches (work that uses the model but is not
        batched, such as embedding new labels). Raises QueueFull when max_calls are waiting."""
        future: Future = Future()
        with self._cond:
            if self._closing:
                raise Closed("the server is shutting down")
            if len(self._calls) >= self.max_calls:
                raise QueueFull(f"the model's queue for unbatched work is full ({self.max_calls} "
                                "requests waiting: classify requests with new labels, attention "
                                "overlays)")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def close(self, timeout: float | None = None) -> None:
        """Take no new work, finish everything queued, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _next(self) -> tuple[str, list] | None:
        """Under the lock: the next call or batch to run, or None once closed and drained."""
        while True:
            if self._calls:
                return "call", [self._calls.popleft()]
            heads = [(q[0].t, k) for k, q in self._queues.items() if q]
            if not heads:
                if self._closing:
                    return None
                self._cond.wait()
                continue
            t0, kind = min(heads)
            queue = self._queues[kind]
            # Wait for a fuller batch, but never past max_wait after the oldest item came in (an
            # item that queued while the previous batch ran is usually past it already).
            while len(queue) < self.max_batch and not self._closing and not self._calls:
                remaining = t0 + self.max_wait_s - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = []
            while queue and len(batch) < self.max_batch:
                item = queue.popleft()
                if item.future.set_running_or_notify_cancel():  # False: its request went away
                    batch.append(item)
            if batch:
                return kind, batch

    def _run(self) -> None:
        while True:
            with self._cond:
                job = self._next()
            if job is None:
                return
            kind, work = job
            if kind == "call":
                fn, future = work[0]
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn())
                    except BaseException as e:  # the caller gets it; the worker lives on
                        future.set_exception(e)
                continue
            if self.delay_s:
                time.sleep(self.delay_s)
            start = time.perf_counter()
            try:
                collate = self.collate_images if kind == "image" else torch.stack
                x = collate([item.x for item in work]).to(self.device)  # (B, L), (B, 3, S, S), NaFlex
                with torch.inference_mode():
                    emb = self.model.encode_text(x) if kind == "text" else self.model.encode_image(x)
                emb = emb.cpu()  # (B, D), the model's dtype
            except BaseException as e:
                for item in work:
                    item.future.set_exception(e)
                continue
            self.metrics.batch_done(kind, len(work), time.perf_counter() - start)
            for item, row in zip(work, emb, strict=True):
                item.future.set_result(row)
