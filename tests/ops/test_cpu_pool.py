"""The CPU kernels' threads (csrc/cpu_pool.cpp): tasks on torch's intra-op threads (the team) or on the
library's own pool, chosen per call. The same results on any number of threads and on either route, errors
rethrown, nested calls inline, concurrent callers, a forked child, and the adaptive choice's rule."""

from __future__ import annotations

import ast
import multiprocessing
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import symkernels
from symkernels import _native
from tests.testing import implementation_for, make_logits

ROUTES = ("adaptive", "team", "pool")


@pytest.fixture(autouse=True)
def native_cpu():
    implementation_for("cpu")  # fails (never skips) when the native CPU kernels are missing
    threads = torch.get_num_threads()
    yield
    _native.library().set_cpu_task_threads("adaptive")
    torch.set_num_threads(threads)


def _route(choice: str) -> None:
    _native.library().set_cpu_task_threads(choice)


def _counts() -> dict[str, int]:
    return _native.library().cpu_task_counts()


def _stacks() -> list[torch.Tensor]:
    """Enough work for many tasks: small matrices in bulk, and a few large ones."""
    return [
        make_logits(300, 9, 9, scale=2.0, seed=1).float(),
        make_logits(6, 100, 100, scale=2.0, seed=2).float(),
        make_logits(40, 25, 25, scale=30.0, seed=3).float(),  # log domain for some
    ]


def _forward_backward(stacks: list[torch.Tensor]) -> list[torch.Tensor]:
    inputs = [s.clone().requires_grad_() for s in stacks]
    outputs = symkernels.grouped_sinkhorn(inputs, 20, 0.7, backend="cpu")
    grads = torch.autograd.grad(outputs, inputs, [torch.cos(o.detach() * 7.0) for o in outputs])
    return [o.detach() for o in outputs] + list(grads)


def _with_threads(threads: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def _assert_identical(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)


@pytest.mark.parametrize("route", ROUTES)
def test_results_do_not_depend_on_the_thread_count(route):
    """Each matrix is computed by one thread from start to end: bitwise the same on 1, 2 and 4 threads, on
    torch's threads and on the pool."""
    stacks = _stacks()
    one = _with_threads(1, lambda: _forward_backward(stacks))
    _route(route)
    for threads in (2, 4):
        _assert_identical(_with_threads(threads, lambda: _forward_backward(stacks)), one)


@pytest.mark.parametrize("route", ("team", "pool"))
def test_a_forced_route_runs_every_parallel_call(route):
    _route(route)
    before = _counts()
    _with_threads(2, lambda: _forward_backward(_stacks()))
    after = _counts()
    assert after[route] > before[route]
    other = "pool" if route == "team" else "team"
    assert after[other] == before[other]


def test_one_thread_runs_everything_on_the_caller():
    before = _counts()
    _with_threads(1, lambda: _forward_backward(_stacks()))
    after = _counts()
    assert after["inline"] > before["inline"]
    assert (after["team"], after["pool"]) == (before["team"], before["pool"])


def test_an_unknown_route_is_refused():
    with pytest.raises(ValueError, match="choice must be 'adaptive', 'team' or 'pool', got 'openmp'"):
        _native.library().set_cpu_task_threads("openmp")


@pytest.mark.parametrize("route", ROUTES)
def test_a_task_error_is_rethrown_after_the_other_tasks_ran(route):
    _route(route)
    trace = _with_threads(2, lambda: _native.library().trace_cpu_tasks(8, 200, 0, 3))
    assert trace["error"] == "task 3 failed"
    assert all(thread != 0 for thread in trace["task_thread"])


@pytest.mark.parametrize("route", ROUTES)
def test_nested_calls_run_on_the_thread_of_their_task(route):
    _route(route)
    nested = 3
    trace = _with_threads(2, lambda: _native.library().trace_cpu_tasks(6, 300, nested, -1))
    assert trace["error"] == ""
    for task, thread in enumerate(trace["task_thread"]):
        assert thread != 0
        assert trace["nested_thread"][task * nested : (task + 1) * nested] == [thread] * nested


@pytest.mark.parametrize("route", ROUTES)
def test_concurrent_callers(route):
    """Calls from several Python threads at once (one holds the helpers, the others run alone) all finish with
    the results of a call made alone."""
    stacks = _stacks()
    expected = _with_threads(2, lambda: _forward_backward(stacks))
    _route(route)
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def caller(index: int) -> None:
        try:
            for _ in range(3):
                results[index] = _forward_backward(stacks)
        except BaseException as error:  # noqa: BLE001 (reported by the assertion below)
            errors.append(error)

    def run_callers() -> None:
        threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a concurrent call did not finish"

    _with_threads(2, run_callers)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3]
    for got in results.values():
        _assert_identical(got, expected)


_FORK_LOGITS = make_logits(300, 9, 9, scale=2.0, seed=1).float()


def _fork_forward() -> torch.Tensor:
    # One stack, no finiteness test: only the native op runs (after fork(), a torch op that runs on OpenMP
    # threads the parent used hangs, with or without symkernels).
    with torch.no_grad():
        return symkernels.sinkhorn(_FORK_LOGITS, 20, 0.7, backend="cpu", check_finite=False)


