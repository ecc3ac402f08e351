"""One optimizer step: forward through every exit, the anytime loss, backward, the update.

    step = TrainStep(model, criterion, optimizer, scaler, autocast, device, compile=True)
    loss, exit_losses = step(batches)   # one (images, labels) per forward pass of the step

With `compile`, the forward with the anytime loss goes through torch.compile as one function
(AOTAutograd compiles its backward with it). The model itself is not wrapped, so its state_dict,
and every checkpoint, is the same as an eager run's; evaluation stays eager.

The optimizer's update stays eager: torch's multi-tensor (foreach) SGD is a few kernels per step
already. Compiled, it needs the learning rate as a tensor (the scheduler's new float each step
would recompile it), and computes lr x grad before the add: on the CPU, 20 steps of the demo's
model then differ from eager by 1.5e-2 in the loss, against none for the compiled forward and
loss with the aot_eager backend (docs/throughput.md).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel

from pipeline.anytime.loss import AnytimeLoss

Batches = list[tuple[torch.Tensor, torch.Tensor]]


class TrainStep:
    """`step(batches)`: one optimizer step on the step's batches (one, or one per accumulated
    forward pass); returns the step's (loss, per-exit losses), averaged over its passes.

    `model` is what runs the forward: the DistributedDataParallel wrapper when there is one.
    `compile_mode` and `compile_backend` are torch.compile's `mode` and `backend`
    ("reduce-overhead" adds CUDA graphs; "aot_eager" skips code generation, for debugging).
    """

    def __init__(self, model: torch.nn.Module, criterion: AnytimeLoss,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                 autocast: AbstractContextManager, device: torch.device, *,
                 memory_format: torch.memory_format = torch.contiguous_format,
                 grad_clip: float = 0.0, compile: bool = False, compile_mode: str = "default",
                 compile_backend: str = "inductor"):
        self.model, self.criterion, self.optimizer = model, criterion, optimizer
        self.scaler, self.autocast, self.device = scaler, autocast, device
        self.memory_format, self.grad_clip = memory_format, grad_clip
        self.forward_loss: Callable[..., tuple[torch.Tensor, torch.Tensor]] = self._forward_loss
        if compile:
            self.forward_loss = torch.compile(
                self._forward_loss, backend=compile_backend,
                mode=None if compile_mode == "default" else compile_mode)

    def __call__(self, batches: Batches) -> tuple[torch.Tensor, torch.Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        self.criterion.start_step()  # outside the compiled forward: it reads a CPU generator
        passes = len(batches)
        loss_sum, exit_sum = torch.zeros((), device=self.device), 0
        for i, (images, labels) in enumerate(batches):
            images = images.to(self.device, non_blocking=True, memory_format=self.memory_format)
            labels = labels.to(self.device, non_blocking=True)
            # DDP all-reduces the gradients in the backward of the last pass only.
            last = i == passes - 1
            no_sync = self.model.no_sync() \
                if isinstance(self.model, DistributedDataParallel) and not last else nullcontext()
            with no_sync:
                loss, exit_losses = self.forward_loss(images, labels)
                self.scaler.scale(loss / passes if passes > 1 else loss).backward()
            loss_sum, exit_sum = loss_sum + loss.detach(), exit_sum + exit_losses
        self.criterion.end_step(exit_sum / passes)  # ADALOSS: the mean of the step's passes
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss_sum / passes, exit_sum / passes

    def _forward_loss(self, images: torch.Tensor,
                      labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with self.autocast:
            logits = self.model(images)
        return self.criterion(logits, labels)
