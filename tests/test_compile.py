"""train.compile: the training step's forward + anytime loss through torch.compile.

Graph breaks are counted with torch._dynamo.explain on a small model of each family under each
path of the loss (static weights, ALTERNATING under both rules, ADALOSS): the goal is none. The
compiled step is compared with eager over 20 steps (the aot_eager back end compiles the same
graph without code generation: bitwise equal), and a compiled run's checkpoint is resumed
compiled and eager, through the real trainer, with bitwise the same weights. Inductor's code
generation costs minutes on 2 cores, so its speed and its numbers are for the GPU window
(benchmarks/gpu_window.sh), not for CI.
"""

from __future__ import annotations

import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import timm
import torch
from conftest import assert_same_weights

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.anytime.loss import AnytimeLoss
from pipeline.config import LossConfig, load_config
from pipeline.errors import UserError
from pipeline.models import create_anytime_model
from pipeline.storage.checkpoints import CheckpointStore
from pipeline.train.step import TrainStep
from pipeline.train.trainer import train

SMALL_MODELS = {  # one of each family, small enough to trace in a second or two
    "resnet_ann_cifar": (dict(depth=8, width=4), 16),
    "resnet18_ann": (dict(), 32),
    "msdnet_cifar": (dict(blocks=2, base=2, step=1, channels=4, growth=2), 16),
}
LOSSES = {
    "sieve": dict(scheme="sieve"),
    "const, alternating (seed's rule)": dict(scheme="const", alternating=True),
    "linear, alternating (authors' rule)": dict(scheme="linear", alternating=True,
                                                alternating_rule="authors"),
    "adaloss, alternating": dict(scheme="adaloss", alternating=True, adaloss_update_every=1),
}


def small_step(name: str, loss: dict, compile: bool = False, lr: float = 0.05) -> TrainStep:
    kwargs, _ = SMALL_MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs).train()
    criterion = AnytimeLoss(model.num_exits, LossConfig(**loss), seed=1).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True,
                                weight_decay=5e-4)
    return TrainStep(model, criterion, optimizer, torch.amp.GradScaler("cpu", enabled=False),
                     nullcontext(), torch.device("cpu"), compile=compile,
                     compile_backend="aot_eager")


def batches(name: str, n: int, passes: int = 1) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    size = SMALL_MODELS[name][1]
    g = torch.Generator().manual_seed(2)
    return [[(torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g))
             for _ in range(passes)] for _ in range(n)]


@pytest.mark.parametrize("loss", list(LOSSES))
@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_the_forward_and_loss_compile_without_graph_breaks(name, loss):
    step = small_step(name, LOSSES[loss])
    [(images, labels)] = batches(name, 1)[0]
    torch._dynamo.reset()
    step.criterion.start_step()  # as the step does, outside the compiled function
    explained = torch._dynamo.explain(step.forward_loss)(images, labels)
    reasons = [str(r.reason).splitlines()[0] for r in explained.break_reasons]
    assert explained.graph_break_count == 0, reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("name", list(SMALL_MODELS))
def test_the_compiled_step_gives_the_eager_losses(name):
    loss = LOSSES["adaloss, alternating"]  # every dynamic part of the loss at once
    eager, compiled = small_step(name, loss), small_step(name, loss, compile=True)
    torch._dynamo.reset()
    data = batches(name, 20)
    losses = [[step(b)[0].item() for b in data] for step in (eager, compiled)]
    assert losses[0] == losses[1]  # aot_eager runs the very same kernels
    assert compiled.criterion.weights == eager.criterion.weights
    assert_same_weights(compiled.model.state_dict(), eager.model.state_dict())


@pytest.mark.slow
def test_a_compiled_runs_checkpoint_resumes_compiled_or_eager_alike(fmnist, tmp_path):
    def config(out, epochs, *extra):
        return load_config("configs/demo_fmnist_resnet_ann.yaml", [
            f"data.root={fmnist}", f"out_dir={out}", "data.batch_size=50", "data.workers=0",
            "train.max_steps_per_epoch=4", f"train.epochs={epochs}", "train.amp=none",
            "resume=auto", *extra])

    compiled = ["train.compile=true", "train.compile_backend=aot_eager"]
    torch._dynamo.reset()
    train(config(tmp_path / "a", 1, *compiled))
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    state = latest_state(tmp_path / "a")
    model = timm.create_model("resnet_ann_cifar20", num_classes=10, width=16)
    assert set(state["model"]) == set(model.state_dict())  # no compiled-module prefixes

    train(config(tmp_path / "a", 2, *compiled))  # resumed compiled
    train(config(tmp_path / "b", 2))  # resumed eager
    resumed_compiled, resumed_eager = latest_state(tmp_path / "a"), latest_state(tmp_path / "b")
    assert resumed_compiled["step"] == resumed_eager["step"] == 8
    assert_same_weights(resumed_compiled["model"], resumed_eager["model"])
    losses = [{**state["loss"], "_extra_state": state["loss"]["_extra_state"]["generator"]}
              for state in (resumed_compiled, resumed_eager)]  # AdaLoss, ALTERNATING's draws
    assert_same_weights(*losses)


def latest_state(out: Path) -> dict:
    store = CheckpointStore(str(out / "demo_fmnist" / "checkpoints"))
    return store.load(store.latest_valid())


def test_the_single_tensor_view_is_refused_for_training():
    cfg = load_config("configs/demo_fmnist_resnet_ann.yaml", ["model.kwargs={output_exit: -1}"])
    with pytest.raises(UserError, match="model.kwargs.output_exit .* remove it"):
        create_anytime_model(cfg.model.name, 10, **cfg.model.kwargs)
    model = timm.create_model("resnet_ann_cifar", depth=8, width=4, num_classes=10, output_exit=-1)
    criterion = AnytimeLoss(model.num_exits)
    with pytest.raises(ValueError, match="got one tensor .* set_output_exit\\(None\\)"):
        criterion(model(torch.randn(2, 3, 16, 16)), torch.tensor([0, 1]))
