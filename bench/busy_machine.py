"""The native CPU Sinkhorn kernels' threads on a 2-core machine: right after torch's own parallel work, and
with a core taken by another process.

Times forward + backward (``torch.autograd.grad`` with a fixed output gradient) of the MNIST model's stack
(3x25x25 and 4 layers of 3x100x100, T = 20, float32) for these providers:

- ``authors``: the authors' loop per layer (an ``allclose`` test before every iteration) at the paper's
  initialisation U[0, 1), where it stops after 2-3 iterations: torch's own parallel work;
- ``per-stack-tol``: ``symkernels.sinkhorn(x, 20, tol=AUTHORS_TOLERANCE, stop="stack")`` per layer, the same
  logits;
- ``grouped-tol``: one ``symkernels.grouped_sinkhorn`` call with the same options, the same logits;
- ``grouped``: one grouped call without a tolerance at sharp logits N(0, 3²) (every iteration runs);
- ``reference`` (``--reference``): the eager reference per layer at sharp logits, 3 calls per burst, after
  the others (on a loaded machine its 2-thread calls take seconds: its small ops wait for both threads).

A burst times every provider ``--reps`` times in one of two schedules: *after-torch*, the providers in turn
call by call, so that every native call follows torch's parallel work within a millisecond or two, as in a
training step, while torch's idle OpenMP workers still spin; *back-to-back*, each provider's calls in a row,
after a pause in which those workers fall asleep. A burst is one combination of: the schedule; 1 or 2 torch
threads; no competitor started by this script (*quiet*) or one busy competing process, ``python -c "while
True: pass"`` (*busy*); where the native kernels take their helper threads (``--helpers``: *adaptive*, the
default, which also quiets torch's idle OpenMP workers while stalls recur; *team*, always torch's intra-op
threads; *pool*, always the library's own workers); and OpenMP's wait policy (*default*: unset, libgomp's idle
workers spin for a while before they sleep; *passive*: ``OMP_WAIT_POLICY=PASSIVE``, they sleep at once). The
policy is read when torch loads, so each round runs one child process per policy and thread count (see
``measure``). Rounds repeat everything, so that a change in the machine's other load touches all situations
alike; every burst records the load (1-minute load average and runnable processes, from /proc) and the native
calls by where their tasks ran (inline: on the caller alone; team; pool), the team calls that stalled (waited
for a late thread) and the times torch's idle workers were quieted.

    python bench/busy_machine.py [--rounds 9] [--reps 40] [--helpers adaptive,team,pool] [--reference]

Writes ``bench/results/busy-machine-cpu.json`` (every burst) and ``bench/results/busy-machine-cpu.md``.

    python bench/busy_machine.py --train [--train-rounds 1]

instead times the default training run (``symkernels train --quiet``, its default thread count) end to end,
without and with the competing process, the load sampled every few seconds while it runs, and writes
``bench/results/busy-machine-train.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import symkernels
from symkernels import _native
from symkernels.reference import sinkhorn_early_exit

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/busy_machine.py` puts bench/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

from bench.workloads import make_stack  # noqa: E402

RESULTS = ROOT / "bench" / "results"
STEM = "busy-machine-cpu"
WORKLOAD, N_ITER = "mnist-wscnn", 20
# name -> (logit regime, what it runs)
PROVIDERS = {
    "authors": ("init", "the authors' loop per layer"),
    "per-stack-tol": ("init", '`sinkhorn(x, 20, tol=AUTHORS_TOLERANCE, stop="stack")` per layer'),
    "grouped-tol": ("init", "one `grouped_sinkhorn` call, the same tolerance"),
    "grouped": ("sharp", "one `grouped_sinkhorn` call, every iteration"),
}
REFERENCE = "reference"
REFERENCE_INFO = ("sharp", "the eager reference per layer")
REFERENCE_CALLS = 3
BASELINE = "authors"
TOLERANCE_PATHS = ("per-stack-tol", "grouped-tol")
NATIVE = ("per-stack-tol", "grouped-tol", "grouped")
THREADS = (1, 2)
LOADS = ("quiet", "busy")
# OMP_WAIT_POLICY of the child process: unset (libgomp's default: spin, then sleep), or PASSIVE.
POLICIES = ("default", "passive")
HELPERS = ("adaptive", "team", "pool")
SCHEDULES = ("after-torch", "back-to-back")
SETTLE_S = 0.05  # before each back-to-back block: libgomp's idle workers spin for a few ms, then sleep
BUSY_LOOP = "while True: pass"
# Acceptance: the tolerance paths at least this many times faster than the authors' loop (quiet, 2 threads),
# and 2 threads at most this many times slower than 1 with a competing process (default policy, adaptive).
MIN_SPEEDUP, MAX_BUSY_RATIO = 3.0, 1.15


def _load_now() -> dict[str, float]:
    """1-minute load average and runnable processes right now (ours included), as /proc reports them."""
    fields = Path("/proc/loadavg").read_text().split()
    running = int(fields[3].split("/")[0])
    return {"loadavg_1m": float(fields[0]), "runnable": running}


def _forward(provider: str, logits: list[torch.Tensor]) -> list[torch.Tensor]:
    tolerance = {"tol": symkernels.AUTHORS_TOLERANCE, "stop": "stack"}
    if provider == "authors":
        return [sinkhorn_early_exit(x, N_ITER) for x in logits]
    if provider == "per-stack-tol":
        return [symkernels.sinkhorn(x, N_ITER, backend="cpu", **tolerance) for x in logits]
    if provider == "grouped-tol":
        return symkernels.grouped_sinkhorn(logits, N_ITER, backend="cpu", **tolerance)
    if provider == "grouped":
        return symkernels.grouped_sinkhorn(logits, N_ITER, backend="cpu")
    if provider == REFERENCE:
        return [symkernels.sinkhorn(x, N_ITER, backend="reference") for x in logits]
    raise ValueError(f"unknown provider {provider!r}")


class Inputs:
    """Per logit regime, the stack's logits (requiring grad) and a fixed output gradient for each layer."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(1)
        self.logits = {}
        self.grads = {}
        for regime in ("init", "sharp"):
            self.logits[regime] = [x.requires_grad_(True) for x in make_stack(WORKLOAD, regime)]
            self.grads[regime] = [torch.randn(x.shape, generator=generator) for x in self.logits[regime]]

    def time_ms(self, provider: str) -> float:
        """One forward + backward of ``provider``, in milliseconds."""
        regime = REFERENCE_INFO[0] if provider == REFERENCE else PROVIDERS[provider][0]
        logits, grads = self.logits[regime], self.grads[regime]
        start = time.perf_counter()
        torch.autograd.grad(_forward(provider, logits), logits, grads)
        return (time.perf_counter() - start) * 1e3


