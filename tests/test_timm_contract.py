"""timm's own utilities on every registered anytime model: what a timm user expects of a model
that `timm.create_model` returns, with the multi-exit meanings of docs/models.md.

Small inputs keep it quick: the CIFAR models at 32x32, the ImageNet ones at 64x64 (the smallest
size every family runs at), 10 classes. The deepest models are marked slow.
"""

import pytest
import timm
import torch
from safetensors.torch import save_file
from timm.data import IMAGENET_DEFAULT_MEAN, resolve_model_data_config
from timm.layers import DropPath, get_notrace_functions, get_notrace_modules
from timm.models import load_checkpoint
from timm.utils import ModelEmaV3
from torch import nn
from torchvision.models.feature_extraction import NodePathTracer

import pipeline.models  # noqa: F401  (registers the models)
from pipeline.anytime.metrics import ExitErrors
from pipeline.models.anytime import CIFAR10_MEAN

FAST = ["resnet_ann_cifar", "resnet_ann_cifar20", "resnet_ann_cifar32", "resnet18_ann",
        "resnet18_opt", "resnet34_ann", "resnet34_opt", "resnet50_ann", "resnet50_opt",
        "msdnet26", "msdnet_cifar"]
SLOW = ["resnet_ann_cifar56", "resnet_ann_cifar110", "resnet101_ann", "resnet101_opt",
        "resnet152_ann", "resnet152_opt", "msdnet36", "msdnet41"]
ALL = [*FAST, *(pytest.param(name, marks=pytest.mark.slow) for name in SLOW)]

# What timm's train.py passes to create_model with its default arguments (None values are
# dropped by create_model itself), plus a drop path rate so that stochastic depth is exercised.
TRAIN_PY_KWARGS = dict(pretrained=False, in_chans=3, num_classes=10, drop_rate=0.0,
                       drop_path_rate=0.1, drop_block_rate=None, global_pool=None,
                       bn_momentum=None, bn_eps=None, scriptable=None, checkpoint_path="")


def test_every_registered_anytime_model_is_covered():
    registered = set(timm.list_models("resnet*_ann") + timm.list_models("resnet*_opt")
                     + timm.list_models("resnet_ann_cifar*") + timm.list_models("msdnet*"))
    assert registered == {*FAST, *SLOW}


def image(name: str, batch: int = 2) -> torch.Tensor:
    size = 32 if "cifar" in name else 64
    return torch.randn(batch, 3, size, size)


@pytest.mark.parametrize("name", ALL)
def test_create_model_as_train_py_does_and_train_a_step(name):
    torch.manual_seed(0)
    model = timm.create_model(name, **TRAIN_PY_KWARGS)
    config = resolve_model_data_config(model)
    if "cifar" in name:
        assert config["input_size"] == (3, 32, 32) and config["mean"] == CIFAR10_MEAN
        assert config["crop_pct"] == 1.0
    else:
        assert config["input_size"] == (3, 224, 224) and config["mean"] == IMAGENET_DEFAULT_MEAN
        assert config["crop_pct"] == 0.875 and config["interpolation"] == "bilinear"
    assert model.pretrained_cfg["classifier"] == model.get_classifier(name_only=True)
    drop_paths = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert drop_paths and max(drop_paths) == pytest.approx(0.1)  # stochastic depth is on

    model = model.to(memory_format=torch.channels_last).train()
    x = image(name).to(memory_format=torch.channels_last)
    out = model(x)
    assert len(out) == model.num_exits and all(o.shape == (2, 10) for o in out)
    sum(nn.functional.cross_entropy(o, torch.tensor([1, 7])) for o in out).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing


@pytest.mark.parametrize("name", ["resnet_ann_cifar20", "resnet18_ann", "msdnet_cifar"])
def test_drop_rate_and_global_pool_reach_every_exit(name):
    model = timm.create_model(name, num_classes=10, drop_rate=0.3, drop_path_rate=0.1,
                              global_pool="avgmax")
    dropouts = [m.p for m in model.exits.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.3] * model.num_exits
    pools = [m.pool_type for m in model.exits.modules() if hasattr(m, "pool_type")]
    assert pools == ["avgmax"] * model.num_exits
    assert all(o.shape == (2, 10) for o in model.eval()(image(name)))


