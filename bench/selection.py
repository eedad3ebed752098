"""Which rows a report shows (per setup, each group from its latest run) and how a time is written."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

POT = ("pot-solve", "pot-scaling", "pot-log")
NATIVE = ("cuda", "triton", "cpu")


@dataclass(frozen=True)
class Setup:
    device: str  # cpu | cuda
    device_name: str
    threads: int
    busy: int

    @property
    def slug(self) -> str:
        """A file-name part, distinct for two machines of the same device type and thread count."""
        return f"{self.device}-{machine_slug(self.device_name)}-{self.threads}t" + (
            f"-busy{self.busy}" if self.busy else ""
        )

    def title(self) -> str:
        extra = f", {self.busy} competing busy process(es)" if self.busy else ""
        return f"{self.device_name}, {self.threads} thread(s){extra}"


def machine_slug(device_name: str) -> str:
    """``Intel(R) Xeon(R) Processor (2 logical cores)`` → ``intel-xeon``, ``NVIDIA H100 80GB HBM3`` →
    ``nvidia-h100-80gb-hbm3``: the name without parentheses and the words "processor" and "cpu"."""
    words = re.findall(r"[a-z0-9]+", re.sub(r"\([^)]*\)", " ", device_name).lower())
    return "-".join([w for w in words if w not in ("processor", "cpu")] or words) or "unknown"


def setup_of(row: dict[str, Any], runs: dict[str, dict[str, Any]]) -> Setup:
    env = runs.get(row["run"], {}).get("env", {})
    device = str(row.get("device", "cpu")).split(":")[0]
    return Setup(
        device, env.get("device_name", device), int(row.get("threads", 1)), int(row.get("busy_processes", 0))
    )


GROUP_FIELDS = ("section", "op", "workload", "mode", "regime", "dtype")


def latest(
    runs: dict[str, dict[str, Any]], rows: Sequence[dict[str, Any]]
) -> dict[Setup, list[dict[str, Any]]]:
    """Per setup, the rows of each group from the latest run that timed at least one of its providers."""
    chosen: dict[tuple, str] = {}
    for row in rows:
        if row.get("status") != "ok":
            continue
        key = (setup_of(row, runs), *(row.get(f) for f in GROUP_FIELDS))
        chosen[key] = max(chosen.get(key, ""), row["run"])
    out: dict[Setup, list[dict[str, Any]]] = {}
    for row in rows:
        setup = setup_of(row, runs)
        key = (setup, *(row.get(f) for f in GROUP_FIELDS))
        if chosen.get(key) == row["run"]:
            out.setdefault(setup, []).append(row)
    # A provider measured twice in one run (a rerun of the same group) counts once: the last row.
    return {s: list({r["id"]: r for r in rs}.values()) for s, rs in out.items()}


# ---------------------------------------------------------------------------------------------------------
# Formatting


def ms(value: float | None) -> str:
    if value is None:
        return "–"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 0.1:
        return f"{value:.2f}"
    return f"{value:.3f}"


def cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "–"
    if row.get("status") == "skipped":
        return "n/a"
    if row.get("status") != "ok":
        return "error"
    spread = (row["p80_ms"] - row["p20_ms"]) / 2 / row["median_ms"] if row["median_ms"] else 0
    text = ms(row["median_ms"]) + (f" ±{spread:.0%}" if spread >= 0.05 else "")
    if isinstance(row.get("graph"), dict):
        text += f" ({ms(row['graph']['median_ms'])})"
    return text


def median(row: dict[str, Any] | None) -> float | None:
    return row["median_ms"] if row is not None and row.get("status") == "ok" else None


def best(by_provider: dict[str, dict[str, Any]], names: Sequence[str]) -> tuple[str | None, float | None]:
    """The fastest of ``names`` that was measured: (provider, median ms)."""
    timed = [(name, median(by_provider.get(name))) for name in names]
    timed = [(name, t) for name, t in timed if t is not None]
    return min(timed, key=lambda item: item[1]) if timed else (None, None)


def ratio(numerator: float | None, denominator: float | None) -> str:
    if numerator is None or denominator is None or denominator == 0:
        return "–"
    return f"{numerator / denominator:.1f}×"


def ours(setup: Setup) -> tuple[str, ...]:
    return ("cuda", "triton") if setup.device == "cuda" else ("cpu",)


def authors_rule(backends: Sequence[str]) -> tuple[str, ...]:
    """The providers running the authors' stopping rule in the kernel, per layer and grouped."""
    return tuple(f"{b}{v}-authors-tol" for b in backends for v in ("", "-grouped"))