def _burst(inputs: Inputs, providers: list[str], reps: int, schedule: str) -> dict[str, list[float]]:
    """``reps`` forward + backward passes of every provider (after one warm-up each), in the given schedule:
    the providers in turn call by call (*after-torch*), or each provider's calls in a row, after a pause
    (*back-to-back*)."""
    times: dict[str, list[float]] = {provider: [] for provider in providers}
    if schedule == "after-torch":
        for provider in providers:
            inputs.time_ms(provider)
        for _ in range(reps):
            for provider in providers:
                times[provider].append(inputs.time_ms(provider))
    elif schedule == "back-to-back":
        for provider in providers:
            time.sleep(SETTLE_S)  # torch's idle OpenMP workers stop spinning and sleep
            inputs.time_ms(provider)
            times[provider] = [inputs.time_ms(provider) for _ in range(reps)]
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    return times


def _counts_since(library, before: dict[str, int]) -> dict[str, int]:
    now = library.cpu_task_counts()
    return {key: now[key] - before[key] for key in now}


def _start_competitor() -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    time.sleep(0.5)  # let it be scheduled and reach its loop
    return process


def _stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def measure_round(reps: int, threads: int, helpers: list[str], reference: bool) -> list[dict]:
    """One round in this process at ``threads`` threads: every load, helper choice and schedule, one burst
    each."""
    torch.set_num_threads(threads)
    library = _native.library()
    inputs = Inputs()
    bursts = []

    def burst(load: str, choice: str | None, schedule: str, providers: list[str], n: int) -> None:
        before, counts = _load_now(), library.cpu_task_counts()
        times = _burst(inputs, providers, n, schedule)
        bursts.append(
            {
                "load": load,
                "threads": threads,
                "helpers": choice,
                "schedule": schedule,
                "providers": {
                    name: {
                        "mean_ms": statistics.mean(samples),
                        "median_ms": statistics.median(samples),
                        "times_ms": samples,
                    }
                    for name, samples in times.items()
                },
                "native_calls": _counts_since(library, counts),
                "load_before": before,
                "load_after": _load_now(),
            }
        )

    for load in LOADS:
        competitor = _start_competitor() if load == "busy" else None
        try:
            for choice in helpers:
                library.set_cpu_task_threads(choice)
                for schedule in SCHEDULES:
                    burst(load, choice, schedule, list(PROVIDERS), reps)
            library.set_cpu_task_threads("adaptive")
            if reference:
                burst(load, None, "back-to-back", [REFERENCE], REFERENCE_CALLS)
        finally:
            if competitor is not None:
                _stop(competitor)
        time.sleep(0.5)  # the competitor is gone before the next quiet bursts
    return bursts


