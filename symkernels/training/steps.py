"""One optimisation step, the evaluation pass, and the device a run uses: what the loop repeats, and what the
benchmarks and the exporter call on their own."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from symkernels.nn import precompute_representations
from symkernels.training import distributed
from symkernels.training.config import TrainConfig
from symkernels.training.distributed import DistEnv

__all__ = ["EVAL_BATCH_SIZE", "evaluate", "torch_device", "training_step"]

EVAL_BATCH_SIZE = 256


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    net: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step on the batch ``(x, y)``: cross-entropy + λ_norm·norm + λ_ent·entropy.

    ``net`` runs the forward (``model`` wrapped in DDP; default ``model``). Returns the detached
    ``(cross-entropy, logits, norm, entropy)``; nothing is read back to the host.
    """
    net = model if net is None else net
    # Every stack of the model in one grouped Sinkhorn call, shared by forward and regularisers.
    with precompute_representations(model):
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        norm, entropy = model.regularizers()
    objective = loss + config.lambda_norm * norm + config.lambda_ent * entropy
    optimizer.zero_grad(set_to_none=True)
    objective.backward()
    optimizer.step()
    return loss.detach(), logits.detach(), norm.detach(), entropy.detach()


def torch_device(name: str, env: DistEnv | None = None) -> torch.device:
    """``"auto"``: CUDA when available (``cuda:LOCAL_RANK`` under torchrun), else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={name!r} but CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", env.local_rank if env is not None else torch.cuda.current_device())
    return device


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    device: torch.device,
    env: DistEnv | None = None,
    batch_size: int = EVAL_BATCH_SIZE,
) -> tuple[float, float]:
    """``(mean cross-entropy, accuracy)`` of ``model`` in eval mode; under DDP each process scores a part and
    the sums are combined."""
    env = env or DistEnv()
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    part = distributed.even_range(len(labels), env)
    images, labels = images[part], labels[part]
    was_training = model.training
    model.eval()
    loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    try:
        # The stacks do not depend on the input: compute them once for the whole test set.
        with torch.no_grad(), precompute_representations(model):
            for start in range(0, len(labels), batch_size):
                x = images[start : start + batch_size].to(device, dtype)
                y = labels[start : start + batch_size].to(device)
                logits = model(x)
                loss += F.cross_entropy(logits, y, reduction="sum").double()
                correct += (logits.argmax(dim=1) == y).sum()
    finally:
        model.train(was_training)
    loss_sum, correct_sum, count = distributed.sum_across(
        [loss.item(), float(correct.item()), float(len(labels))], env, device
    )
    if count == 0:
        raise ValueError("the test set is empty")
    return loss_sum / count, correct_sum / count
