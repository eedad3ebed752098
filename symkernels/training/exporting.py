"""``symkernels export``: a run's model with its expanded kernels baked into plain ``nn.Conv2d`` layers.

The exported network has no Sinkhorn and no symkernels op; it is captured with :func:`torch.export.export`
(any batch size) and saved as a ``.pt2`` program that ``torch.export.load(path).module()`` runs without
symkernels installed. The soft model (as trained), the exported one and the hardened one (each learned stack
snapped to its nearest permutations) are scored on the run's test set.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from symkernels import export
from symkernels.training.checkpoint import atomic_open, atomic_write_text
from symkernels.training.config import RuntimeOptions
from symkernels.training.datasets import prepare_data
from symkernels.training.loop import evaluate, torch_device
from symkernels.training.runs import load_run

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
    ``exported-hardened.pt2`` with ``harden``) and write ``RUN_DIR/export.json``."""
    runtime = runtime or RuntimeOptions()
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
    scores = {name: evaluate(model, images, labels, device=device) for name, model in models.items()}
    difference = _max_difference(soft, models["exported"], images, device)
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


def _max_difference(a: nn.Module, b: nn.Module, images: torch.Tensor, device: torch.device) -> float:
    worst = 0.0
    dtype = next(a.parameters()).dtype
    with torch.no_grad():
        for start in range(0, len(images), 256):
            x = images[start : start + 256].to(device, dtype)
            worst = max(worst, (a(x) - b(x)).abs().max().item())
    return worst


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