def measure(rounds: int, reps: int, helpers: list[str], reference: bool) -> list[dict]:
    """``rounds`` rounds, each one child process per wait policy (fixed when torch loads) and thread count
    (set once, before any parallel work: switching libgomp between team sizes in one process can leave
    torch's own parallel ops far slower for a long while)."""
    bursts = []
    for round_index in range(rounds):
        for policy, threads in itertools.product(POLICIES, THREADS):
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy == "passive":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            command = [
                sys.executable,
                __file__,
                "--child",
                "--threads",
                str(threads),
                "--reps",
                str(reps),
                "--helpers",
                ",".join(helpers),
            ]
            if reference:
                command.append("--reference")
            child = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            for burst in json.loads(child.stdout):
                bursts.append({"round": round_index, "policy": policy, **burst})
        print(f"round {round_index + 1}/{rounds} done, load {_load_now()}", file=sys.stderr, flush=True)
    return bursts


def _key(burst: dict) -> tuple:
    return (burst["policy"], burst["schedule"], burst["helpers"], burst["load"], burst["threads"])


def summarise(bursts: list[dict]) -> list[dict]:
    """One row per (policy, schedule, helpers, load, threads, provider): the median over rounds of the
    burst means (and medians), and the median over rounds of the authors' loop's mean over the provider's in
    the same burst."""
    keys = []
    for burst in bursts:
        for provider in burst["providers"]:
            if (*_key(burst), provider) not in keys:
                keys.append((*_key(burst), provider))
    rows = []
    for *situation, provider in keys:
        mine = [b for b in bursts if _key(b) == tuple(situation) and provider in b["providers"]]
        means = [b["providers"][provider]["mean_ms"] for b in mine]
        medians = [b["providers"][provider]["median_ms"] for b in mine]
        speedups = [
            b["providers"][BASELINE]["mean_ms"] / b["providers"][provider]["mean_ms"]
            for b in mine
            if BASELINE in b["providers"]
        ]
        calls: dict[str, int] = {}
        for b in mine:
            for name, count in b["native_calls"].items():
                calls[name] = calls.get(name, 0) + count
        loads = [b["load_before"]["loadavg_1m"] for b in mine] + [b["load_after"]["loadavg_1m"] for b in mine]
        runnable = [b["load_before"]["runnable"] for b in mine]
        rows.append(
            {
                **dict(zip(("policy", "schedule", "helpers", "load", "threads"), situation, strict=True)),
                "provider": provider,
                "mean_ms": statistics.median(means),
                "min_mean_ms": min(means),
                "max_mean_ms": max(means),
                "median_ms": statistics.median(medians),
                "speedup_vs_authors": statistics.median(speedups) if speedups else None,
                "bursts": len(mine),
                "native_calls": calls,
                "loadavg_1m": [min(loads), max(loads)],
                "runnable": [min(runnable), max(runnable)],
            }
        )
    return rows


