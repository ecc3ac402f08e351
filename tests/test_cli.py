import json
import re
import subprocess
import sys

from pipeline.anytime.weights import static_weights


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True,
                          text=True, timeout=300)


def test_describe_json_matches_the_model():
    proc = cli("describe", "--model", "resnet_ann_cifar20", "--scheme", "sieve",
               "--image-size", "32", "--num-classes", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    exits = info["exits"]
    assert len(exits) == 9
    assert [e["weight"] for e in exits] == static_weights("sieve", 9)
    assert exits[0]["position"] == "stage1.unit1" and exits[-1]["position"] == "stage3.unit3"
    assert exits[-1]["params"] == info["total_params"]
    assert all(a["macs"] < b["macs"] for a, b in zip(exits, exits[1:]))
    assert all(e["flops"] == 2 * e["macs"] for e in exits)


def test_describe_table_from_config():
    proc = cli("describe", "--config", "configs/demo_fmnist_resnet_ann.yaml")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "28x28" in lines[0] and "sieve" in lines[0]
    assert lines[1].split()[:3] == ["exit", "position", "MMACs"]
    assert len(lines) == 3 + 9  # title, header, rule, one row per exit


def test_describe_errors_are_one_line():
    for args, words in [(["--model", "resnet_ann_cifar21"], "resnet_ann_cifar"),
                        (["--model", "resnet_ann_cifar20", "--scheme", "seive"], "sieve"),
                        (["--model", "resnet18"], "not an anytime network"),
                        (["--model", "resnet_ann_cifar", "model.kwargs={depth: 21}"], "6n+2")]:
        proc = cli("describe", *args)
        assert proc.returncode == 2, proc.stderr
        assert words in proc.stderr and "Traceback" not in proc.stderr


def test_prepare_digits_cli(tmp_path):
    proc = cli("prepare", "digits", "--out", str(tmp_path / "digits"))
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.splitlines()[-1])
    assert summary["counts"]["train"] + summary["counts"]["val"] == 1797
    assert len(list((tmp_path / "digits" / "val").glob("*/*.JPEG"))) == summary["counts"]["val"]


def test_bench_train_compares_full_and_bare_steps(fmnist):
    proc = cli("bench", "train", "--config", "configs/demo_fmnist_resnet_ann.yaml",
               f"data.root={fmnist}", "data.batch_size=32", "--steps", "4", "--warmup", "2")
    assert proc.returncode == 0, proc.stderr
    line = proc.stdout.strip().splitlines()[-1]
    rates = re.findall(r"(\d+) images/s", line)
    ratio = float(line.rsplit("ratio ", 1)[1])
    assert len(rates) == 2 and all(int(r) > 0 for r in rates)
    # The printed rates are rounded to whole images/s and the ratio to 2 decimals.
    full, bare = (int(r) for r in rates)
    assert (full - 0.5) / (bare + 0.5) - 0.005 <= ratio <= (full + 0.5) / (bare - 0.5) + 0.005