@pytest.mark.parametrize("name", ALL)
def test_fx_features_heads_and_classifiers(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = image(name, batch=1)
    with torch.no_grad():
        out = model(x)
        traced = torch.fx.symbolic_trace(model)  # the default until=None: every exit
        assert all(torch.equal(a, b) for a, b in zip(traced(x), out))

        features = model.forward_features(x)
        assert features.shape[1] == model.num_features
        torch.testing.assert_close(model.forward_head(features), out[-1], rtol=0, atol=0)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (1, model.head_hidden_size)
        for k in {1, model.num_exits // 2 + 1}:  # a head for any exit, on that exit's input
            exit_input = model.forward_features(x, exit_index=k)
            torch.testing.assert_close(model.forward_head(exit_input, exit_index=k), out[k - 1],
                                       rtol=0, atol=0)

        classifiers = model.get_classifier()
        assert len(classifiers) == model.num_exits
        assert all(isinstance(fc, nn.Linear) and fc.out_features == 10 for fc in classifiers)
        model.reset_classifier(5)
        assert model.num_classes == 5 and all(o.shape == (1, 5) for o in model(x))
        model.reset_classifier(0)  # no classifier: every exit gives its pooled features
        assert model(x)[-1].shape == (1, model.head_hidden_size)


@pytest.mark.parametrize("name", ALL)
def test_features_only_gives_stage_outputs(name):
    model = timm.create_model(name, features_only=True)
    info = model.feature_info
    maps = model(image(name, batch=1))
    size = 32 if "cifar" in name else 64
    assert [m.shape[1] for m in maps] == info.channels()
    assert [size // m.shape[-1] for m in maps] == info.reduction()
    assert info.reduction() == sorted(info.reduction())
    # A backbone: no exit head is left, so detection code trains no unused parameter.
    assert not any(n.startswith("model.exits") for n, _ in model.named_parameters())

    last_two = timm.create_model(name, features_only=True, out_indices=(-2, -1))
    assert [m.shape for m in last_two(image(name, batch=1))] == [m.shape for m in maps[-2:]]


@pytest.mark.parametrize("name", ["resnet_ann_cifar20", "resnet18_ann", "msdnet_cifar"])
def test_grad_checkpointing_recomputes_in_backward(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    unit = model.units[1] if hasattr(model, "units") else model.blocks[0][1]
    calls = []  # pre-hooks: the recomputation stops early, before a forward hook would run
    unit.register_forward_pre_hook(lambda *_: calls.append(1))
    x = image(name)
    grads = []
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        model.zero_grad()
        calls.clear()
        sum(o.logsumexp(1).mean() for o in model(x)).backward()
        assert len(calls) == (2 if enable else 1)  # forward, then again in the backward pass
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet_ann_cifar20", "resnet18_ann", "msdnet_cifar"])
def test_load_checkpoint_pth_and_safetensors(tmp_path, name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10)
    model(image(name))  # move BN statistics off their defaults
    model.eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "model.pth")
    save_file(state, tmp_path / "model.safetensors")
    x = image(name)
    with torch.no_grad():
        expected = model(x)
        for path in (tmp_path / "model.pth", tmp_path / "model.safetensors"):
            torch.manual_seed(1)
            other = timm.create_model(name, num_classes=10)
            load_checkpoint(other, str(path))
            assert all(torch.equal(a, b) for a, b in zip(other.eval()(x), expected))
            created = timm.create_model(name, num_classes=10, checkpoint_path=str(path)).eval()
            assert all(torch.equal(a, b) for a, b in zip(created(x), expected))

        # Fine-tuning: the checkpoint as "pretrained" weights for 3 classes; the cfg's classifier
        # names every exit's linear layer, which timm then leaves freshly initialised.
        tuned = timm.create_model(name, pretrained=True, num_classes=3,
                                  pretrained_cfg_overlay=dict(file=str(path))).eval()
        features = model.forward_features(x)
        torch.testing.assert_close(tuned.forward_features(x), features, rtol=0, atol=0)
        assert all(o.shape == (2, 3) for o in tuned(x))


@pytest.mark.parametrize("name", ["resnet_ann_cifar20", "msdnet_cifar"])
def test_model_ema_v3(name):
    model = timm.create_model(name, num_classes=10)
    ema = ModelEmaV3(model, decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sum(o.logsumexp(1).mean() for o in model(image(name))).backward()
    optimizer.step()
    ema.update(model, step=10)  # past any warm-up: decay 0.5, the mean of old and new weights
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    for (n, p), e in zip(model.named_parameters(), ema.module.parameters()):
        torch.testing.assert_close(e, 0.5 * (before[n] + p.detach()), msg=n)
    with torch.no_grad():
        assert len(ema.module(image(name))) == model.num_exits


def small_msdnet() -> nn.Module:
    return timm.create_model("msdnet_cifar", num_classes=10, blocks=2, base=2, step=1)


@pytest.mark.parametrize("make", [lambda: timm.create_model("resnet_ann_cifar20", num_classes=10),
                                  small_msdnet], ids=["resnet_ann_cifar20", "msdnet_cifar"])
def test_torch_compile_forward_and_backward(make):
    # aot_eager: AOTAutograd traces forward and backward whole (what inductor consumes), without
    # inductor's C++ compile, too slow for 2 CPU cores; tests/test_msdnet.py runs inductor.
    torch.manual_seed(0)
    model = make()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 3, 32, 32)
    grads = []
    for fn in (model, compiled):
        model.zero_grad()
        sum(o.logsumexp(1).mean() for o in fn(x)).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet_ann_cifar20", "resnet18_ann", "msdnet_cifar"])
def test_torch_export(name):
    model = timm.create_model(name, num_classes=10).eval()
    x = image(name)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        for a, b in zip(program.module()(x), model(x)):
            torch.testing.assert_close(a, b)


def test_torchvision_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = timm.create_model("resnet18_ann", num_classes=10).eval()
    extractor = create_feature_extractor(model, return_nodes={"units.7": "last",
                                                              "exits.0.fc": "exit1"})
    x = image("resnet18_ann")
    with torch.no_grad():
        got = extractor(x)
        torch.testing.assert_close(got["last"], model.forward_features(x), rtol=0, atol=0)
        torch.testing.assert_close(got["exit1"], model(x, until=1)[0], rtol=0, atol=0)


@pytest.mark.parametrize("name, size", [("msdnet_cifar", 32), pytest.param(
    "msdnet26", 224, marks=pytest.mark.slow)])
def test_msdnet_head_pool_equals_reference_at_training_size(name, size):
    models = {}
    for head_pool in ("global", "avg2x2"):
        torch.manual_seed(0)
        models[head_pool] = timm.create_model(name, num_classes=10, head_pool=head_pool).eval()
    x = torch.randn(1, 3, size, size)
    bigger = torch.randn(1, 3, size + size // 4, size + size // 4)  # 40 / 280: a 3x3 head map
    with torch.no_grad():
        for a, b in zip(models["global"](x), models["avg2x2"](x)):
            assert torch.equal(a, b)
        assert not torch.allclose(models["global"](bigger)[-1], models["avg2x2"](bigger)[-1])
    with pytest.raises(ValueError, match="head_pool"):
        timm.create_model(name, head_pool="avg3")


def exit_head_params(model: nn.Module, keep: int) -> set[str]:
    """Names of the parameters of every exit head but exit `keep`'s (1-based)."""
    return {n for n, _ in model.named_parameters()
            if n.startswith("exits.") and int(n.split(".")[1]) != keep - 1}


def fx_trace(model: nn.Module) -> torch.fx.GraphModule:
    """fx's trace with the tracer of timm's fx tests (its untraceable modules and functions
    kept whole), once: it bakes the model's training flag into the graph."""
    tracer = NodePathTracer(leaf_modules=get_notrace_modules(),
                            autowrap_functions=get_notrace_functions(), param_shapes_constant=True)
    return torch.fx.GraphModule(model, tracer.trace(model))


def assert_device_dtype(model: nn.Module, device: str, dtype: torch.dtype) -> None:
    placed = {(t.device.type, t.dtype) for t in [*model.parameters(), *model.buffers()]
              if t.is_floating_point()}
    assert placed == {(device, dtype)}


@pytest.mark.parametrize("name", ALL)
def test_timm_model_tests_on_the_single_tensor_view(name):
    """timm 1.0.30's tests/test_models.py checks, on the single-tensor view (`output_exit=-1`).

    Run here: test_model_default_cfgs (with the `device` / `dtype` keywords of its config test)
    on the meta device at the cfg's full input size, which costs no compute;
    test_model_forward, test_model_backward, test_model_forward_fx and test_model_backward_fx
    (fx with the tracer settings of timm's fx tests) at the small sizes of this file. Every
    name, none marked slow: about a second of CPU each.

    Not run on the list output (`output_exit=None`, the default): they take `model(x)` for one
    tensor (`.shape`, `.mean()`; they concatenate tuples, not lists). The list has its own
    tests above. Narrowed here: backward's "every parameter has a gradient" holds for what the
    chosen exit uses, the other exits' heads do not run (as inception's aux head when off);
    default_cfgs' "`reset_classifier(0, '')` gives the unpooled `pool_size` map" holds for
    ResNet-ANN only, as MSDNet's heads have convs before their pool (timm's
    EARLY_POOL_MODELS). Not applicable: TorchScript (unsupported, docs/models.md), pretrained
    inference and loading (no published weights).
    """
    # test_model_default_cfgs, and device / dtype reaching every parameter and buffer.
    model = timm.create_model(name, output_exit=-1, device="meta", dtype=torch.float64).eval()
    assert_device_dtype(model, "meta", torch.float64)
    assert model.num_classes > 0 and model.num_features > 0 and model.head_hidden_size > 0
    cfg, state_dict = model.default_cfg, model.state_dict()
    assert all(f"{c}.weight" in state_dict for c in cfg["classifier"])
    assert f"{cfg['first_conv']}.weight" in state_dict
    x = torch.randn(1, *cfg["input_size"], device="meta", dtype=torch.float64)
    features = model.forward_features(x)
    pre_logits = model.forward_head(features, pre_logits=True)
    assert features.shape[1:] == (model.num_features, *cfg["pool_size"])
    assert pre_logits.shape == (1, model.head_hidden_size)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model(x).shape == pre_logits.shape
    model.reset_classifier(5)  # the heads reset to Identity have no dtype left: the model's
    assert_device_dtype(model, "meta", torch.float64)
    if not name.startswith("msdnet"):
        model.reset_classifier(0, "")
        assert model(x).shape == features.shape
        unpooled = timm.create_model(name, output_exit=-1, num_classes=0, global_pool="",
                                     device="meta").eval()
        assert unpooled(x.float()).shape == features.shape

    # test_model_forward (eval), with grad checkpointing, and test_model_forward_fx.
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=42, output_exit=-1).eval()
    x = image(name, batch=1)
    outputs = model(x)
    assert outputs.shape == (1, 42) and not outputs.isnan().any()
    model.set_grad_checkpointing()
    torch.testing.assert_close(model(x), outputs, rtol=1e-4, atol=1e-5)
    model.set_grad_checkpointing(False)
    with torch.inference_mode():
        assert torch.equal(fx_trace(model)(x), outputs)

    # test_model_backward and test_model_backward_fx (train mode, batch 2 for BatchNorm).
    x = image(name)
    unused = exit_head_params(model, model.num_exits)
    for net in (model.train(), fx_trace(model)):
        model.zero_grad(set_to_none=True)
        outputs = net(x)
        outputs.mean().backward()
        assert outputs.shape == (2, 42) and not outputs.isnan().any()
        assert {n for n, p in model.named_parameters() if p.grad is None} == unused


@pytest.mark.parametrize("name", ["resnet_ann_cifar20", "msdnet_cifar"])
def test_output_exit_computes_only_that_exit_and_until_gives_the_list(name):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10).eval()
    x = image(name)
    ran = set()
    for n, m in model.named_modules():
        m.register_forward_pre_hook(lambda m, _, n=n: ran.add(n))
    with torch.no_grad():
        every = model(x)
        assert isinstance(every, list) and len(every) == model.num_exits
        ran.clear()
        model(x, until=2)
        up_to_exit_2 = set(ran)
        ran.clear()
        model.set_output_exit(2)
        torch.testing.assert_close(model(x), every[1], rtol=0, atol=0)
        # What until=2 runs, but exit 1's head.
        assert ran == {n for n in up_to_exit_2 if not n.startswith("exits.0")}
        for k in (1, model.num_exits):  # an explicit `until` gives the list, as without the view
            assert [o.shape for o in model(x, until=k)] == [o.shape for o in every[:k]]
        model.set_output_exit(None)
        assert isinstance(model(x), list)
    for bad in (0, model.num_exits + 1, -2):
        with pytest.raises(ValueError, match=f"output_exit={bad} is not an exit"):
            model.set_output_exit(bad)
    with pytest.raises(ValueError, match="output_exit"):
        timm.create_model(name, output_exit=-1, features_only=True)
    with pytest.raises(ValueError, match="single-tensor view"):  # evaluation needs the list
        ExitErrors(model.num_exits).update(every[-1], torch.tensor([1, 2]))


@pytest.mark.parametrize("make", [lambda: timm.create_model("resnet_ann_cifar20", num_classes=10),
                                  small_msdnet], ids=["resnet_ann_cifar20", "msdnet_cifar"])
def test_output_exit_traces_compiles_and_exports(make):
    torch.manual_seed(0)
    model = make().eval()
    model.set_output_exit(-1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        assert torch.equal(torch.fx.symbolic_trace(model)(x), expected)
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        torch.testing.assert_close(compiled(x), expected)
        torch.testing.assert_close(torch.export.export(model, (x,)).module()(x), expected)
