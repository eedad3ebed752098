"""Sinkhorn forward + backward on the CPU when another process keeps a core busy.

For 1 and 2 torch threads, with no competitor started by this script ("quiet") and with one busy competing
process (``python -c "while True: pass"``), times one forward + backward of the MNIST model's stack
(3x25x25 and 4 layers of 3x100x100, T = 20, sharp logits N(0, 3²) so that every iteration runs) on the native
CPU kernels (one grouped op call, as the model makes it), under OpenMP's default wait policy (idle workers
spin for a while before they sleep) and under ``OMP_WAIT_POLICY=PASSIVE`` (they sleep at once). The wait
policy is read when torch loads, so each round runs one child process per policy; the situations are
interleaved round by round, so that a change in the machine's other load touches them alike, and the load
(1-minute load average and the number of runnable processes, from /proc) is recorded with every burst.

    python bench/busy_machine.py [--rounds 9] [--reps 40] [--reference]

``--reference`` adds the eager reference (3 steps per burst): on a loaded machine its 2-thread steps take
seconds, since every one of its many small ops waits for both threads.

Writes ``bench/results/busy-machine-cpu.json`` (every burst) and ``bench/results/busy-machine-cpu.md``.

    python bench/busy_machine.py --train [--train-rounds 1]

instead times the default training run (``symkernels train --quiet``, its default thread count) end to end,
without and with the competing process, the load sampled every few seconds while it runs, and writes
``bench/results/busy-machine-train.{json,md}``.
"""

from __future__ import annotations

