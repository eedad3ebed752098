"""Per-call timing and peak memory of a closure: CUDA events or ``perf_counter``, a CUDA graph's replays, the
caching allocator's or the profiler's peak, and the summary statistics of the samples (bench/harness.py)."""

from __future__ import annotations

import contextlib
import math
import os
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

Closure = Callable[[], object]

# What torch's profiler writes from C++ to the process's stderr: Kineto's log each time it starts and
# stops (``USDT: ... profiler_start``, ``STAGE: ...``; ``ERROR: ... gpuGetDeviceCount failed`` on a machine
# without a GPU), and c10's warning when a block allocated before the profiling is freed during it.
PROFILER_LOG_LINE = re.compile(
    rb"(?:VERBOSE|INFO|WARNING|STAGE|ERROR|USDT):\d{4}-\d\d-\d\d [\d:.]+ \d+:\d+ \S+:\d+\] "
    rb"|\[W\d{4} [\d:.]+ CPUAllocator\.cpp:\d+\] Memory block of unknown size"
)


class Timer:
    """Per-call times of closures: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def elapsed_s(self, fn: Closure, calls: int) -> float:
        """Seconds for ``calls`` back-to-back calls, starting from an idle device."""
        self.sync()
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
        begin = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - begin

    def graph_per_call_s(self, fn: Closure, rounds: int, calls: int = 10) -> list[float]:
        """Per-call seconds of a CUDA graph holding ``calls`` calls of ``fn``, one sample per replay."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # graph capture wants its warm-up on a side stream
            for _ in range(3):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        return [self.elapsed_s(graph.replay, 1) / calls for _ in range(rounds)]


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Drop the profiler's log lines (``PROFILER_LOG_LINE``) written during the block; pass the rest on.

    The profiler is what measures the CPU's peak memory (the CPU allocator keeps no statistics), and it logs
    two lines or more per use, from C++ straight to file descriptor 2, bypassing ``sys.stderr``. Kineto's own
    knob, ``KINETO_LOG_LEVEL``, is read only when a process first profiles, and its top level is the very
    ``profiler_start`` line: it could silence the start and stop lines only with Kineto's errors, and never
    c10's warning. So descriptor 2 goes to a file for the block, and what else was written there goes back to
    stderr after it.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            lines = sink.read().splitlines(keepends=True)
            kept = [line for line in lines if not PROFILER_LOG_LINE.match(line)]
            if kept:
                os.write(2, b"".join(kept))


def cuda_clock() -> float:
    """``perf_counter`` once the current CUDA device has run what was queued: pytest-benchmark's timer for the
    CUDA cases (bench/test_bench_cases.py), so that a round of calls includes their kernels."""
    torch.cuda.synchronize()
    return time.perf_counter()


def peak_bytes(fn: Closure, device: str) -> int | None:
    """Peak memory allocated during one call of ``fn``, above what was allocated before it (bytes).

    CUDA: the caching allocator's peak. CPU: the running sum of the allocations and frees that the profiler
    records during the call (``profile_memory``), in time order; None when the profiler cannot say. The
    profiler's log lines are dropped (``quiet_profiler``).
    """
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    try:
        events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
        events.sort(key=lambda e: e.start_ns())
        current = peak = 0
        for event in events:
            current += event.nbytes()
            peak = max(peak, current)
    except AttributeError:  # a torch whose profiler results look otherwise
        return None
    return peak


def quantile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of already sorted values."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def summary_ms(per_call_s: Sequence[float]) -> dict[str, Any]:
    ordered = sorted(per_call_s)
    return {
        "median_ms": statistics.median(ordered) * 1e3,
        "p20_ms": quantile(ordered, 0.2) * 1e3,
        "p80_ms": quantile(ordered, 0.8) * 1e3,
        "min_ms": ordered[0] * 1e3,
        "samples_ms": [round(s * 1e3, 6) for s in per_call_s],
    }
