import io
import json

import pytest
import timm
import torch
from conftest import in_process
from torch import nn

import pipeline.models  # noqa: F401
from pipeline.models import AnytimeNet, exit_costs

# SPEC section 4: cumulative multiply-adds (M) per exit at 224x224 and parameters (M), as counted
# by MSDNet's own counter (conv and linear multiply-adds, plus ReLU, pooling and linear biases).
REFERENCE = {
    "msdnet26": ([339.9, 685.5, 1008.2, 1254.5, 1360.5], 23.96),
    "msdnet36": ([514.7, 1171.2, 1844.5, 2501.4, 2742.1], 56.53),
    "msdnet41": ([615.7, 1436.4, 2283.2, 2967.4, 3253.8], 62.31),
}


def small_cifar() -> nn.Module:
    """2 exits over 3 layers: the CIFAR layout (stem, 3 scales, pruning, transitions) in little,
    for what is slow per layer (torch.compile)."""
    return timm.create_model("msdnet_cifar", num_classes=10, blocks=2, base=2, step=1)


def elementwise_ops(model: nn.Module, size: int) -> list[int]:
    """What MSDNet's counter adds to conv+linear multiply-adds, cumulative at each exit:
    one op per ReLU output, kernel-area ops per pooling output, one per linear bias."""
    total, at_exit = [0], []

    def relu(m, inputs, out):
        total[0] += out[0].numel()

    def pool(m, inputs, out):
        k = m.kernel_size if isinstance(m, nn.MaxPool2d) else inputs[0].shape[-1]  # global
        total[0] += out[0].numel() * k * k

    def linear(m, inputs, out):
        total[0] += m.out_features
        at_exit.append(total[0])

    hooks = {nn.ReLU: relu, nn.MaxPool2d: pool, nn.AdaptiveAvgPool2d: pool, nn.Linear: linear}
    handles = [m.register_forward_hook(hooks[type(m)]) for m in model.modules() if type(m) in hooks]
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size, device="meta"))
    for h in handles:
        h.remove()
    return at_exit


@pytest.mark.parametrize("name", list(REFERENCE))
def test_params_and_exit_macs_match_the_reference_table(name):
    reference_macs, reference_params = REFERENCE[name]
    with torch.device("meta"):  # shapes are all a count needs: no memory, no arithmetic
        model = timm.create_model(name, num_classes=1000)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert params == pytest.approx(reference_params, rel=0.01)
    costs = exit_costs(model, (3, 224, 224))
    macs = [c.macs / 1e6 for c in costs]
    assert macs == pytest.approx(reference_macs, rel=0.03)
    assert all(a < b for a, b in zip(macs, macs[1:]))
    # Stronger, structural: counted the reference's way, every exit agrees to the table's rounding.
    full = [(c.macs + e) / 1e6 for c, e in zip(costs, elementwise_ops(model, 224))]
    assert full == pytest.approx(reference_macs, abs=0.06)


def test_registered_with_timm_and_output_shapes():
    assert {"msdnet26", "msdnet36", "msdnet41", "msdnet_cifar"} <= set(timm.list_models("msdnet*"))
    model = timm.create_model("msdnet26", num_classes=1000)
    assert isinstance(model, AnytimeNet)
    assert model.num_exits == 5 == len(model.exits)
    assert model.exit_positions == [f"block{i}" for i in range(1, 6)]
    out = model.eval()(torch.randn(2, 3, 64, 64))  # global pooling: any size from 32 up
    assert len(out) == 5 and all(o.shape == (2, 1000) for o in out)
    cifar = timm.create_model("msdnet_cifar", num_classes=100)
    out = cifar(torch.randn(2, 3, 32, 32))
    assert cifar.num_exits == 7 and all(o.shape == (2, 100) for o in out)


def test_stopping_early_computes_less():
    with torch.device("meta"):
        model = timm.create_model("msdnet_cifar", num_classes=10)
    costs = exit_costs(model, (3, 32, 32))
    assert len(costs) == 7
    for earlier, later in zip(costs, costs[1:]):
        assert earlier.macs < later.macs and earlier.params < later.params


@pytest.mark.parametrize("name, size", [("msdnet26", 64), ("msdnet_cifar", 32)])
def test_every_parameter_gets_a_gradient(name, size):
    model = timm.create_model(name, num_classes=10)
    x, y = torch.randn(2, 3, size, size), torch.tensor([1, 7])
    sum(nn.functional.cross_entropy(o, y) for o in model(x)).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing  # DDP's default settings would fail on these


def test_channels_last_and_bf16_autocast():
    # 96, not 64: at 64 the heads' second conv sees a 1x1 map, and this torch build's oneDNN bf16
    # weight gradient for a 3x3/2 conv on a 1x1 input has garbage (at times inf) in the padding
    # taps. At 224 (and 96) that conv sees 2x2.
    model = timm.create_model("msdnet26", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 96, 96).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert all(o.dtype == torch.bfloat16 for o in out)
    sum(o.float().mean() for o in out).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.slow
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = small_cifar().eval()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: no silent graph breaks
    with torch.no_grad():
        for a, b in zip(compiled(x), model(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_state_dict_round_trip_weights_only():
    model = small_cifar().eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = small_cifar().eval()
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x)[-1], other(x)[-1])


def test_describe_cli_gives_the_reference_costs(capsys):
    code, out, err = in_process(capsys, "describe", "--model", "msdnet26", "--json")
    assert code == 0, err
    table = json.loads(out)
    macs = [row["macs"] / 1e6 for row in table["exits"]]
    assert macs == pytest.approx(REFERENCE["msdnet26"][0], rel=0.03)
    assert table["total_params"] / 1e6 == pytest.approx(REFERENCE["msdnet26"][1], rel=0.01)


def test_bad_arguments_are_explained():
    with pytest.raises(RuntimeError, match="No pretrained weights exist for msdnet26"):
        timm.create_model("msdnet26", pretrained=True)  # timm's own error: no url, no download
    with pytest.raises(TypeError, match="depth"):
        timm.create_model("msdnet_cifar", depth=3)
    with pytest.raises(ValueError, match="scales at the end"):  # finer scales would feed nothing
        timm.create_model("msdnet_cifar", blocks=2, base=1, step=1)
    with pytest.raises(ValueError, match="stepmode"):
        timm.create_model("msdnet_cifar", stepmode="odd")
