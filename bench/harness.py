"""The benchmark harness: cases, interleaved timing, peak memory, environment, and the results file.

A :class:`Case` is one (op, workload, mode, provider) to time; cases that differ only by provider form a
group and are timed together, round by round in a rotating order, so that a change in the machine's other load
touches every provider alike and the ratios between them come from the same minutes. Per case:

* the first call (compilation, autotuning, allocator warm-up) is timed on its own (``first_call_s``);
* calls per sample are chosen so that one sample lasts about ``sample_s`` (at least one call);
* each round takes one sample of every provider (``rounds`` of them; fewer, but ``min_rounds`` at least, for a
  call too slow to fit ``case_s`` seconds of samples); the row keeps every sample, the median and the
  20th/80th percentiles of the per-call time;
* one more call measures the peak memory allocated during a call, above what was allocated before it (CUDA:
  the caching allocator's peak; CPU: the allocations the profiler records, summed in time order).

Timing (:mod:`bench.timing`) is ``perf_counter`` on the CPU and CUDA events on a GPU (the median of samples
of back-to-back calls after warm-up, as ``triton.testing.do_bench`` does, without flushing the L2 cache: a
training step calls these ops with warm caches). A case may also be timed as a replayed CUDA graph (launch
overhead removed).

Rows are appended to a JSON-lines file as each group finishes (a run cut short keeps what it measured), after
one ``run`` record holding the environment: device, versions, commit, threads and load average.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bench.environment import busy_processes, environment, load_average, package_version
from bench.timing import Closure, Timer, peak_bytes, quiet_profiler, summary_ms

__all__ = ["busy_processes", "environment", "load_average", "package_version"]

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
RESULTS_FILE = RESULTS / "benchmarks.jsonl"


@dataclass
class Case:
    """One row: ``make()`` builds the inputs on ``device`` and returns the closure to time."""

    op: str
    workload: str
    mode: str  # fwd | fwd+bwd | train-step | copy
    provider: str
    make: Callable[[], Closure] = field(repr=False)
    device: str = "cpu"
    regime: str | None = None
    dtype: str = "float32"
    section: str = ""  # cases of one section are planned together (defaults to the op)
    requires: Callable[[], str | None] = field(default=lambda: None, repr=False)  # why it cannot run here
    graph: bool = False  # also time a CUDA graph of the closure
    rounds: int | None = None  # overrides the settings' rounds (very long calls)
    info: dict[str, Any] = field(default_factory=dict)  # extra fields of the row (shapes, bytes, notes)
    after: Callable[[Closure], dict[str, Any]] | None = field(default=None, repr=False)  # extra measurement

    def __post_init__(self) -> None:
        if not self.section:
            self.section = self.op

    @property
    def id(self) -> str:
        parts = [self.op, self.provider, self.mode, self.workload]
        if self.regime is not None:
            parts.append(self.regime)
        if self.dtype != "float32":
            parts.append(self.dtype)
        return "/".join(parts)

    @property
    def group(self) -> tuple:
        """The cases timed together: everything but the provider."""
        return (self.section, self.op, self.workload, self.mode, self.regime, self.dtype, self.device)

    def describe(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "op": self.op,
            "section": self.section,
            "workload": self.workload,
            "mode": self.mode,
            "provider": self.provider,
            "regime": self.regime,
            "dtype": self.dtype,
            "device": self.device,
            **self.info,
        }


@dataclass(frozen=True)
class Settings:
    rounds: int = 7
    sample_s: float = 0.02  # target length of one sample
    max_calls: int = 1000  # calls per sample at most
    warmup: int = 2  # calls after the first, before timing
    budget_s: float | None = None  # start no new group after this many seconds
    graphs: bool = True  # time CUDA graphs where a case allows it
    case_s: float = 3.0  # timing seconds per case at most: slow calls get fewer rounds (min_rounds at least)
    min_rounds: int = 3


FULL = Settings()
QUICK = Settings(rounds=3, sample_s=0.004, max_calls=200, warmup=1)


def settings_for(quick: bool, rounds: int | None = None, budget_s: float | None = None) -> Settings:
    """The quick or the full settings, with a command line's rounds (if given) and budget."""
    base = QUICK if quick else FULL
    return replace(base, rounds=rounds or base.rounds, budget_s=budget_s)


