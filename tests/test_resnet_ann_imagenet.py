"""ImageNet-style ResNet-ANNs (timm's ResNet with exits) and their single-exit OPT twins."""

import io
import json

import pytest
import timm
import torch
from conftest import in_process
from torch.utils.flop_counter import FlopCounterMode

import pipeline.models  # noqa: F401
from pipeline.models import AnytimeNet, exit_costs
from pipeline.models.resnet_ann import IMAGENET_LAYOUTS

DEPTHS = sorted(IMAGENET_LAYOUTS)


def timm_macs(model: torch.nn.Module, size: int) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() // 2


def test_registered_with_timm():
    names = set(timm.list_models("resnet*_ann") + timm.list_models("resnet*_opt"))
    assert {f"resnet{d}_{kind}" for d in DEPTHS for kind in ("ann", "opt")} <= names


# Blocks per depth: 8, 16, 16, 33, 50; one exit every s blocks counted back from the last block.
@pytest.mark.parametrize("depth, exits, first, second", [
    (18, 4, "layer1.block2", "layer2.block2"),
    (34, 8, "layer1.block2", "layer2.block1"),
    (50, 8, "layer1.block2", "layer2.block1"),
    (101, 11, "layer1.block3", "layer2.block3"),
    (152, 10, "layer2.block2", "layer2.block7"),
])
def test_reference_exit_layout(depth, exits, first, second):
    model = timm.create_model(f"resnet{depth}_ann", num_classes=10)
    assert isinstance(model, AnytimeNet)
    assert model.num_exits == exits == len(model.exit_positions) == len(model.exits)
    _, layers, _ = IMAGENET_LAYOUTS[depth]
    assert model.exit_positions[:2] == [first, second]
    assert model.exit_positions[-1] == f"layer4.block{layers[-1]}"
    opt = timm.create_model(f"resnet{depth}_opt", num_classes=10)
    assert opt.num_exits == 1 and opt.exit_positions == model.exit_positions[-1:]


def test_exit_every_is_configurable_and_checked():
    model = timm.create_model("resnet101_ann", exit_every=2)
    assert model.num_exits == 17 and model.exit_positions[-1] == "layer4.block3"
    assert timm.create_model("resnet50_ann", exit_every=1).num_exits == 16
    with pytest.raises(ValueError, match="exit_every"):
        timm.create_model("resnet50_ann", exit_every=0)
    with pytest.raises(TypeError, match="single exit"):
        timm.create_model("resnet50_opt", exit_every=2)
    with pytest.raises(RuntimeError, match="No pretrained weights exist for resnet50_ann"):
        timm.create_model("resnet50_ann", pretrained=True)


def test_timm_resnet_options_pass_through():
    model = timm.create_model("resnet50_ann", num_classes=10, stem_type="deep", stem_width=32,
                              avg_down=True, drop_path_rate=0.1, drop_rate=0.2)
    ref = timm.create_model("resnet50d", num_classes=10)
    heads = sum(p.numel() for m in model.exits[:-1] for p in m.parameters())
    assert sum(p.numel() for p in model.parameters()) - heads == sum(
        p.numel() for p in ref.parameters())
    assert model.exits[0].drop.p == 0.2


@pytest.mark.parametrize("depth", DEPTHS)
def test_opt_is_timm_resnet(depth):
    opt = timm.create_model(f"resnet{depth}_opt", num_classes=1000)
    ref = timm.create_model(f"resnet{depth}", num_classes=1000)
    assert sum(p.numel() for p in opt.parameters()) == sum(p.numel() for p in ref.parameters())
    size = 112  # both at the same size; 112 keeps it quick (224 in test_resnet50_costs_at_224)
    assert exit_costs(opt, (3, size, size))[-1].macs == timm_macs(ref, size)


def test_resnet50_costs_at_224():
    costs = exit_costs(timm.create_model("resnet50_opt"), (3, 224, 224))
    assert costs[-1].macs == pytest.approx(4.09e9, rel=0.01)
    assert costs[-1].params == 25_557_032


def test_channels_last_bf16_forward_backward():
    model = timm.create_model("resnet18_ann", num_classes=10).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert [o.dtype for o in out] == [torch.bfloat16] * model.num_exits
    sum(o.float().logsumexp(1).mean() for o in out).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.slow
def test_torch_compile_matches_eager():
    # Inductor on the CPU costs ~25 s cold (C++ toolchain), so it compiles the smallest model that
    # runs the shared ResNetANN forward; the ImageNet model is traced whole (fullgraph, forward and
    # backward) through AOTAutograd, which is what inductor consumes on a GPU too.
    torch.manual_seed(0)
    tiny = timm.create_model("resnet_ann_cifar", depth=8, width=8, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(torch.compile(tiny, fullgraph=True)(x), tiny(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    model = timm.create_model("resnet18_ann", num_classes=10)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        out = fn(x)
        sum(o.logsumexp(1).mean() for o in out).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_checkpoint_round_trip_weights_only():
    torch.manual_seed(0)
    model = timm.create_model("resnet18_ann", num_classes=10)
    model(torch.randn(4, 3, 32, 32))  # move the BN running statistics off their defaults
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = timm.create_model("resnet18_ann", num_classes=10)
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(model.eval()(x), other.eval()(x)):
            torch.testing.assert_close(a, b)


def test_describe_json(capsys):
    code, out, err = in_process(capsys, "describe", "--model", "resnet50_ann", "--json")
    assert code == 0, err
    table = json.loads(out)
    assert table["image_size"] == 224 and table["num_classes"] == 1000
    assert [e["position"] for e in table["exits"]][-1] == "layer4.block3"
    assert len(table["exits"]) == 8
    macs = [e["macs"] for e in table["exits"]]
    assert all(a < b for a, b in zip(macs, macs[1:]))
    # The 8 heads add 2048..256 x 1000 linear layers on top of timm's 25.56M.
    assert table["total_params"] == pytest.approx(31.96e6, rel=1e-3)
