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

__all__ = ["EVAL_BATCH_SIZE", "TrainingStep", "evaluate", "torch_device", "training_step"]

EVAL_BATCH_SIZE = 256
CPU_COMPILE_OPTIONS = {"layout_optimization": False}


def objective(
    model: nn.Module, net: nn.Module, x: torch.Tensor, y: torch.Tensor, config: TrainConfig
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward and regularisers: ``(objective, cross-entropy, logits, norm, entropy)``, the last four
    detached; the objective is cross-entropy + λ_norm·norm + λ_ent·entropy."""
    # Every stack of the model in one grouped Sinkhorn call, shared by forward and regularisers.
    with precompute_representations(model):
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        norm, entropy = model.regularizers()
    total = loss + config.lambda_norm * norm + config.lambda_ent * entropy
    return total, loss.detach(), logits.detach(), norm.detach(), entropy.detach()


class TrainingStep:
    """One AdamW step on a batch ``(x, y)``: ``step(x, y) -> (cross-entropy, logits, norm, entropy)``,
    detached, on the device; nothing is read back to the host (a step never waits for the device).

    ``net`` runs the forward (``model`` wrapped in DDP; default ``model``). ``compile=True`` runs the forward
    and the regularisers as one ``torch.compile`` graph (``fullgraph=True``), whose backward AOTAutograd
    compiles as one graph too; on CUDA with ``mode="reduce-overhead"`` (CUDA graphs). The optimizer step stays
    eager. Not with ``net`` a wrapper (DDP): dynamo cannot trace DistributedDataParallel's forward whole. A
    compiled step computes what the eager one does within float rounding, not bit for bit (the compiler fuses
    and reorders the elementwise work).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        config: TrainConfig,
        *,
        net: nn.Module | None = None,
        compile: bool = False,
    ) -> None:
        self.model, self.optimizer, self.config = model, optimizer, config
        self.net = model if net is None else net
        self.compiled = compile
        self.cuda_graphs = False
        self.forward = objective
        if compile:
            if self.net is not model:
                raise ValueError(
                    "--compile runs in one process: torch.compile(fullgraph=True) cannot trace "
                    "DistributedDataParallel's forward; leave --compile out under torchrun"
                )
            device = next(model.parameters()).device
            self.cuda_graphs = device.type == "cuda"
            # On the CPU inductor's layout optimisation turns the convolutions channels_last, which made the
            # default run's step slower (oneDNN's convolutions, and the norms then vectorised over the 4 group
            # elements only): it is off there.
            settings = {"mode": "reduce-overhead"} if self.cuda_graphs else {"options": CPU_COMPILE_OPTIONS}
            self.forward = torch.compile(objective, fullgraph=True, **settings)

    def __call__(
        self, x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.cuda_graphs:
            # A new iteration: the graphs' outputs of the previous one may be overwritten.
            torch.compiler.cudagraph_mark_step_begin()
        total, *terms = self.forward(self.model, self.net, x, y, self.config)
        self.optimizer.zero_grad(set_to_none=True)
        total.backward()
        self.optimizer.step()
        loss, logits, norm, entropy = terms
        return loss, logits, norm, entropy


def training_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    config: TrainConfig,
    *,
    net: nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One eager :class:`TrainingStep`."""
    return TrainingStep(model, optimizer, config, net=net)(x, y)


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
