import json
import re
import subprocess
import sys

import pytest
import timm
from conftest import in_process

from pipeline.anytime.weights import static_weights
from pipeline.models import exit_costs
from pipeline.train.bench import train_flops_per_image


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, timeout=300)


def test_describe_json_matches_the_model(capsys):
    code, out, err = in_process(capsys, "describe", "--model", "resnet_ann_cifar20", "--scheme",
                                "sieve", "--image-size", "32", "--num-classes", "10", "--json")
    assert code == 0, err
    info = json.loads(out)
    exits = info["exits"]
    assert len(exits) == 9
    assert [e["weight"] for e in exits] == static_weights("sieve", 9)
    assert exits[0]["position"] == "stage1.unit1" and exits[-1]["position"] == "stage3.unit3"
    assert exits[-1]["params"] == info["total_params"]
    assert all(a["macs"] < b["macs"] for a, b in zip(exits, exits[1:]))
    assert all(e["flops"] == 2 * e["macs"] for e in exits)


def test_describe_takes_input_size_and_classes_from_the_model(capsys):
    # No --image-size, --num-classes or config: the model's own (timm's pretrained cfg), here a
    # CIFAR model's 32x32 and 10 classes. (The ImageNet models' 224 and 1000: test_msdnet.py,
    # test_resnet_ann_imagenet.py; every model's data defaults: test_config.py.)
    code, out, err = in_process(capsys, "describe", "--model", "msdnet_cifar", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert (info["image_size"], info["num_classes"], len(info["exits"])) == (32, 10, 7)
    code, out, err = in_process(capsys, "describe", "--model", "resnet_ann_cifar20")
    assert code == 0, err
    assert out.startswith("resnet_ann_cifar20 at 32x32, 10 classes, sieve weights.")


def test_describe_prints_every_anytime_model(capsys):
    names = timm.list_models("*_ann*") + timm.list_models("*_opt") + timm.list_models("msdnet*")
    assert {"msdnet26", "msdnet_cifar", "resnet50_opt", "resnet_ann_cifar110"} <= set(names)
    for name in names:
        code, out, err = in_process(capsys, "describe", "--model", name, "--json")
        assert code == 0, err
        info = json.loads(out)
        cfg = timm.models.get_pretrained_cfg(name)
        assert (info["image_size"], info["num_classes"]) == (cfg.input_size[-1], cfg.num_classes)
        assert len(info["exits"]) == len(cfg.classifier), name  # one row per exit head
        assert all(a["macs"] < b["macs"] for a, b in zip(info["exits"], info["exits"][1:]))


def test_describe_table_from_config(capsys):
    code, out, err = in_process(capsys, "describe", "--config",
                                "configs/demo_fmnist_resnet_ann.yaml")
    assert code == 0, err
    lines = out.splitlines()
    assert "28x28" in lines[0] and "sieve" in lines[0]
    assert lines[1].split()[:3] == ["exit", "position", "MMACs"]
    assert len(lines) == 3 + 9  # title, header, rule, one row per exit


def test_describe_errors_are_one_line(capsys):
    for args, words in [(["--model", "resnet_ann_cifar21"], "resnet_ann_cifar"),
                        (["--model", "resnet_ann_cifar20", "--scheme", "seive"], "sieve"),
                        (["--model", "resnet18"], "not an anytime network"),
                        (["--model", "resnet_ann_cifar20.x"], "no pretrained tag 'x'"),
                        (["--model", "resnet_ann_cifar", "model.kwargs={depth: 21}"], "6n+2")]:
        code, _, err = in_process(capsys, "describe", *args)
        assert code == 2 and words in err, err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_prepare_digits_cli(tmp_path):
    proc = cli("prepare", "digits", "--out", str(tmp_path / "digits"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["counts"]["train"] + summary["counts"]["val"] == 1797
    assert len(list((tmp_path / "digits" / "val").glob("*/*.JPEG"))) == summary["counts"]["val"]


@pytest.mark.slow
def test_bench_train_compares_full_and_bare_steps(fmnist, tmp_path):
    proc = cli("bench", "train", "--config", "configs/demo_fmnist_resnet_ann.yaml",
               f"data.root={fmnist}", "data.batch_size=32", "--steps", "4", "--warmup", "2",
               "--peak-tflops", "2", "--profile", str(tmp_path / "profile"))
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"MFU [\d.]+% \(bare [\d.]+%\) of 2 TFLOP/s", proc.stdout), proc.stdout
    assert "loader wait" in proc.stdout
    trace = json.loads((tmp_path / "profile" / "trace.json").read_text())
    marks = {e.get("name") for e in trace["traceEvents"]}
    assert {"loader_wait", "train_step"} <= marks
    assert "aten::convolution_backward" in (tmp_path / "profile" / "ops.txt").read_text()
    line = proc.stdout.strip().splitlines()[-1]
    rates = re.findall(r"(\d+) images/s", line)
    ratio = float(line.rsplit("ratio ", 1)[1])
    assert len(rates) == 2 and all(int(r) > 0 for r in rates)
    # The printed rates are rounded to whole images/s and the ratio to 2 decimals.
    full, bare = (int(r) for r in rates)
    assert (full - 0.5) / (bare + 0.5) - 0.005 <= ratio <= (full + 0.5) / (bare - 0.5) + 0.005



def test_bench_train_counts_forward_and_backward_flops():
    model = timm.create_model("resnet_ann_cifar20", num_classes=10).train()
    forward = exit_costs(model, (3, 28, 28))[-1].flops
    # Backward is two convolutions' worth per convolution (input and weight gradients), except
    # the stem's input gradient, which is never needed.
    assert 2.9 * forward < train_flops_per_image(model, (3, 28, 28)) < 3.0 * forward


@pytest.mark.slow
def test_bench_train_json_reports_mfu_against_the_given_peak(fmnist):
    proc = cli("bench", "train", "--config", "configs/demo_fmnist_resnet_ann.yaml",
               f"data.root={fmnist}", "data.batch_size=32", "--steps", "2", "--warmup", "1",
               "--peak-tflops", "0.5", "--json")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout)
    assert r["full_tflops"] == pytest.approx(r["full_images_per_s"] * r["train_gflops_per_image"]
                                             / 1e3)
    assert r["full_mfu"] == pytest.approx(r["full_tflops"] / 0.5)
    assert 0 <= r["loader_wait_fraction"] < 1


@pytest.mark.parametrize("args, words", [
    (["train", "--config", "configs/demo_fmnist_resnet_ann.yaml", "--peak-tflops", "0"],
     "--peak-tflops: 0 is not a positive number"),
    (["loader", "--backend", "torch", "--data", "data", "--batches", "-1"],
     "--batches: -1 is not a positive number"),
    (["loader", "--backend", "decode", "--data", "data", "--workers", "-1"],
     "--workers: -1 is below 0"),
    (["train", "--config", "configs/demo_fmnist_resnet_ann.yaml", "--warmup", "-1"],
     "--warmup: -1 is below 0"),
])
def test_bench_rejects_non_positive_counts_in_one_line(args, words):
    proc = cli("bench", *args)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
