"""The CPU kernels' thread pool (csrc/cpu_pool.cpp): the same results on any number of threads, from
concurrent callers and in a forked child."""

from __future__ import annotations

import multiprocessing
import threading

import pytest
import torch

import symkernels
from tests.testing import implementation_for, make_logits


@pytest.fixture(autouse=True)
def native_cpu():
    implementation_for("cpu")  # fails (never skips) when the native CPU kernels are missing


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


def test_results_do_not_depend_on_the_thread_count():
    """Each matrix is computed by one thread from start to end: bitwise the same on 1, 2 and 4 threads."""
    stacks = _stacks()
    one = _with_threads(1, lambda: _forward_backward(stacks))
    for threads in (2, 4):
        _assert_identical(_with_threads(threads, lambda: _forward_backward(stacks)), one)


def test_concurrent_callers():
    """Calls from several Python threads at once (one holds the workers, the others run alone) all finish with
    the results of a call made alone."""
    stacks = _stacks()
    expected = _with_threads(2, lambda: _forward_backward(stacks))
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
    queue.put(_fork_forward().numpy())


@pytest.mark.skipif("fork" not in multiprocessing.get_all_start_methods(), reason="needs fork()")
def test_forked_child_runs_the_kernels():
    """A child forked after the parent's workers ran has none of them: its calls still finish, and give the
    parent's result."""

    def fork_and_run() -> tuple[torch.Tensor, torch.Tensor, int | None]:
        expected = _fork_forward()
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_child, args=(queue,))
        child.start()
        try:
            got = torch.from_numpy(queue.get(timeout=120))
        finally:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()
        return got, expected, child.exitcode

    got, expected, exitcode = _with_threads(2, fork_and_run)
    assert exitcode == 0
    assert torch.equal(got, expected)