def _environment(args: argparse.Namespace, default_threads: int) -> dict:
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "symkernels": symkernels.__version__,
        "commit": commit,
        "torch_default_threads": default_threads,
        "workload": f"{WORKLOAD}, T = {N_ITER}, float32, forward + backward",
        "command": f"python bench/busy_machine.py --rounds {args.rounds} --reps {args.reps} "
        f"--helpers {args.helpers}" + (" --reference" if args.reference else ""),
    }


def _cell(rows: list[dict]) -> dict[tuple, dict]:
    return {
        (r["policy"], r["schedule"], r["helpers"], r["load"], r["threads"], r["provider"]): r for r in rows
    }


def _calls_text(calls: dict[str, int]) -> str:
    return (
        f"{calls['team']}/{calls['pool']}/{calls['inline']} ({calls['team_stalls']}, {calls['quiet_starts']})"
    )


def _acceptance(rows: list[dict]) -> list[str]:
    cell = _cell(rows)
    lines = []
    for schedule in SCHEDULES:
        speedups = []
        for provider in TOLERANCE_PATHS:
            row = cell.get(("default", schedule, "adaptive", "quiet", 2, provider))
            if row is not None:
                speedups.append(f"{provider} {row['speedup_vs_authors']:.2f}x")
        if speedups:
            lines.append(
                f"- {schedule}, quiet, 2 threads: {', '.join(speedups)} the authors' loop "
                f"(target: at least {MIN_SPEEDUP:g}x)."
            )
        ratios = []
        for provider in (*NATIVE, BASELINE):
            one = cell.get(("default", schedule, "adaptive", "busy", 1, provider))
            two = cell.get(("default", schedule, "adaptive", "busy", 2, provider))
            if one is not None and two is not None:
                ratios.append(
                    f"{provider} {two['mean_ms']:.3f} / {one['mean_ms']:.3f} ms = "
                    f"{two['mean_ms'] / one['mean_ms']:.2f}x"
                )
        if ratios:
            lines.append(
                f"- {schedule}, busy (one competing process), 2 threads over 1: "
                + "; ".join(ratios)
                + f" (target for the native paths: at most {MAX_BUSY_RATIO:g}x)."
            )
    return lines


