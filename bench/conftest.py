"""Options of the benchmark suite under pytest-benchmark (bench/test_bench_cases.py), and what the saved JSON
records about where it ran."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("symkernels benchmarks", "the suite's cases under pytest-benchmark (bench/)")
    group.addoption(
        "--bench-quick",
        action="store_true",
        help="the quick subset and settings of `python -m bench --quick` (the cases CI runs)",
    )
    group.addoption("--bench-device", default="cpu", help="device of the cases: cpu (default) or cuda")
    group.addoption("--bench-threads", type=int, default=1, help="torch threads while timing (default 1)")


def option(config: pytest.Config, name: str, default: object) -> object:
    """A --bench-* option; its default where this conftest was not loaded before the command line was read
    (``pytest .`` from the repository root)."""
    return config.getoption(name, default=default)


# What changes from run to run on one machine: pytest-benchmark warns whenever a saved run's machine_info
# differs from the current one's, so these stay out of it (the commit is in commit_info, the load average in
# each benchmark's extra_info).
PER_RUN = ("date", "load_avg", "commit")


@pytest.hookimpl(optionalhook=True)  # a pytest-benchmark hook: absent without the plugin
def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict) -> None:
    from bench.environment import environment

    env = environment(str(option(config, "bench_device", "cpu")))
    machine_info["symkernels"] = {key: value for key, value in env.items() if key not in PER_RUN}
