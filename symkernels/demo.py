"""Train a small WSCNN on C4-rotated digits; show what its lifting layer learned."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from symkernels import analysis, groups
from symkernels.data import load_digits, rotate_quarter_turns
from symkernels.models import WSCNN


@dataclass
class DemoConfig:
    # Sized for under a minute on two CPU cores: the paper's depth (lifting + 4 group-conv layers, k = 5) with
    # 8 channels. The logits get a larger learning rate than the paper's 1e-2 so that the stacks visibly leave
    # their near-uniform initialisation within a few hundred steps.
    epochs: int = 30
    batch_size: int = 32
    hidden_channels: int = 8
    num_layers: int = 4
    kernel_size: int = 5
    n_iter: int = 20
    lr: float = 3e-3
    logits_lr: float = 1e-1
    weight_decay: float = 1e-4
    lambda_norm: float = 0.0
    train_limit: int | None = None  # use only this many training images (quick checks)
    seed: int = 0


@dataclass
class DemoResult:
    test_accuracy: float
    coefficients: torch.Tensor  # [G, 4]: lifting stack element × C4 rotation
    element_names: list[str]
    seconds: float


def accuracy(
    model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256
) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(labels), batch_size):
            logits = model(images[start : start + batch_size])
            correct += (logits.argmax(dim=1) == labels[start : start + batch_size]).sum().item()
    model.train()
    return correct / max(len(labels), 1)


def run_demo(config: DemoConfig, *, progress: bool = True) -> DemoResult:
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    (x_train, y_train), (x_test, y_test) = load_digits(seed=config.seed)
    if config.train_limit is not None:
        x_train, y_train = x_train[: config.train_limit], y_train[: config.train_limit]
    x_test = rotate_quarter_turns(x_test, generator)  # rotated once; training rotates on the fly
    model = WSCNN(
        hidden_channels=config.hidden_channels,
        kernel_size=config.kernel_size,
        num_layers=config.num_layers,
        n_iter=config.n_iter,
    )
    logits = [p for name, p in model.named_parameters() if name.endswith("reps.logits")]
    others = [p for name, p in model.named_parameters() if not name.endswith("reps.logits")]
    optimizer = torch.optim.AdamW(
        [{"params": others, "lr": config.lr}, {"params": logits, "lr": config.logits_lr}],
        weight_decay=config.weight_decay,
    )
    start_time = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        order = torch.randperm(len(y_train), generator=generator)
        batches = range(0, len(order), config.batch_size)
        bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", disable=not progress, leave=False)
        total_loss = 0.0
        for start in bar:
            index = order[start : start + config.batch_size]
            images = rotate_quarter_turns(x_train[index], generator)
            loss = F.cross_entropy(model(images), y_train[index])
            norm, _ = model.regularizers()
            objective = loss + config.lambda_norm * norm
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            optimizer.step()
            total_loss += loss.item() * len(index)
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if progress:
            print(
                f"epoch {epoch}/{config.epochs}  train loss {total_loss / len(order):.4f}  "
                f"test accuracy {accuracy(model, x_test, y_test):.4f}",
                flush=True,
            )
    with torch.no_grad():
        stack = model.lift.representations()
    basis = groups.rotation_permutations(config.kernel_size)
    return DemoResult(
        test_accuracy=accuracy(model, x_test, y_test),
        coefficients=analysis.decompose(stack, basis),
        element_names=groups.rotation_names(),
        seconds=time.perf_counter() - start_time,
    )


def format_decomposition(result: DemoResult) -> str:
    header = "stack element  " + "  ".join(f"{name:>7}" for name in result.element_names)
    rows = [header]
    for i, row in enumerate(result.coefficients.tolist()):
        label = "identity" if i == 0 else f"R{i}"
        rows.append(f"{label:<13}  " + "  ".join(f"{c:7.3f}" for c in row))
    return "\n".join(rows)
