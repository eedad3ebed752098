"""The report's plots (matplotlib, PNG): Sinkhorn fwd+bwd per workload and provider, and the training step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.selection import POT, Setup, ours


def plot(setup: Setup, rows: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """Sinkhorn fwd+bwd per workload and provider (log scale), and the training step; PNG files."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    sinkhorn = [
        r for r in rows if r["op"] == "sinkhorn" and r["mode"] == "fwd+bwd" and r.get("status") == "ok"
    ]
    if sinkhorn:
        providers = [
            p
            for p in [
                "reference",
                "reference-compiled",
                "authors-loop",
                *POT,
                *(f"{b}{v}" for b in ours(setup) for v in ("", "-grouped")),
            ]
            if any(r["provider"] == p for r in sinkhorn)
        ]
        regimes = [g for g in ("init", "sharp") if any(r["regime"] == g for r in sinkhorn)]
        workloads = sorted({r["workload"] for r in sinkhorn if r["regime"] in regimes})  # not the tiny ones
        fig, axes = plt.subplots(
            1, len(regimes), figsize=(6.5 * len(regimes), 4.2), squeeze=False, sharey=True
        )
        width = 0.8 / max(1, len(providers))
        for ax, regime in zip(axes[0], regimes, strict=True):
            for j, provider in enumerate(providers):
                heights = []
                for workload in workloads:
                    row = next(
                        (
                            r
                            for r in sinkhorn
                            if r["workload"] == workload
                            and r["regime"] == regime
                            and r["provider"] == provider
                        ),
                        None,
                    )
                    heights.append(row["median_ms"] if row else float("nan"))
                ax.bar(
                    [i + (j - (len(providers) - 1) / 2) * width for i in range(len(workloads))],
                    heights,
                    width,
                    label=provider,
                )
            ax.set_yscale("log")
            ax.set_xticks(range(len(workloads)), [w.replace("batch-", "") for w in workloads], rotation=20)
            ax.set_title(f"Sinkhorn fwd+bwd, {regime} logits")
            ax.grid(axis="y", alpha=0.3)
        axes[0][0].set_ylabel("ms per call (median)")
        axes[0][-1].legend(fontsize=7, ncol=2)
        fig.suptitle(setup.title(), fontsize=9)
        fig.tight_layout()
        path = folder / f"{setup.slug}-sinkhorn.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    steps = [r for r in rows if r["op"] == "train-step" and r.get("status") == "ok"]
    if steps:
        workloads = sorted({r["workload"] for r in steps})
        fig, axes = plt.subplots(1, len(workloads), figsize=(4.5 * len(workloads), 3.6), squeeze=False)
        for ax, workload in zip(axes[0], workloads, strict=True):
            mine = [r for r in steps if r["workload"] == workload]
            ax.bar([r["provider"] for r in mine], [r["median_ms"] for r in mine], color="tab:blue")
            ax.set_title(f"training step, {workload}")
            ax.set_ylabel("ms per step (median)")
            ax.tick_params(axis="x", rotation=30, labelsize=8)
        fig.suptitle(setup.title(), fontsize=9)
        fig.tight_layout()
        path = folder / f"{setup.slug}-train-step.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