def _child(queue) -> None:
    result = _fork_forward()
    queue.put((result.numpy(), _counts()))


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork()")
def test_forked_child_runs_the_kernels_on_the_pool():
    """A child forked after the parent's calls ran on torch's threads has neither those threads nor the pool's
    workers: its calls, the team route asked for, run on a pool of its own, and give the parent's result."""
    _route("team")

    def fork_and_run():
        before = _counts()
        expected = _fork_forward()
        assert _counts()["team"] > before["team"]  # the parent's OpenMP team exists
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_child, args=(queue,))
        child.start()
        try:
            got, counts = queue.get(timeout=120)
        finally:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
        return torch.from_numpy(got), counts, expected, child.exitcode

    got, counts, expected, exitcode = _with_threads(2, fork_and_run)
    assert exitcode == 0
    assert torch.equal(got, expected)
    assert counts["team"] == 0
    assert counts["pool"] > 0


def _replay(calls: list[tuple[float, float]]) -> list[tuple[bool, bool]]:
    """(team?, quiet after it?) for calls (time in ms, the team's wait in us)."""
    return [tuple(choice) for choice in _native.library().replay_cpu_task_choices(calls)]


def test_adaptive_choice_moves_to_the_pool_after_a_stall_and_back():
    """A team call that waited 200 us or more at its end sends the calls to the pool for 200 ms; a stall
    within 1 s of the team's return doubles that (up to 2 s); an isolated stall starts again at 200 ms."""
    calls = [  # (time in ms, the team's wait in us)
        (0, 10),  # team
        (1, 500),  # team, stalls: pool until 201
        (100, 0),
        (200, 0),
        (201, 10),  # team again
        (300, 500),  # stalls 99 ms after the team's return: pool for 400 ms, until 700
        (699, 0),
        (700, 500),  # stalls at once: 800 ms, until 1500
        (1500, 10),
        (2600, 500),  # 1.1 s after the team's return: isolated, 200 ms, until 2800
        (2799, 0),
        (2800, 10),
    ]
    expected = [True, True, False, False, True, True, False, True, True, True, False, True]
    assert [team for team, _ in _replay(calls)] == expected


def test_adaptive_backoff_is_capped():
    # Stalls each time the team gets the calls back: 200, 400, 800, 1600 ms, then 2000 ms each.
    returns = [0, 200, 600, 1400, 3000, 5000, 7000]
    calls = []
    for start, end in zip(returns, returns[1:], strict=False):
        calls += [(start, 500), (end - 1, 0)]
    calls.append((returns[-1], 0))
    assert [team for team, _ in _replay(calls)] == [True, False] * (len(returns) - 1) + [True]


def test_recurring_stalls_quiet_torchs_idle_workers_for_a_while():
    """The first stall only moves the calls to the pool; one that comes back within 1 s of the team's return
    quiets libgomp's idle workers for 10 s, for twice as long when they stall again within 60 s of that
    ending, and an isolated stall does not."""
    calls = [
        (0, 500),  # stall: pool until 200, no quiet
        (200, 500),  # again: quiet until 10,200
        (5000, 0),
        (10199, 0),
        (10200, 0),  # the quiet is over
        (20000, 500),  # isolated stall: no quiet
        (20200, 500),  # again, 10 s after the last quiet ended: 20 s, until 40,200
        (40199, 0),
        (40200, 0),
    ]
    quiet = [q for _, q in _replay(calls)]
    assert quiet == [False, True, True, True, False, False, True, True, False]


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _wait_for(condition, seconds: float = 30.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return False


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in /proc")
def test_a_quiet_parks_an_openmp_team_and_lets_it_go():
    """Quieting runs a parallel region on a thread of its own and keeps it (and its team) until the time is
    up; the forced routes end it at once."""
    library = _native.library()
    torch.set_num_threads(os.cpu_count())  # the team it needs then has 2 threads
    torch.ones(1 << 20).exp_()  # torch's own team exists
    before, starts = _threads(), _counts()["quiet_starts"]
    assert library.hold_cpu_quiet(60_000)
    assert _wait_for(lambda: _counts()["quiet_starts"] == starts + 1)
    assert _threads() == before + 2  # the parked thread and its team's worker
    _route("pool")  # ends the quiet
    assert _wait_for(lambda: _threads() == before)
    assert library.hold_cpu_quiet(50)
    assert _wait_for(lambda: _counts()["quiet_starts"] == starts + 2)
    assert _wait_for(lambda: _threads() == before)  # over after 50 ms


def _run_with_environment(value: str) -> subprocess.CompletedProcess:
    script = (
        "import torch, symkernels\n"
        "from symkernels import _native\n"
        "torch.set_num_threads(2)\n"
        "x = torch.rand(300, 9, 9)\n"
        "symkernels.grouped_sinkhorn([x], 20, backend='cpu')\n"
        "print(_native.library().cpu_task_counts())\n"
    )
    environment = {**os.environ, "SYMKERNELS_CPU_THREADS": value}
    return subprocess.run([sys.executable, "-c", script], env=environment, capture_output=True, text=True)


def test_the_environment_chooses_the_route():
    result = _run_with_environment("pool")
    assert result.returncode == 0, result.stderr
    counts = ast.literal_eval(result.stdout.strip().splitlines()[-1])
    assert counts["pool"] > 0
    assert counts["team"] == 0


def test_a_bad_environment_value_is_reported():
    result = _run_with_environment("openmp")
    assert result.returncode != 0
    assert "SYMKERNELS_CPU_THREADS must be 'adaptive', 'team' or 'pool', got 'openmp'" in result.stderr
