"""The benchmark suite's cases as pytest-benchmark tests: the same ``Case`` objects as ``python -m bench``
(the closures, providers and workloads of every op script registered in bench/__main__.py), one test per
case, its id the case's id.

    pytest bench --benchmark-only                        # every case (choose with -k 'overhead and tiny')
    pytest bench --benchmark-only --bench-quick          # the quick subset, with the quick settings
    pytest bench --benchmark-only -k overhead --benchmark-autosave    # save a run (in .benchmarks/)
    pytest bench --benchmark-only -k overhead --benchmark-compare     # compare with the last saved run
    pytest bench --bench-quick --benchmark-disable       # each quick case once, untimed (CI's smoke test)

Each case is timed as the harness times it (bench/harness.py): the first call on its own, the harness's
warm-up and calls per sample, then ``benchmark.pedantic`` with the harness's rounds of that many calls
(pytest-benchmark's statistics are per call), then one more call for the peak memory. The providers of a
group are not interleaved here: comparisons between providers belong to ``python -m bench``; this is for one
case before and after a change. A case whose provider cannot run here is skipped with the harness's reason.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

import symkernels
from bench import harness, timing
from bench.__main__ import OP_NAMES, QUICK_OPS, plan
from bench.conftest import option
from bench.environment import load_average

pytest.importorskip("pytest_benchmark", reason="needs pytest-benchmark (pip install -e '.[bench]')")

CASES = pytest.StashKey[dict[str, harness.Case]]()


def quick(config: pytest.Config) -> bool:
    return bool(option(config, "bench_quick", False))


def group_label(case: harness.Case) -> str:
    """The case's group (the cases that differ only by provider), as pytest-benchmark's tables group them."""
    parts = [case.op, case.mode, case.workload, case.regime, case.dtype if case.dtype != "float32" else None]
    return "/".join(part for part in parts if part is not None)


def marks(case: harness.Case) -> pytest.MarkDecorator:
    if torch.device(case.device).type == "cuda":  # a round's time includes its kernels
        return pytest.mark.benchmark(group=group_label(case), timer=timing.cuda_clock)
    return pytest.mark.benchmark(group=group_label(case))


def planned(config: pytest.Config) -> list[harness.Case]:
    """The quick set (--bench-quick); else every case of ``python -m bench``, and the quick set's own smaller
    workloads, so that any case id a run printed can be chosen with -k."""
    device = str(option(config, "bench_device", "cpu"))
    quick_cases = plan(QUICK_OPS, device, quick=True, only=None)
    if quick(config):
        return quick_cases
    cases = plan(OP_NAMES, device, quick=False, only=None)
    known = {case.id for case in cases}
    cases += [case for case in quick_cases if case.id not in known]
    cases.sort(key=lambda case: case.section == "compiled")  # as plan() orders them: long compilations last
    return cases


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "case" not in metafunc.fixturenames:
        return
    config = metafunc.config
    cases = planned(config)
    config.stash[CASES] = {case.id: case for case in cases}
    params = [pytest.param(case.id, id=case.id, marks=marks(case)) for case in cases]
    metafunc.parametrize("case", params, indirect=True)


@pytest.fixture
def case(request: pytest.FixtureRequest) -> harness.Case:
    return request.config.stash[CASES][request.param]


@pytest.fixture
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """torch's thread count during the test (--bench-threads), restored after it."""
    count = int(option(request.config, "bench_threads", 1))
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    yield count
    torch.set_num_threads(previous)


def test_case(case: harness.Case, benchmark, threads: int, request: pytest.FixtureRequest) -> None:
    if torch.device(case.device).type == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device is visible")
    reason = harness._safe_requires(case)
    if reason is not None:
        pytest.skip(reason)
    benchmark.extra_info.update(
        case.describe(),
        threads=threads,
        load_avg=load_average(),
        backends={name: status.usable for name, status in symkernels.backend_status().items()},
    )
    if not benchmark.enabled:  # --benchmark-disable: one call, untimed
        benchmark.pedantic(case.make())
        return
    settings = harness.settings_for(quick(request.config))
    fn, first_call_s = harness.first_call(case)
    calls, rounds = harness.calibrate(fn, case, settings, first_call_s)
    benchmark.pedantic(fn, rounds=rounds, iterations=calls)
    benchmark.extra_info.update(
        first_call_s=first_call_s,
        calls_per_sample=calls,
        rounds=rounds,
        peak_bytes=timing.peak_bytes(fn, case.device),
    )
    if case.after is not None:
        with timing.quiet_profiler():
            benchmark.extra_info.update(case.after(fn))
