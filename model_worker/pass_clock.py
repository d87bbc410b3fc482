"""Where a forward pass's time goes (`chorus_worker_pass_phase_seconds`), phase by phase:

- dispatch: from the scheduler handing the pass to the forward thread until that thread starts it;
- wait (CUDA): the device finishing the work queued before the pass (the last pass's row copies, blocks
  zeroed as sessions grow, the sessions' own softmaxes); the pass's first input copy would wait for it anyway;
- prepare: its inputs built on the host and copied to the device;
- forward: the model's forward pass, or a CUDA graph's replay, as the host sees it (launches);
- rows: the wanted output rows picked out (on CUDA their index's copy waits for the device: most of a
  pass's device time shows here);
- return: from the forward thread finishing until the scheduler takes the rows;
- device (CUDA): the device's own time for the pass, between two CUDA events, read at the next pass.

The sum of the host phases is the pass as the scheduler times it (`chorus_worker_forward_seconds`); a
pass much longer than its device time spends the difference on the host (Python, launches, thread hand-offs).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from model_worker import metrics


class PassClock:
    def __init__(self, device: torch.device, model_name: str) -> None:
        self.cuda = device.type == "cuda"
        phases = ["dispatch", "prepare", "forward", "rows", "return"] + (["wait", "device"] if self.cuda else [])
        self._phase = {p: metrics.PASS_PHASE.labels(model_name, p) for p in phases}
        self._at = 0.0
        self.started_at = 0.0  # when the forward thread began the last pass
        self.ended_at = 0.0  # and ended it
        self._first: Any = None  # the CUDA event recorded as this pass began
        self._done: tuple[Any, Any] | None = None  # the last finished pass's two events, not yet read

    def begin(self) -> None:
        """The forward thread starts a pass."""
        self.started_at = self._at = time.perf_counter()
        if self.cuda:
            torch.cuda.current_stream().synchronize()
            self.mark("wait")
            if self._done is not None:  # the stream is idle: the last pass's events have completed
                first, last = self._done
                self._phase["device"].observe(first.elapsed_time(last) / 1e3)
                self._done = None
            self._first = torch.cuda.Event(enable_timing=True)
            self._first.record()

    def mark(self, phase: str) -> None:
        """The phase that began at the last mark ends now."""
        now = time.perf_counter()
        self._phase[phase].observe(now - self._at)
        self._at = now

    def end(self) -> None:
        """The forward thread ends the pass (the rows were picked out last)."""
        self.mark("rows")
        if self._first is not None:
            last = torch.cuda.Event(enable_timing=True)
            last.record()
            self._done, self._first = (self._first, last), None
        self.ended_at = self._at

    def handed(self, dispatched: float, returned: float) -> None:
        """The scheduler's side: it handed the pass over at `dispatched` and had its rows at `returned`."""
        self._phase["dispatch"].observe(max(0.0, self.started_at - dispatched))
        self._phase["return"].observe(max(0.0, returned - self.ended_at))