def _helpers_table(rows: list[dict], policy: str, schedule: str) -> list[str]:
    cell = _cell(rows)
    choices = [c for c in HELPERS if any((r["helpers"], r["policy"]) == (c, policy) for r in rows)]
    providers = [p for p in PROVIDERS if any(r["provider"] == p for r in rows)]
    lines = [
        "| helpers | load | threads | "
        + " | ".join(f"{p} ms" + ("" if p == BASELINE else " (x authors)") for p in providers)
        + " | native calls team/pool/inline (stalls, quiets) | load avg 1m |",
        "| --- | --- | ---: | " + " | ".join("---:" for _ in providers) + " | ---: | ---: |",
    ]
    for choice in choices:
        for load in LOADS:
            for threads in THREADS:
                found = [cell.get((policy, schedule, choice, load, threads, p)) for p in providers]
                if any(row is None for row in found):
                    continue
                texts = []
                for provider, row in zip(providers, found, strict=True):
                    text = f"{row['mean_ms']:.3f}"
                    if provider != BASELINE:
                        text += f" ({row['speedup_vs_authors']:.2f}x)"
                    texts.append(text)
                load_range = found[0]["loadavg_1m"]
                lines.append(
                    f"| {choice} | {load} | {threads} | "
                    + " | ".join(texts)
                    + f" | {_calls_text(found[0]['native_calls'])} "
                    + f"| {load_range[0]:.2f}-{load_range[1]:.2f} |"
                )
    lines.append("")
    for choice in choices:
        parts = []
        for provider in (*NATIVE, BASELINE):
            for load in LOADS:
                one = cell.get((policy, schedule, choice, load, 1, provider))
                two = cell.get((policy, schedule, choice, load, 2, provider))
                if one is not None and two is not None and load == "busy":
                    parts.append(f"{provider} {two['mean_ms'] / one['mean_ms']:.2f}x")
        if parts:
            lines.append(f"- {choice}, busy, 2 threads over 1: " + ", ".join(parts) + ".")
    return lines


