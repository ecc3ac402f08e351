"""The anytime training loss: a weighted sum of every exit's cross-entropy (SPEC section 2).

Adds the two dynamic parts on top of the static schemes in ``weights.py``: ALTERNATING (one extra
randomly drawn exit per optimizer step) and ADALOSS (weights from a moving average of the losses).

ALTERNATING has two rules. "seed" (SPEC section 2): the drawn exit j adds B_L * l_j. "authors"
(the authors' code): it adds sum(B) / sum_rand_ratio * l_j, and the first step uses the final exit
instead of a draw. They agree when sum(B) = 2 B_L (SIEVE, SIEVE-ORIG, HALF-END) from the second
step on; for CONST and LINEAR the authors' term is larger (3x and 1.9x at 6 exits).
Everything the next call depends on (weights, averages, step count, the draw generator) is in
``state_dict()`` so a resumed run continues exactly as an uninterrupted one.

The forward pass never moves a value from the accelerator to the host, so it adds no sync point
to the training step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.anytime.weights import static_weights
from pipeline.config import LossConfig
from pipeline.errors import UserError


class AnytimeLoss(nn.Module):
    """total = sum_i B_i * CE(logits_i, target), plus the ALTERNATING and ADALOSS extensions."""

    def __init__(self, num_exits: int, config: LossConfig | None = None, *, seed: int = 0):
        """`config`: the loss section, checked when it was built (default: LossConfig()'s
        SIEVE); `seed`: ALTERNATING's draws."""
        super().__init__()
        config = config or LossConfig()
        self.config = config
        self.num_exits = num_exits
        self.scheme = config.scheme
        self.alternating = config.alternating
        self.alternating_rule = config.alternating_rule

        init = static_weights(config.scheme, num_exits, config.opt_exit)
        self.register_buffer("loss_weights", torch.tensor(init, dtype=torch.float32))
        self.register_buffer("loss_ema", torch.zeros(num_exits, dtype=torch.float32))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))
        # A private CPU generator: draws must not depend on (or disturb) the global RNG, which the
        # model and data pipeline also consume, so that they replay exactly after a resume.
        self._generator = torch.Generator().manual_seed(seed)
        # The exit drawn for the current optimizer step by ALTERNATING (0-based, on the weights'
        # device), also for logs.
        self.last_drawn: Tensor | None = None
        self._step_started = False

    @property
    def weights(self) -> list[float]:
        """The current B_1..B_L (final exit last)."""
        return [float(b) for b in self.loss_weights.tolist()]

    def start_step(self) -> None:
        """Begin an optimizer step: ALTERNATING draws its extra exit for the step's passes.

        Outside `forward` because the draw reads a CPU generator, which torch.compile cannot put
        in a graph; the training step calls it before its compiled forward passes."""
        if self.training and self.alternating:
            self.last_drawn = self._draw(self.loss_weights)
        self._step_started = True

    def forward(self, logits: list[Tensor], target: Tensor) -> tuple[Tensor, Tensor]:
        """Return (total loss, detached float32 per-exit losses of shape [L]).

        In training, each optimizer step is `start_step()`, then `forward` and backward for each
        of its passes (one, or several with gradient accumulation), then `end_step(mean
        per-exit losses)`: the step draws one ALTERNATING exit and updates ADALOSS once, as a
        step of one pass over the same images would. `forward` changes no state, so that a
        compiled forward + backward cannot read a buffer after its update."""
        if isinstance(logits, Tensor):  # a model with its single-tensor view on (output_exit)
            raise ValueError("the anytime loss needs every exit's logits, a list; got one tensor "
                             "(a model built with output_exit=k): set_output_exit(None)")
        if len(logits) != self.num_exits:
            raise ValueError(f"expected {self.num_exits} exit logits, got {len(logits)}")
        # float32 CE: bf16 logits under autocast lose too much precision in log-softmax.
        losses = torch.stack([F.cross_entropy(y.float(), target) for y in logits])
        w = self.loss_weights  # updated in place only by end_step, after the step's backward
        # Multiply even zero weights so every head stays in the graph (DDP unused-parameter check).
        total = (w * losses).sum()
        if self.training and self.alternating:
            if not self._step_started:
                raise RuntimeError("ALTERNATING draws one exit per optimizer step: call "
                                   "start_step() before the step's forward passes")
            # index_select, not losses[tensor]: indexing with a tensor reads it to the host.
            drawn_loss = losses.index_select(0, self.last_drawn.view(1)).squeeze(0)
            total = total + self._alternating_weight(w) * drawn_loss
        return total, losses.detach()

    @torch.no_grad()
    def end_step(self, losses: Tensor) -> None:
        """End an optimizer step with its per-exit losses (the mean over its passes): ADALOSS
        updates its averages (and its weights when due); the step count goes up."""
        self._step_started = False
        if not self.training:
            return
        if self.scheme == "adaloss":
            if dist.is_available() and dist.is_initialized():
                # Same averages on every rank, hence the same weights and the same gradients.
                losses = losses.clone()
                dist.all_reduce(losses)
                losses /= dist.get_world_size()
            first = self.num_steps == 0
            momentum = self.config.adaloss_momentum
            ema = momentum * self.loss_ema + (1.0 - momentum) * losses
            self.loss_ema.copy_(torch.where(first, losses, ema))
            due = (self.num_steps + 1) % self.config.adaloss_update_every == 0
            self.loss_weights.copy_(torch.where(due, self._adaloss_weights(), self.loss_weights))
        self.num_steps += 1

    def _draw(self, w: Tensor) -> Tensor:
        # u comes from the CPU generator and the comparison runs on the weights' device, so the
        # draw needs no device-to-host copy. P(j) = w_j / sum(w); zero weights are never drawn.
        u = torch.rand((), generator=self._generator, dtype=torch.float64).item()
        cdf = torch.cumsum(w, 0)
        j = (cdf <= u * cdf[-1]).sum().clamp(max=self.num_exits - 1)
        if self.alternating_rule == "authors":
            # Their first step trains the final exit. The draw above is made all the same, so the
            # generator runs in step with the seed's rule; torch.where keeps the check on-device.
            j = torch.where(self.num_steps == 0, self.num_exits - 1, j)
        return j

    def _alternating_weight(self, w: Tensor) -> Tensor:
        """The drawn exit's extra weight: B_L (the seed's rule), sum(B) / sum_rand_ratio (the
        authors')."""
        return w[-1] if self.alternating_rule == "seed" else w.sum() / self.config.sum_rand_ratio

    def _adaloss_weights(self) -> Tensor:
        # A memorised exit can average a loss of exactly 0; 1/0 would turn every weight into NaN.
        w = 1.0 / self.loss_ema.clamp_min(1e-12)
        w = w / w.max()
        if self.config.adaloss_final_boost > 0:
            w[-1] += self.config.adaloss_final_boost
            w = w / w.max()
        gamma = self.config.adaloss_gamma
        return (1.0 - gamma) * w + gamma

    def get_extra_state(self) -> dict[str, Any]:
        # Only tensors and plain types, so checkpoints load with torch.load(weights_only=True).
        return {
            "generator": self._generator.get_state(),
            "scheme": self.scheme,
            "num_exits": self.num_exits,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if state.get("scheme") != self.scheme or state.get("num_exits") != self.num_exits:
            # The checkpoint's weights would silently override the configured scheme.
            raise UserError(
                f"checkpoint loss was trained with scheme {state.get('scheme')!r} and "
                f"{state.get('num_exits')} exits, but this run uses {self.scheme!r} and "
                f"{self.num_exits} exits; resume with the original loss settings"
            )
        # map_location may have moved it to an accelerator; the generator lives on the CPU.
        self._generator.set_state(state["generator"].to("cpu", torch.uint8))

    def extra_repr(self) -> str:
        rule = f" (rule: {self.alternating_rule})" if self.alternating else ""
        return (f"num_exits={self.num_exits}, scheme={self.scheme!r}, "
                f"alternating={self.alternating}{rule}")
