"""``symkernels export``: a run's model with its expanded kernels baked into plain ``nn.Conv2d`` layers.

The exported network has no Sinkhorn and no symkernels op; it is captured with :func:`torch.export.export`
(any batch size) and saved as a ``.pt2`` program that ``torch.export.load(path).module()`` runs without
symkernels installed. The soft model (as trained), the exported one and the hardened one (each learned stack
snapped to its nearest permutations) are scored on the run's test set.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from symkernels import export
from symkernels.nn import precompute_representations
from symkernels.training.checkpoint import atomic_open, atomic_write_text
from symkernels.training.config import RuntimeOptions, torch_threads
from symkernels.training.datasets import prepare_data
from symkernels.training.runs import load_run
from symkernels.training.steps import EVAL_BATCH_SIZE, torch_device

EXPORT_FORMAT = "torch.export"


@dataclass
class ExportReport:
    """What ``export.json`` holds."""

    run_dir: str
    file: str  # the saved program
    format: str
    harden: bool  # the saved program is the hardened model
    epoch: int  # the checkpoint's epoch
    test_images: int
    accuracy: dict[str, float]  # soft / exported / hardened
    loss: dict[str, float]
    max_abs_logit_difference: float  # soft vs exported model over the test set
    reloaded_max_abs_difference: float  # saved program, loaded back, vs the model it was made from

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


def export_run(
    run_dir: str | Path,
    *,
    harden: bool = False,
    out: str | Path | None = None,
    runtime: RuntimeOptions | None = None,
) -> ExportReport:
    """Export the model of ``run_dir`` to ``out`` (default ``RUN_DIR/exported.pt2``, or
    ``exported-hardened.pt2`` with ``harden``) and write ``RUN_DIR/export.json``. ``runtime.threads`` (when
    set) applies while it runs."""
    runtime = runtime or RuntimeOptions()
    with torch_threads(runtime.threads):
        return _export_run(run_dir, harden, out, runtime)


def _export_run(
    run_dir: str | Path, harden: bool, out: str | Path | None, runtime: RuntimeOptions
) -> ExportReport:
    run = load_run(run_dir)
    device = torch_device(runtime.device)
    default = run.paths.hardened_model if harden else run.paths.exported_model
    target = Path(out) if out is not None else default
    if target.suffix != ".pt2":
        raise ValueError(f"--out must name a .pt2 file (a torch.export program), got {str(target)!r}")
    if not target.parent.is_dir():
        raise FileNotFoundError(f"--out's folder {str(target.parent)!r} does not exist")
    data = prepare_data(run.config, runtime)
    images, labels = data.test_images, data.test_labels
    soft = run.model.to(device).eval()
    models = {
        "soft": soft,
        "exported": export.export_model(soft),
        "hardened": export.export_model(soft, harden=True),
    }
    scores, difference = _score(models, images, labels, device)
    # The program is captured on the CPU so that it loads on any machine.
    chosen = models["hardened" if harden else "exported"].cpu()
    example = images[: max(2, min(len(images), 8))].to(dtype=run.config.torch_dtype)
    program = export.export_program(chosen, example)
    with atomic_open(target, "wb") as file:
        torch.export.save(program, file)
    reloaded = torch.export.load(str(target)).module()
    with torch.no_grad():
        reloaded_difference = (reloaded(example) - chosen(example)).abs().max().item()
    report = ExportReport(
        run_dir=str(run.paths.root),
        file=str(target),
        format=EXPORT_FORMAT,
        harden=harden,
        epoch=run.epoch,
        test_images=len(labels),
        accuracy={name: accuracy for name, (_, accuracy) in scores.items()},
        loss={name: loss for name, (loss, _) in scores.items()},
        max_abs_logit_difference=difference,
        reloaded_max_abs_difference=reloaded_difference,
    )
    atomic_write_text(run.paths.export_report, report.to_json())
    return report


def _score(
    models: dict[str, nn.Module],
    images: torch.Tensor,
    labels: torch.Tensor,
    device: torch.device,
    batch_size: int = EVAL_BATCH_SIZE,
) -> tuple[dict[str, tuple[float, float]], float]:
    """``(mean cross-entropy, accuracy)`` of each model in eval mode (as :func:`evaluate` computes them) and
    the largest ``|soft - exported|`` logit difference, all from one forward pass per batch and model."""
    dtypes = {
        name: next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
        for name, model in models.items()
    }
    modes = {name: model.training for name, model in models.items()}
    losses = {name: torch.zeros((), dtype=torch.float64, device=device) for name in models}
    correct = {name: torch.zeros((), dtype=torch.int64, device=device) for name in models}
    worst = None
    try:
        with torch.no_grad(), contextlib.ExitStack() as stacks:
            for model in models.values():
                model.eval()
                # The stacks do not depend on the input: computed once for the whole test set.
                stacks.enter_context(precompute_representations(model))
            for start in range(0, len(labels), batch_size):
                batch = images[start : start + batch_size]
                y = labels[start : start + batch_size].to(device)
                logits = {}
                for name, model in models.items():
                    logits[name] = model(batch.to(device, dtypes[name]))
                    losses[name] += F.cross_entropy(logits[name], y, reduction="sum").double()
                    correct[name] += (logits[name].argmax(dim=1) == y).sum()
                # fmax skips NaN, as Python's max over the per-batch maxima did.
                gap = (logits["soft"] - logits["exported"]).abs().max()
                worst = gap if worst is None else torch.fmax(worst, gap)
    finally:
        for name, model in models.items():
            model.train(modes[name])
    count = float(len(labels))
    if count == 0:
        raise ValueError("the test set is empty")
    scores = {name: (losses[name].item() / count, float(correct[name].item()) / count) for name in models}
    return scores, max(0.0, worst.item())


def format_report(report: ExportReport) -> str:
    """The table ``symkernels export`` prints."""
    lines = [f"{'model':<10}  {'test accuracy':>13}  {'test loss':>9}"]
    for name in ("soft", "exported", "hardened"):
        lines.append(f"{name:<10}  {report.accuracy[name]:>13.4f}  {report.loss[name]:>9.4f}")
    lines.append(
        f"max |soft - exported| logit difference on {report.test_images} test images: "
        f"{report.max_abs_logit_difference:.3g}"
    )
    kind = "hardened" if report.harden else "exported"
    lines.append(
        f"wrote the {kind} model to {report.file} ({report.format}; load it with "
        "torch.export.load(path).module(), no symkernels needed)"
    )
    return "\n".join(lines)