def _markdown(environment: dict, rows: list[dict]) -> str:
    described = {**{name: what for name, (_, what) in PROVIDERS.items()}, REFERENCE: REFERENCE_INFO[1]}
    regimes = {**{name: regime for name, (regime, _) in PROVIDERS.items()}, REFERENCE: REFERENCE_INFO[0]}
    lines = [
        "# The native CPU Sinkhorn kernels' threads on a 2-core machine",
        "",
        f"{environment['workload']}; {environment['cpu_count']} cores ({environment['processor']}), torch "
        f"{environment['torch']}, commit {environment['commit']}, {environment['date']}. Reproduce: "
        f"`{environment['command']}`.",
        "",
        "Providers (logits): "
        + "; ".join(
            f"`{name}` ({regimes[name]}): {what}"
            for name, what in described.items()
            if any(r["provider"] == name for r in rows)
        )
        + ". Init: the paper's U[0, 1); sharp: N(0, 3²).",
        "",
        "*Schedule*: *after-torch*, the providers in turn call by call, so that every native call follows"
        " torch's own parallel work (the authors' loop) within a millisecond or two, as in a training "
        f"step; *back-to-back*, each provider's calls in a row, after a {SETTLE_S * 1e3:.0f} ms pause "
        "(torch's idle workers asleep). *quiet*: no competitor started by the benchmark (the machine's "
        "other load is in the load column); *busy*: one extra process running `while True: pass`. "
        "*helpers*: where the native kernels take their helper threads (*adaptive*: the default, torch's "
        "intra-op threads until one joins late, then the library's own pool for a while, and torch's idle "
        "OpenMP workers quieted for a while when that recurs; *team*: always "
        "torch's threads; *pool*: always the library's workers). *policy*: `OMP_WAIT_POLICY` of the timed"
        " process (*default*: unset; *passive*: `PASSIVE`). Each time is the mean of a burst's calls "
        "(stalls included), median over rounds; *x authors*: the authors' loop's mean over the provider's"
        " in the same burst, median over rounds. Native calls: the parallel calls of the native kernels "
        "by where their tasks ran (team, pool, or inline on the caller: one task, or one thread), and the"
        " team calls that stalled (waited for a late thread), with the times torch's idle workers were "
        "quieted. Load: 1-minute load average before and "
        "after each burst, min-max (the benchmark's own process and its competitor count).",
        "",
        "## Acceptance (default wait policy, adaptive helpers)",
        "",
        *_acceptance(rows),
        "",
    ]
    for policy in POLICIES:
        for schedule in SCHEDULES:
            if any((r["policy"], r["schedule"]) == (policy, schedule) for r in rows):
                lines += [
                    f"## {schedule}, {policy} wait policy",
                    "",
                    *_helpers_table(rows, policy, schedule),
                    "",
                ]
    lines += [
        "## Every cell",
        "",
        "| policy | schedule | helpers | load | threads | provider | ms (mean) | [min-max] | ms (median) "
        "| x authors | load avg 1m | runnable |",
        "| --- | --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        speedup = "" if row["speedup_vs_authors"] is None else f"{row['speedup_vs_authors']:.2f}"
        lines.append(
            f"| {row['policy']} | {row['schedule']} | {row['helpers'] or '-'} | {row['load']} | "
            f"{row['threads']} | {row['provider']} | {row['mean_ms']:.3f} | "
            f"[{row['min_mean_ms']:.3f}-{row['max_mean_ms']:.3f}] | {row['median_ms']:.3f} | {speedup} | "
            f"{row['loadavg_1m'][0]:.2f}-{row['loadavg_1m'][1]:.2f} | "
            f"{row['runnable'][0]}-{row['runnable'][1]} |"
        )
    lines += [
        "",
        f"torch's default on this machine is {environment['torch_default_threads']} threads; "
        "`symkernels train` uses 1 (`--threads`).",
        "",
    ]
    return "\n".join(lines)


TRAIN_STEM = "busy-machine-train"
TRAIN_COMMAND = ("train", "--quiet")  # the default run, at the command line's default thread count
LOAD_SAMPLE_S = 5.0


def _train_once(load: str, folder: Path) -> dict:
    """One default training run into ``folder``/run, with or without the competitor; wall time and load."""
    out = folder / "run"
    command = [sys.executable, "-m", "symkernels", *TRAIN_COMMAND, "--out", str(out)]
    competitor = _start_competitor() if load == "busy" else None
    samples = [_load_now()]
    try:
        with open(folder / "log.txt", "w") as log:
            start = time.perf_counter()
            process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            while process.poll() is None:
                time.sleep(LOAD_SAMPLE_S)
                samples.append(_load_now())
            wall = time.perf_counter() - start
    finally:
        if competitor is not None:
            _stop(competitor)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {(folder / 'log.txt').read_text()[-2000:]}")
    metrics = json.loads((out / "metrics.json").read_text())
    epochs = metrics["epochs"]
    loads = [s["loadavg_1m"] for s in samples]
    return {
        "load": load,
        "wall_s": wall,
        "epochs": len(epochs),
        "train_s": sum(e["epoch_seconds"] for e in epochs),
        "ms_per_step": 1e3 * statistics.mean(e["seconds_per_step"] for e in epochs),
        "threads": sorted({e["threads"] for e in epochs}),
        "backend": metrics["backend"],
        "test_accuracy": epochs[-1]["test_accuracy"],
        "loadavg_1m": {"min": min(loads), "mean": statistics.mean(loads), "max": max(loads)},
        "runnable": [min(s["runnable"] for s in samples), max(s["runnable"] for s in samples)],
        "load_samples": samples,
    }


def measure_training(rounds: int) -> list[dict]:
    """``rounds`` pairs of default training runs, quiet then busy."""
    runs = []
    for round_index in range(rounds):
        for load in LOADS:
            with tempfile.TemporaryDirectory(prefix="busy-train-") as folder:
                runs.append({"round": round_index, **_train_once(load, Path(folder))})
            print(f"train {load}: {runs[-1]['wall_s']:.0f} s, load {runs[-1]['loadavg_1m']}", file=sys.stderr)
    return runs


def _train_markdown(environment: dict, runs: list[dict]) -> str:
    lines = [
        "# The default training run on a busy 2-core machine",
        "",
        f"`symkernels {' '.join(TRAIN_COMMAND)}` (the default run, the command line's default thread "
        f"count); {environment['cpu_count']} cores ({environment['processor']}), torch "
        f"{environment['torch']}, commit {environment['commit']}, {environment['date']}. Reproduce: "
        f"`{environment['command']}`.",
        "",
        "*quiet*: no competitor started by the benchmark (the machine's other load, if any, is in the last "
        "columns); *busy*: one extra process running `while True: pass` for the whole run. "
        "Wall: the whole command (data, model, every epoch, plots); train: the sum of the epochs' times. "
        f"Load: 1-minute load average sampled every {LOAD_SAMPLE_S:.0f} s while the run ran (min / mean / "
        "max) and runnable processes (ours included).",
        "",
        "| round | load | threads | epochs | wall (s) | train (s) | ms/step | test acc. | load avg 1m "
        "| runnable |",
        "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for run in runs:
        load = run["loadavg_1m"]
        lines.append(
            f"| {run['round']} | {run['load']} | {','.join(map(str, run['threads']))} | {run['epochs']} | "
            f"{run['wall_s']:.0f} | {run['train_s']:.0f} | {run['ms_per_step']:.1f} | "
            f"{run['test_accuracy']:.4f} | {load['min']:.2f} / {load['mean']:.2f} / {load['max']:.2f} | "
            f"{run['runnable'][0]}-{run['runnable'][1]} |"
        )
    lines.append("")
    for round_index in sorted({run["round"] for run in runs}):
        pair = {run["load"]: run for run in runs if run["round"] == round_index}
        if set(pair) == set(LOADS):
            quiet, busy = pair["quiet"], pair["busy"]
            lines.append(
                f"- Round {round_index}: busy / quiet wall time {busy['wall_s']:.0f} s / "
                f"{quiet['wall_s']:.0f} s = {busy['wall_s'] / quiet['wall_s']:.2f}x (training only: "
                f"{busy['train_s'] / quiet['train_s']:.2f}x)."
            )
    lines.append("")
    return "\n".join(lines)


def _main_training(args: argparse.Namespace) -> int:
    environment = _environment(args, default_threads=torch.get_num_threads())
    environment["command"] = f"python bench/busy_machine.py --train --train-rounds {args.train_rounds}"
    environment["workload"] = f"symkernels {' '.join(TRAIN_COMMAND)}"
    runs = measure_training(args.train_rounds)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{TRAIN_STEM}.json").write_text(
        json.dumps({"environment": environment, "runs": runs}, indent=1) + "\n"
    )
    text = _train_markdown(environment, runs)
    (RESULTS / f"{TRAIN_STEM}.md").write_text(text)
    print(text)
    return 0


def _helpers(args: argparse.Namespace) -> list[str]:
    choices = args.helpers.split(",")
    unknown = [c for c in choices if c not in HELPERS]
    if unknown:
        raise SystemExit(f"--helpers: expected names from {', '.join(HELPERS)}, got {', '.join(unknown)}")
    return choices


def _child(args: argparse.Namespace) -> int:
    print(json.dumps(measure_round(args.reps, args.threads, _helpers(args), args.reference)))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--reference", action="store_true", help="also time the eager reference")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one round, JSON on stdout
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)  # the child's
    parser.add_argument(
        "--helpers",
        default=",".join(HELPERS),
        help="where the native kernels take their helper threads, comma-separated (default: all three)",
    )
    parser.add_argument("--train", action="store_true", help="time the default training run instead")
    parser.add_argument("--train-rounds", type=int, default=1, help="quiet/busy pairs of training runs")
    args = parser.parse_args()
    if args.train:
        return _main_training(args)
    if not symkernels.backend_status()["cpu"].usable:
        print(f"native CPU kernels unavailable: {symkernels.backend_status()['cpu'].detail}", file=sys.stderr)
        return 1
    if args.child:
        return _child(args)
    environment = _environment(args, default_threads=torch.get_num_threads())
    bursts = measure(args.rounds, args.reps, _helpers(args), args.reference)
    rows = summarise(bursts)
    RESULTS.mkdir(exist_ok=True)
    payload = {"environment": environment, "summary": rows, "bursts": bursts}
    (RESULTS / f"{STEM}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{STEM}.md").write_text(_markdown(environment, rows))
    print(_markdown(environment, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