import argparse
import datetime
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

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/busy_machine.py` puts bench/, not the repository, on the path
    sys.path.insert(0, str(ROOT))

from bench.workloads import make_stack  # noqa: E402

RESULTS = ROOT / "bench" / "results"
STEM = "busy-machine-cpu"
WORKLOAD, REGIME, N_ITER = "mnist-wscnn", "sharp", 20
PROVIDERS = {
    "cpu": "native CPU kernels, one grouped call",
    "reference": "eager reference, one call per layer",
}
THREADS = (1, 2)
LOADS = ("quiet", "busy")
# OMP_WAIT_POLICY of the child process: unset (libgomp's default: spin, then sleep), or PASSIVE.
POLICIES = ("default", "passive")
BUSY_LOOP = "while True: pass"


def _load_now() -> dict[str, float]:
    """1-minute load average and runnable processes right now (ours included), as /proc reports them."""
    fields = Path("/proc/loadavg").read_text().split()
    running = int(fields[3].split("/")[0])
    return {"loadavg_1m": float(fields[0]), "runnable": running}


def _step(provider: str, logits: list[torch.Tensor]) -> None:
    if provider == "cpu":
        outputs = symkernels.grouped_sinkhorn(logits, N_ITER, backend="cpu", check_finite=False)
    else:
        outputs = [symkernels.sinkhorn(x, N_ITER, backend="reference", check_finite=False) for x in logits]
    torch.autograd.backward([o.sum() for o in outputs])


def _burst(provider: str, logits: list[torch.Tensor], reps: int) -> list[float]:
    _step(provider, logits)  # warm-up: wakes the thread pool at this thread count
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        _step(provider, logits)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _start_competitor() -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    time.sleep(0.5)  # let it be scheduled and reach its loop
    return process


def _stop(process: subprocess.Popen) -> None:
    process.kill()
    process.wait()


def measure_round(reps: int, providers: list[str]) -> list[dict]:
    """One round in this process: every load, thread count and provider, one burst each."""
    logits = [x.requires_grad_(True) for x in make_stack(WORKLOAD, REGIME)]
    bursts = []
    for load in LOADS:
        competitor = _start_competitor() if load == "busy" else None
        try:
            for threads in THREADS:
                torch.set_num_threads(threads)
                for provider in providers:
                    n = reps if provider == "cpu" else 3
                    before = _load_now()
                    times = _burst(provider, logits, n)
                    bursts.append(
                        {
                            "provider": provider,
                            "threads": threads,
                            "load": load,
                            "median_ms": statistics.median(times),
                            "times_ms": times,
                            "load_before": before,
                            "load_after": _load_now(),
                        }
                    )
        finally:
            if competitor is not None:
                _stop(competitor)
        time.sleep(0.5)  # the competitor is gone before the next quiet bursts
    return bursts


def measure(rounds: int, reps: int, providers: list[str]) -> list[dict]:
    """``rounds`` rounds, each one child process per wait policy (the policy is fixed when torch loads)."""
    bursts = []
    for round_index in range(rounds):
        for policy in POLICIES:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy == "passive":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            command = [
                sys.executable,
                __file__,
                "--child",
                "--reps",
                str(reps),
                "--providers",
                ",".join(providers),
            ]
            child = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
            for burst in json.loads(child.stdout):
                bursts.append({"round": round_index, "policy": policy, **burst})
        print(f"round {round_index + 1}/{rounds} done, load {_load_now()}", file=sys.stderr, flush=True)
    return bursts


def summarise(bursts: list[dict], providers: list[str]) -> list[dict]:
    rows = []
    for provider in providers:
        for policy in POLICIES:
            for load in LOADS:
                for threads in THREADS:
                    key = (provider, policy, load, threads)
                    mine = [b for b in bursts if (b["provider"], b["policy"], b["load"], b["threads"]) == key]
                    medians = [b["median_ms"] for b in mine]
                    loads = [b["load_before"]["loadavg_1m"] for b in mine]
                    runnable = [b["load_before"]["runnable"] for b in mine]
                    rows.append(
                        {
                            "provider": provider,
                            "policy": policy,
                            "load": load,
                            "threads": threads,
                            "median_ms": statistics.median(medians),
                            "min_ms": min(medians),
                            "max_ms": max(medians),
                            "bursts": len(mine),
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
        "workload": f"{WORKLOAD} ({REGIME} logits), T = {N_ITER}, float32, forward + backward",
        "command": f"python bench/busy_machine.py --rounds {args.rounds} --reps {args.reps}"
        + (" --reference" if args.reference else ""),
    }


def _markdown(environment: dict, rows: list[dict]) -> str:
    lines = [
        "# Sinkhorn forward + backward on a busy 2-core machine",
        "",
        f"{environment['workload']}; {environment['cpu_count']} cores ({environment['processor']}), torch "
        f"{environment['torch']}, commit {environment['commit']}, {environment['date']}. Reproduce: "
        f"`{environment['command']}`.",
        "",
        "*quiet*: no competitor started by the benchmark (the machine's other load, if any, is in the last "
        "columns); *busy*: one extra process running `while True: pass`. *policy*: "
        "`OMP_WAIT_POLICY` of the timed process (*default*: unset, idle OpenMP workers spin before they "
        "sleep; *passive*: `PASSIVE`, they sleep at once). Situations interleaved round by round; each cell "
        "is the median over rounds of each burst's median (min-max of the burst medians in brackets). Load: "
        "1-minute load average and runnable processes (ours included) before each burst, min-max.",
        "",
        "Providers: " + "; ".join(f"`{name}`: {what}" for name, what in PROVIDERS.items()) + ".",
        "",
        "| provider | policy | load | threads | ms (median) | [min-max] | load avg 1m | runnable |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        lines.append(
            f"| {row['provider']} | {row['policy']} | {row['load']} | {row['threads']} | "
            f"{row['median_ms']:.2f} | [{row['min_ms']:.2f}-{row['max_ms']:.2f}] | "
            f"{row['loadavg_1m'][0]:.2f}-{row['loadavg_1m'][1]:.2f} | "
            f"{row['runnable'][0]}-{row['runnable'][1]} |"
        )
    cell = {(r["provider"], r["policy"], r["load"], r["threads"]): r["median_ms"] for r in rows}
    lines.append("")
    for policy in POLICIES:
        busy1, busy2 = cell[("cpu", policy, "busy", 1)], cell[("cpu", policy, "busy", 2)]
        quiet1, quiet2 = cell[("cpu", policy, "quiet", 1)], cell[("cpu", policy, "quiet", 2)]
        lines.append(
            f"- Native, {policy} policy: busy, 2 threads {busy2:.2f} ms vs 1 thread {busy1:.2f} ms "
            f"({busy2 / busy1:.2f}x); quiet, 2 threads {quiet2:.2f} ms vs 1 thread {quiet1:.2f} ms "
            f"({quiet2 / quiet1:.2f}x)."
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


def _child(args: argparse.Namespace) -> int:
    print(json.dumps(measure_round(args.reps, args.providers.split(","))))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--reps", type=int, default=40)
    parser.add_argument("--reference", action="store_true", help="also time the eager reference")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)  # one round, JSON on stdout
    parser.add_argument("--providers", default="cpu", help=argparse.SUPPRESS)
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
    providers = ["cpu", "reference"] if args.reference else ["cpu"]
    bursts = measure(args.rounds, args.reps, providers)
    rows = summarise(bursts, providers)
    RESULTS.mkdir(exist_ok=True)
    payload = {"environment": environment, "summary": rows, "bursts": bursts}
    (RESULTS / f"{STEM}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (RESULTS / f"{STEM}.md").write_text(_markdown(environment, rows))
    print(_markdown(environment, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
