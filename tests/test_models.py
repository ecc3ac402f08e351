import io

import pytest
import timm
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.flop_counter import FlopCounterMode

import pipeline.models  # noqa: F401
from pipeline.models import AnytimeNet, exit_costs


def test_registered_with_timm():
    names = timm.list_models("resnet_ann_cifar*")
    assert {"resnet_ann_cifar", "resnet_ann_cifar20", "resnet_ann_cifar110"} <= set(names)


@pytest.mark.parametrize("depth, exit_every, exits", [(20, 1, 9), (32, 1, 15), (20, 2, 5),
                                                       (56, 3, 9)])
def test_exit_layout(depth, exit_every, exits):
    model = timm.create_model("resnet_ann_cifar", depth=depth, exit_every=exit_every,
                              num_classes=7)
    assert isinstance(model, AnytimeNet)
    assert model.num_exits == exits == len(model.exit_positions)
    assert model.exit_positions[-1] == f"stage3.unit{(depth - 2) // 6}"  # last unit has an exit
    out = model(torch.randn(2, 3, 32, 32))
    assert len(out) == exits and all(o.shape == (2, 7) for o in out)


@pytest.mark.parametrize("name, size", [("resnet_ann_cifar20", 28), ("resnet34_ann", 64),
                                        ("msdnet26", 64), ("msdnet_cifar", 32)])
def test_protocol_until_matches_full_forward_and_costs_grow(name, size):
    """The AnytimeNet protocol, for every model family."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    assert isinstance(model, AnytimeNet)
    assert len(model.exit_positions) == len(model.exits) == model.num_exits
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        full = model(x)
        for k in range(1, model.num_exits + 1):
            part = model(x, until=k)
            assert len(part) == k
            for a, b in zip(part, full):
                torch.testing.assert_close(a, b)
    for bad in (0, model.num_exits + 1):
        with pytest.raises(ValueError, match=f"until={bad}"):
            model(x, until=bad)
    costs = exit_costs(model, (3, size, size))
    macs = [c.macs for c in costs]
    assert all(a < b for a, b in zip(macs, macs[1:]))
    assert costs[-1].params == sum(p.numel() for p in model.parameters())
    # exit_costs reads every exit off one forward; each equals a forward that stops there.
    assert [(c.macs, c.params) for c in costs] == costs_until_each_exit(model, (3, size, size))


class HeadsLastToFirst(torch.nn.Module):
    """Not anytime: its forward runs the last exit's head first."""

    num_exits, exit_positions = 2, ["a", "b"]

    def __init__(self):
        super().__init__()
        self.exits = torch.nn.ModuleList([torch.nn.Linear(4, 2), torch.nn.Linear(4, 2)])

    def forward(self, x, until=None):
        x = x.flatten(1)
        last = self.exits[1](x)
        return [self.exits[0](x), last]


def test_exit_costs_refuse_heads_that_run_out_of_order():
    with pytest.raises(ValueError, match="exit 2's where exit 1's was due"):
        exit_costs(HeadsLastToFirst(), (1, 2, 2))


def costs_until_each_exit(model, input_size):
    """(multiply-adds, parameters) of `model(x, until=k)` for each k, counted separately."""
    x = torch.zeros(1, *input_size)
    ran = set()
    hooks = [m.register_forward_pre_hook(lambda m, _: ran.add(m)) for m in model.modules()]
    counts = []
    for k in range(1, model.num_exits + 1):
        ran.clear()
        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            model(x, until=k)
        counts.append((counter.get_total_flops() // 2,
                       sum(p.numel() for m in ran for p in m.parameters(recurse=False))))
    for h in hooks:
        h.remove()
    return counts


def test_exit_costs_grow_and_match_a_hand_count():
    model = timm.create_model("resnet_ann_cifar20", num_classes=10, width=16)
    costs = exit_costs(model, (3, 32, 32))
    macs = [c.macs for c in costs]
    assert macs == sorted(macs) and len(set(macs)) == len(macs)
    # Hand count at 32x32: stem 3x3x3x16 per pixel, each stage-1 conv 3x3x16x16 per pixel,
    # first exit's head a 16x10 linear layer.
    stem = 32 * 32 * 27 * 16
    unit1 = 2 * 32 * 32 * 9 * 16 * 16
    assert costs[0].macs == stem + unit1 + 16 * 10
    assert costs[1].macs == stem + 2 * unit1 + 2 * 160
    assert costs[1].macs_own_head == costs[1].macs - 160
    assert costs[-1].params == sum(p.numel() for p in model.parameters())
    assert costs[-1].flops == 2 * costs[-1].macs


def test_every_exit_gets_gradients_and_bf16_channels_last_work():
    model = timm.create_model("resnet_ann_cifar20", num_classes=10)
    model = model.to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 28, 28).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    sum(o.float().mean() for o in out).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_state_dict_round_trip_weights_only():
    model = timm.create_model("resnet_ann_cifar20", num_classes=10).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    other = timm.create_model("resnet_ann_cifar20", num_classes=10).eval()
    other.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 3, 28, 28)
    torch.testing.assert_close(model(x)[-1], other(x)[-1])


def test_bad_depth_is_explained():
    with pytest.raises(ValueError, match="6n\\+2"):
        timm.create_model("resnet_ann_cifar", depth=21)


@pytest.mark.parametrize("name", ["resnet_ann_cifar20", "resnet18_ann", "msdnet_cifar"])
def test_every_parameter_gets_a_gradient_under_ddp(tmp_path, name):
    # DDP's default (find_unused_parameters=False) fails on the next step when a parameter got no
    # gradient; a one-process gloo group runs the same reducer checks.
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        model = timm.create_model(name, num_classes=5)
        ddp = DistributedDataParallel(model)
        for _ in range(2):
            sum(o.logsumexp(1).mean() for o in ddp(torch.randn(2, 3, 32, 32))).backward()
    finally:
        dist.destroy_process_group()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