def error_record(error: BaseException) -> dict[str, str]:
    return {
        "type": type(error).__name__,
        "message": str(error)[:2000],
        "traceback": traceback.format_exc()[-4000:],
    }


def _safe_requires(case: Case) -> str | None:
    try:
        return case.requires()
    except Exception as error:  # a broken optional package, say
        return f"checking what it needs failed: {type(error).__name__}: {error}"


def first_call(case: Case) -> tuple[Closure, float]:
    """The case's closure, called once; and the seconds that building it and the call took (compilation,
    autotuning and first-touch allocations happen here)."""
    started = time.perf_counter()
    fn = case.make()
    fn()
    Timer(case.device).sync()
    return fn, time.perf_counter() - started


def calibrate(fn: Closure, case: Case, settings: Settings, first_call_s: float) -> tuple[int, int]:
    """Warm ``fn`` up after its first call and choose ``(calls per sample, rounds)``: a sample lasts about
    ``settings.sample_s``; a slow call gets fewer rounds (``settings.case_s``, ``settings.min_rounds``)."""
    # A call already longer than a sample needs no further warm-up.
    warmup = settings.warmup if first_call_s < settings.sample_s * 10 else 0
    for _ in range(warmup):
        fn()
    estimate = Timer(case.device).elapsed_s(fn, 1) if warmup else first_call_s
    calls = max(1, min(settings.max_calls, int(settings.sample_s / max(estimate, 1e-7))))
    wanted = case.rounds or settings.rounds
    affordable = int(settings.case_s / max(calls * estimate, 1e-9))
    return calls, max(min(wanted, settings.min_rounds), min(wanted, affordable))


def measure_group(cases: Sequence[Case], settings: Settings) -> list[dict[str, Any]]:
    """Time the providers of one group, interleaved; never raises (failures are recorded in the rows)."""
    threads = torch.get_num_threads()
    rows: dict[int, dict[str, Any]] = {}
    live: dict[int, Closure] = {}
    for index, case in enumerate(cases):
        row = case.describe() | {"threads": threads, "load_avg": load_average()}
        rows[index] = row
        reason = _safe_requires(case)
        if reason is not None:
            row.update(status="skipped", reason=reason)
            continue
        try:
            live[index], row["first_call_s"] = first_call(case)
        except Exception as error:
            row.update(status="error", error=error_record(error))
    # Calls per sample from one timed call after the warm-up.
    calls: dict[int, int] = {}
    rounds_of: dict[int, int] = {}
    for index, fn in list(live.items()):
        try:
            first_s = rows[index]["first_call_s"]
            calls[index], rounds_of[index] = calibrate(fn, cases[index], settings, first_s)
        except Exception as error:
            rows[index].update(status="error", error=error_record(error))
            del live[index]
    samples: dict[int, list[float]] = {index: [] for index in live}
    order = list(live)
    for r in range(max(rounds_of.values(), default=0)):
        shift = r % len(order) if order else 0
        for index in order[shift:] + order[:shift]:  # a rotating order: no provider always goes first
            if index not in live or len(samples[index]) >= rounds_of[index]:
                continue
            try:
                seconds = Timer(cases[index].device).elapsed_s(live[index], calls[index])
                samples[index].append(seconds / calls[index])
            except Exception as error:
                rows[index].update(status="error", error=error_record(error))
                del live[index]
    memory: dict[int, int | None] = {}
    for index in list(live):  # one more call each, after the timing, for the peak memory
        try:
            memory[index] = peak_bytes(live[index], cases[index].device)
        except Exception as error:
            rows[index].update(status="error", error=error_record(error))
            del live[index]
    for index, fn in live.items():
        if rows[index].get("status") == "error":
            continue
        case, row = cases[index], rows[index]
        row.update(summary_ms(samples[index]))
        row.update(status="ok", calls_per_sample=calls[index], rounds=len(samples[index]))
        row["peak_bytes"] = memory.get(index)
        if case.info.get("bytes_moved") and case.mode in ("fwd", "copy"):
            row["achieved_gbps"] = case.info["bytes_moved"] / (row["median_ms"] * 1e-3) / 1e9
        if case.graph and settings.graphs and torch.device(case.device).type == "cuda":
            try:
                per_call = Timer(case.device).graph_per_call_s(fn, rounds=len(samples[index]))
                row["graph"] = {k: v for k, v in summary_ms(per_call).items() if k != "samples_ms"}
                if case.info.get("bytes_moved") and case.mode in ("fwd", "copy"):
                    fastest = min(row["median_ms"], row["graph"]["median_ms"])
                    row["achieved_gbps"] = case.info["bytes_moved"] / (fastest * 1e-3) / 1e9
            except Exception as error:  # not capturable: the eager timing stands
                row["graph_error"] = error_record(error)
                with contextlib.suppress(Exception):
                    torch.cuda.synchronize()
        if case.after is not None:
            try:
                with quiet_profiler():  # the extra measurements profile
                    row.update(case.after(fn))
            except Exception as error:
                row["after_error"] = error_record(error)
    return [rows[index] for index in range(len(cases))]


