"""The speed targets a report checks, each met / not met / unknown with its numbers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from bench.selection import POT, Setup, authors_rule, best, ms, ours

GOAL_POT_SPEEDUP, GOAL_REFERENCE_SPEEDUP, GOAL_AUTHORS_RULE_SPEEDUP = 3.0, 5.0, 3.0
MODEL_WORKLOADS = ("mnist-wscnn", "cifar-wsresnet")
GOAL_AUTHORS_SPEEDUP, GOAL_COMPILED_SPEEDUP, GOAL_BANDWIDTH_FRACTION = 100.0, 10.0, 0.70


def goals(setup: Setup, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets, each met / not met / unknown with its numbers. CPU at one thread: native Sinkhorn fwd+bwd
    ≥ 3× POT's fastest and ≥ 5× the eager reference on every workload, and on the model stacks at the
    paper's initialisation, with the authors' stopping rule in the kernel, ≥ 3× their loop. GPU: the model
    stacks' fwd+bwd ≥ 100× the authors' loop and ≥ 10× the compiled reference; the 1024×64×64 forward ≥ 70%
    of copy bandwidth."""
    by_group: dict[tuple, dict[str, dict[str, Any]]] = {}
    for row in rows:
        if row["op"] == "sinkhorn":
            by_group.setdefault((row["workload"], row["mode"], row["regime"]), {})[row["provider"]] = row
    out = []
    mine = ours(setup)
    if setup.device == "cpu":
        if setup.threads != 1 or setup.busy:
            return []
        targets = (
            ("POT's fastest", POT, GOAL_POT_SPEEDUP),
            ("the eager reference", ("reference",), GOAL_REFERENCE_SPEEDUP),
        )
        for (workload, mode, regime), by_provider in sorted(by_group.items()):
            if mode != "fwd+bwd":
                continue
            for label, baselines, target in targets:
                out.append(
                    _speedup_goal(
                        f"{workload} fwd+bwd ({regime}) ≥ {target:g}× {label}",
                        by_provider,
                        baselines,
                        mine,
                        target,
                    )
                )
            if workload in MODEL_WORKLOADS and regime == "init":
                out.append(
                    _speedup_goal(
                        f"{workload} fwd+bwd (init), the authors' rule in the kernel ≥ "
                        f"{GOAL_AUTHORS_RULE_SPEEDUP:g}× the authors' loop",
                        by_provider,
                        ("authors-loop",),
                        authors_rule(mine),
                        GOAL_AUTHORS_RULE_SPEEDUP,
                    )
                )
        return out
    grouped = tuple(f"{b}-grouped" for b in mine)
    for (workload, mode, regime), by_provider in sorted(by_group.items()):
        if mode != "fwd+bwd" or workload not in MODEL_WORKLOADS:
            continue
        for baseline, target in (
            ("authors-loop", GOAL_AUTHORS_SPEEDUP),
            ("reference-compiled", GOAL_COMPILED_SPEEDUP),
        ):
            out.append(
                _speedup_goal(
                    f"{workload} fwd+bwd ({regime}) ≥ {target:g}× {baseline}",
                    by_provider,
                    (baseline,),
                    mine + grouped,
                    target,
                )
            )
    copy = next((r for r in rows if r["op"] == "bandwidth" and r.get("status") == "ok"), None)
    copy_gbps = copy.get("achieved_gbps") if copy else None
    achieved = {
        f"{r['provider']}/{r['regime']}": r["achieved_gbps"]
        for r in rows
        if r["op"] == "sinkhorn"
        and r["workload"] == "batch-1024x64x64"
        and r["mode"] == "fwd"
        and r["provider"] in mine
        and r.get("achieved_gbps")
    }
    goal = {
        "goal": f"batch-1024x64x64 forward ≥ {GOAL_BANDWIDTH_FRACTION:.0%} of copy bandwidth",
        "target": GOAL_BANDWIDTH_FRACTION,
        "copy_gbps": copy_gbps,
        "achieved_gbps": achieved,
    }
    if copy_gbps and achieved:
        fraction = max(achieved.values()) / copy_gbps
        goal.update(
            status="met" if fraction >= GOAL_BANDWIDTH_FRACTION else "not met",
            value=fraction,
            numbers=f"best {max(achieved.values()):.0f} GB/s of {copy_gbps:.0f} GB/s copy ({fraction:.0%})",
        )
    else:
        goal.update(status="unknown", value=None, numbers="–")
    out.append(goal)
    return out


def _speedup_goal(name, by_provider, baselines, mine, target) -> dict[str, Any]:
    base_name, base = best(by_provider, baselines)
    our_name, our = best(by_provider, mine)
    goal = {
        "goal": name,
        "target": target,
        "baseline": base_name,
        "baseline_ms": base,
        "ours": our_name,
        "ours_ms": our,
    }
    if base is None or our is None:
        goal.update(status="unknown", value=None, numbers="–")
    else:
        goal.update(
            status="met" if base / our >= target else "not met",
            value=base / our,
            numbers=f"{our_name} {ms(our)} ms vs {base_name} {ms(base)} ms: {base / our:.1f}×",
        )
    return goal


def goal_lines(goal_list: Sequence[dict[str, Any]]) -> list[str]:
    if not goal_list:
        return []
    lines = ["| goal | status | numbers |", "|---|---|---|"]
    lines += [f"| {g['goal']} | **{g['status']}** | {g['numbers']} |" for g in goal_list]
    return lines
