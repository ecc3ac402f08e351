"""Per-exit errors on a data set, summed over batches and, in DDP, over ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist


class ExitErrors:
    """Top-1 / top-5 error of every exit, accumulated batch by batch."""

    def __init__(self, num_exits: int, device: torch.device | str = "cpu"):
        # rows: top-1 correct, top-5 correct; one column per exit; plus the sample count
        self.correct = torch.zeros(2, num_exits, dtype=torch.float64, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, logits: list[torch.Tensor], target: torch.Tensor) -> None:
        if isinstance(logits, torch.Tensor):  # iterating would take each image for an exit
            raise ValueError("per-exit errors need every exit's logits, and the model gave one "
                             "tensor: its single-tensor view for timm's tools is on; drop "
                             "output_exit from model.kwargs (or call model.set_output_exit(None))")
        k = min(5, logits[0].shape[1])
        for i, out in enumerate(logits):
            top = out.topk(k, dim=1).indices
            hits = top.eq(target[:, None])
            self.correct[0, i] += hits[:, 0].sum()
            self.correct[1, i] += hits.any(dim=1).sum()
        self.count += target.shape[0]

    def compute(self) -> dict[str, list[float]]:
        """{"top1": [...], "top5": [...]} errors in percent, over every rank's samples."""
        correct, count = self.correct.clone(), self.count.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(correct)
            dist.all_reduce(count)
        error = 100.0 * (1.0 - correct / count.clamp(min=1))
        return {"top1": error[0].tolist(), "top5": error[1].tolist(), "samples": int(count)}
