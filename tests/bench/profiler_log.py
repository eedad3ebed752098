"""What a benchmark run must not print: the lines torch's profiler writes from C++ to file descriptor 2
(Kineto's start/stop and error log, c10's allocator warning, as torch 2.11-2.14 print them)."""

from __future__ import annotations

import os
import re

PROFILER_WORDS = re.compile(r"USDT|STAGE:|profiler_st(art|op)|ActivityProfiler|Kineto|CPUAllocator\.cpp")


def default_log_levels() -> dict[str, str]:
    """This process's environment without the variables that set torch's C++ log levels: what a user has."""
    return {k: v for k, v in os.environ.items() if k not in ("KINETO_LOG_LEVEL", "TORCH_CPP_LOG_LEVEL")}


def assert_no_profiler_line(output: str) -> None:
    assert not [line for line in output.splitlines() if PROFILER_WORDS.search(line)], output[-4000:]