def groups_of(cases: Sequence[Case]) -> list[list[Case]]:
    """Cases grouped by everything but the provider, in the order the groups first appear."""
    grouped: dict[tuple, list[Case]] = {}
    for case in cases:
        grouped.setdefault(case.group, []).append(case)
    return list(grouped.values())


# ---------------------------------------------------------------------------------------------------------
# The results file


def append_records(path: Path, records: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as sink:
        for record in records:
            sink.write(json.dumps(record, default=str) + "\n")


def read_records(path: Path) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """``({run id: run record}, rows)`` of a results file; a line cut by a kill mid-write is skipped."""
    runs: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    if not path.exists():
        return runs, rows
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("record") == "run":
            runs[record["run"]] = record
        elif record.get("record") == "row":
            rows.append(record)
    return runs, rows


def run(
    cases: Sequence[Case],
    settings: Settings,
    out: Path,
    *,
    threads: Sequence[int] = (1,),
    command: str = "",
    busy: int = 0,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Measure ``cases`` at each thread count, appending a run record and the rows to ``out``; returns the
    run id. Groups not started within ``settings.budget_s`` are recorded as skipped."""
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:6]
    device = cases[0].device if cases else "cpu"
    header = {
        "record": "run",
        "run": run_id,
        "command": command,
        "threads": list(threads),
        "busy_processes": busy,
        "settings": settings.__dict__,
        "env": environment(device),
    }
    append_records(out, [header])
    started = time.perf_counter()
    previous = torch.get_num_threads()
    try:
        for count in threads:
            torch.set_num_threads(count)
            for group in groups_of(cases):
                if settings.budget_s is not None and time.perf_counter() - started > settings.budget_s:
                    rows = [
                        c.describe()
                        | {
                            "threads": count,
                            "status": "skipped",
                            "reason": f"time budget {settings.budget_s} s",
                        }
                        for c in group
                    ]
                else:
                    with busy_processes(busy):
                        rows = measure_group(group, settings)
                rows = [{"record": "row", "run": run_id, "busy_processes": busy, **row} for row in rows]
                append_records(out, rows)
                if progress is not None:
                    for row in rows:
                        progress(row)
                if torch.device(device).type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(previous)
    append_records(out, [{"record": "run-end", "run": run_id, "load_avg": load_average()}])
    return run_id


def describe_row(row: dict[str, Any]) -> str:
    """One line for the console."""
    status = row.get("status")
    if status == "ok":
        text = f"{row['median_ms']:.3f} ms"
        if isinstance(row.get("graph"), dict):
            text += f" (graph {row['graph']['median_ms']:.3f} ms)"
    elif status == "skipped":
        text = f"skipped: {row.get('reason')}"
    else:
        text = f"error: {(row.get('error') or {}).get('message', '')[:160]}"
    return f"{row['id']} [{row['threads']}t]: {text}"
