"""Run integrity, end to end through the real trainer and CLI, on a local folder and on the real
S3 server: corrupt newest checkpoints never wedge a resume, one writer per run, a resume checks
its config, a diverged run stops without saving, a signal while starting up still exits 75."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
import s3fs
import torch
from conftest import (
    assert_same_weights,
    handles,
    payload_path,
    unavailable,
    wait_for_checkpoint,
    wait_until,
)

from pipeline.__main__ import main
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.storage.checkpoints import MANIFEST, CheckpointStore
from pipeline.train.trainer import train

# 3 classes x 12 training images, batch 4: 9 steps an epoch, a checkpoint every 3 steps.
TINY = ["model.name=resnet_ann_cifar", "model.kwargs={depth: 8, width: 4}",
        "data.image_size=32", "data.augment=small", "data.batch_size=4", "data.workers=0",
        "train.epochs=2", "train.log_every=3", "checkpoint.every_steps=3",
        "checkpoint.retry_delay=0.1", "optim.lr=0.5", "loss.alternating=true",
        "checkpoint.async_save=false"]  # every save happens: none skipped while one is written


def tiny(data: Path, out: Path, *extra: str) -> list[str]:
    return [f"data.root={data}", f"out_dir={out}", "name=tiny", *TINY, *extra]


def cli_train(overrides: list[str], **popen) -> subprocess.Popen:
    """`python -m pipeline train` with the defaults plus `overrides`, as a running process."""
    empty = Path(__file__).parent / "empty_config.yaml"
    return subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--config", str(empty),
                             *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **popen)


def finish(proc: subprocess.Popen, timeout: int = 300) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def final_model(url: str, endpoint: str = "") -> dict[str, torch.Tensor]:
    store = CheckpointStore(url, endpoint_url=endpoint)
    info, state = store.load_latest_valid()
    assert info.step == 18
    return state["model"]


def sleep_until_the_lease_expires(fs, url: str) -> None:
    """A stated bound: a holder that no longer renews (killed, frozen) keeps its lease until
    `renewed + ttl` of the record it last wrote (`url`/lease.json), on this host's clock."""
    lease = json.loads(fs.cat_file(f"{url}/lease.json"))
    time.sleep(max(0.0, lease["renewed"] + lease["ttl"] - time.time()) + 0.2)


class Location:
    """A checkpoint location on the local disk or on the S3 server, with raw access to damage
    what is stored there."""

    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest):
        self.endpoint = ""
        if kind == "s3":
            self.endpoint = request.getfixturevalue("s3_server")
            self.url = f"{request.getfixturevalue('s3_bucket')}/tiny"
            self.fs = s3fs.S3FileSystem(endpoint_url=self.endpoint)
            self.root = self.url[len("s3://"):]
        else:
            self.url = str(tmp_path / "ckpt")
            self.fs, self.root = fsspec.filesystem("file"), self.url

    def overrides(self) -> list[str]:
        return [f"checkpoint.url={self.url}", f"checkpoint.endpoint_url={self.endpoint}"]

    def damage(self, step: int, how: str) -> None:
        folder = f"{self.root}/step-{step:08d}"
        if how == "flip_byte":
            path = payload_path(self.fs, folder)
            payload = self.fs.cat_file(path)
            i = len(payload) // 2
            self.fs.pipe_file(path, payload[:i] + bytes([payload[i] ^ 0x01]) + payload[i + 1:])
        elif how == "truncate":
            path = payload_path(self.fs, folder)
            payload = self.fs.cat_file(path)
            self.fs.pipe_file(path, payload[: len(payload) // 2])
        elif how == "manifest_not_json":
            self.fs.pipe_file(f"{folder}/{MANIFEST}", b"{not json")
        elif how == "manifest_without_step":
            manifest = json.loads(self.fs.cat_file(f"{folder}/{MANIFEST}"))
            del manifest["step"]
            self.fs.pipe_file(f"{folder}/{MANIFEST}", json.dumps(manifest).encode())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    """The reference: the tiny run trained start to end in one go."""
    from conftest import write_image_folder

    root = tmp_path_factory.mktemp("reference")
    data = write_image_folder(root / "data")
    train(load_config(None, tiny(data, root / "runs")))
    return final_model(str(root / "runs" / "tiny" / "checkpoints"))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_resume_past_corrupt_newest_checkpoints_ends_bitwise_equal(
        kind, image_folder, tmp_path, request, uninterrupted, caplog):
    where = Location(kind, tmp_path, request)
    run = tiny(image_folder, tmp_path / "runs", *where.overrides())
    train(load_config(None, run))
    # keep_last=3 leaves steps 12, 15 and 18; the two newest are broken, each its own way
    where.damage(18, "flip_byte" if kind == "local" else "manifest_without_step")
    where.damage(15, "manifest_not_json" if kind == "local" else "truncate")
    with caplog.at_level("INFO"):
        train(load_config(None, [*run, "resume=auto"]))
    assert "step-00000018" in caplog.text and "step-00000015" in caplog.text
    assert "resumed from" in caplog.text and "step 12" in caplog.text
    assert_same_weights(uninterrupted, final_model(where.url, where.endpoint))
    # the broken ones were moved aside, not overwritten or deleted
    quarantined = where.fs.ls(f"{where.root}/quarantine", detail=False)
    assert len(quarantined) == 2, quarantined


@pytest.mark.slow
def test_every_checkpoint_corrupt_starts_afresh_and_ends_like_the_reference(
        image_folder, tmp_path, uninterrupted):
    where = Location("local", tmp_path, None)
    run = tiny(image_folder, tmp_path / "runs", *where.overrides())
    train(load_config(None, run))
    for step, how in ((12, "truncate"), (15, "manifest_not_json"), (18, "flip_byte")):
        where.damage(step, how)
    train(load_config(None, [*run, "resume=auto"]))
    assert_same_weights(uninterrupted, final_model(where.url))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["local", "s3"])
def test_two_trainers_on_one_run_exactly_one_trains(kind, image_folder, tmp_path, request):
    where = Location(kind, tmp_path, request)
    run = tiny(image_folder, tmp_path / "runs", *where.overrides(), "train.epochs=4",
               "resume=auto")
    procs = [cli_train(run) for _ in range(2)]
    results = [finish(p) for p in procs]
    assert sorted(r[0] for r in results) == [0, 2], results
    winner, loser = (procs[0], results[1]) if results[0][0] == 0 else (procs[1], results[0])
    refusal = loser[2].strip()
    assert len(refusal.splitlines()) == 1, refusal
    assert "lease" in refusal and str(winner.pid) in refusal, refusal
    assert "Traceback" not in loser[1] + loser[2]
    # only the winner wrote: one validation per epoch in the log, and its final checkpoint
    metrics = [json.loads(line) for line in
               (tmp_path / "runs" / "tiny" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics if m["kind"] == "val"] == [1, 2, 3, 4]
    assert CheckpointStore(where.url, endpoint_url=where.endpoint).latest_valid().step == 36


@pytest.mark.slow
def test_a_sigkilled_holder_on_this_host_is_taken_over_at_once(image_folder, tmp_path):
    run = tiny(image_folder, tmp_path / "runs", "train.epochs=4", "resume=auto")
    holder = cli_train(run)
    wait_for_checkpoint(str(tmp_path / "runs" / "tiny" / "checkpoints"), holder)
    holder.kill()  # SIGKILL: the lease stays behind, its holder gone
    holder.wait()
    code, out, err = finish(cli_train(run))
    assert code == 0, err
    assert "resumed from" in out and "step 36/36" in out


@pytest.mark.slow
def test_a_lost_node_is_taken_over_once_its_lease_expires(image_folder, tmp_path, s3_server,
                                                          s3_bucket):
    """The holder runs on "another host" (its own UTS namespace, another hostname): its pid
    means nothing here, so its lease is honoured until it expires."""
    url = f"{s3_bucket}/lost"
    run = tiny(image_folder, tmp_path / "runs", "train.epochs=4", "resume=auto",
               f"checkpoint.url={url}", f"checkpoint.endpoint_url={s3_server}",
               "checkpoint.lease_ttl=15")
    empty = Path(__file__).parent / "empty_config.yaml"
    argv = " ".join([sys.executable, "-m", "pipeline", "train", "--config", str(empty),
                     *(f"'{o}'" for o in run)])
    if subprocess.run(["unshare", "--uts", "true"], capture_output=True).returncode != 0:
        unavailable("unshare --uts needs root")
    holder = subprocess.Popen(["unshare", "--uts", "sh", "-c",
                               f"hostname lost-node && exec {argv}"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_checkpoint(url, holder, endpoint=s3_server)
    holder.kill()
    holder.wait()
    code, _, err = finish(cli_train(run))
    assert code == 2 and "lost-node" in err, err  # refused: the lease has not expired yet
    sleep_until_the_lease_expires(s3fs.S3FileSystem(endpoint_url=s3_server), url)
    code, out, err = finish(cli_train(run))
    assert code == 0, err
    assert "resumed from" in out and "step 36/36" in out


@pytest.mark.slow
def test_resume_refuses_another_recipe_and_accepts_more_epochs(image_folder, tmp_path):
    run = tiny(image_folder, tmp_path / "runs", "train.epochs=1")
    train(load_config(None, run))
    run_dir = tmp_path / "runs" / "tiny"
    first_config = (run_dir / "config.yaml").read_text()
    code, _, err = finish(cli_train([*run, "resume=auto", "optim.name=adamw"]))
    assert code == 2 and "optim.name" in err and len(err.strip().splitlines()) == 1, err
    for change, words in [("model.kwargs={depth: 14, width: 4}", "model.kwargs.depth"),
                          # the global batch of 4 it made up (tests/test_elastic_resume.py)
                          ("train.global_batch=8", "leave train.global_batch unset (0) to keep "
                                                   "the run's own"),
                          # std was left out: the run stored the model's (CIFAR-10's)
                          ("data.std=[0.5,0.5,0.5]",
                           "data.std: [0.247, 0.2435, 0.2616] -> [0.5, 0.5, 0.5]")]:
        with pytest.raises(UserError, match=re.escape(words)):
            train(load_config(None, [*run, "resume=auto", change]))
    assert (run_dir / "config.yaml").read_text() == first_config
    # More epochs, and another per-pass batch: the run's global batch of 4 stays (one pass).
    train(load_config(None, [*run, "resume=auto", "train.epochs=2", "train.log_every=5",
                             "data.batch_size=6"]))
    assert (run_dir / "config.yaml").read_text() == first_config  # the first config stays
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # the schedule follows the new length: epoch 2 trains at a real rate, not the old end's 0
    lr = {m["step"]: m["lr"] for m in records if m["kind"] == "train"}
    assert lr[10] > 0.001, lr  # cosine over 18 steps: 0.0032 at step 10
    [resumed] = (run_dir / "resumes").glob("*.yaml")
    assert "epochs: 2" in resumed.read_text() and "step-00000009" in resumed.name
    assert CheckpointStore(str(run_dir / "checkpoints")).latest_valid().step == 18


@pytest.mark.slow
def test_a_moved_and_renamed_run_folder_resumes_where_it_stopped(image_folder, tmp_path):
    first = train(load_config(None, tiny(image_folder, tmp_path / "a", "train.epochs=1")))
    (tmp_path / "a" / "tiny").rename(tmp_path / "renamed")  # out_dir and name both change
    run = [*tiny(image_folder, tmp_path, "train.epochs=2", "resume=auto"), "name=renamed"]
    # results.json's seconds count every start (RunClock, checkpointed): give the first start a
    # clock far beyond anything this test can take, so the sum shows without timing anything.
    store = CheckpointStore(str(tmp_path / "renamed" / "checkpoints"))
    step9 = store.list()[-1]
    state = store.load(step9)
    assert state["clock"]["seconds"] <= first["seconds"]
    state["clock"]["seconds"] = 1000.0
    store.save(step9.step, state, step9.meta)
    second = train(load_config(None, run))
    assert [i.step for i in store.list()][-2:] == [15, 18]  # went on from step 9, not 0
    assert 1000.0 < second["seconds"] < 2000.0
    # Where the checkpoints have a location of their own, a new name is how a new run starts:
    # it must not continue the old name's checkpoints.
    url = str(tmp_path / "shared-checkpoints")
    train(load_config(None, tiny(image_folder, tmp_path, "train.epochs=1",
                                 f"checkpoint.url={url}")))
    with pytest.raises(UserError, match=r"checkpoint.url=.* holds run 'tiny'.*name='other'"):
        train(load_config(None, [*tiny(image_folder, tmp_path, "train.epochs=1",
                                       f"checkpoint.url={url}", "resume=auto"), "name=other"]))


@pytest.mark.slow
def test_a_diverging_run_stops_with_its_own_exit_code_and_saves_nothing(image_folder,
                                                                        tmp_path):
    code, _, err = finish(cli_train(tiny(image_folder, tmp_path / "runs", "optim.lr=1e12")))
    assert code == 3, err
    assert "diverged at step 3" in err and len(err.strip().splitlines()) == 1, err
    assert CheckpointStore(str(tmp_path / "runs" / "tiny" / "checkpoints")).list() == []


@pytest.mark.slow
def test_a_signal_while_starting_up_exits_75(image_folder, tmp_path):
    proc = cli_train(tiny(image_folder, tmp_path / "runs"))
    # The CLI's first line installs the handler; importing torch and the set-up are still ahead.
    wait_until(lambda: handles(proc.pid, signal.SIGUSR1), "SIGUSR1 handler", proc=proc)
    proc.send_signal(signal.SIGUSR1)
    code, out, err = finish(proc)
    assert code == 75, out + err
    assert "SIGUSR1 received" in out and "before the first step" in out
    assert "step 3/18" not in out  # it never trained


def test_an_unwritable_out_dir_is_one_line(image_folder, tmp_path):
    code, _, err = finish(cli_train(tiny(image_folder, "/proc/no-such-place")))
    assert code == 2 and "cannot create the run folder" in err, err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.slow
def test_a_writer_whose_lease_was_taken_over_stops_writing(image_folder, tmp_path):
    """Fencing: A is frozen (SIGSTOP: a long GC pause, a hung NFS call) past its lease; B takes
    the run over and finishes it; A, thawed, must not write a checkpoint beside B's."""
    url = str(tmp_path / "runs" / "tiny" / "checkpoints")
    run = tiny(image_folder, tmp_path / "runs", "train.epochs=6", "resume=auto",
               "checkpoint.lease_ttl=3")
    a = cli_train(run)
    wait_for_checkpoint(url, a)
    a.send_signal(signal.SIGSTOP)
    try:
        sleep_until_the_lease_expires(fsspec.filesystem("file"), url)  # A's heartbeat is frozen
        code, out, err = finish(cli_train(run))
        assert code == 0, err
        assert "taking over" in out and "step 54/54" in out
    finally:
        a.send_signal(signal.SIGCONT)
    code, _, err = finish(a)
    assert code == 2 and "fenced" in err, err
    store = CheckpointStore(url)
    assert [info.step for info in store.list()] == [48, 51, 54]  # B's last three, none of A's


@pytest.mark.slow
def test_a_fenced_writers_late_upload_never_lands_on_the_new_holders_checkpoint(
        image_folder, tmp_path, s3_server, s3_bucket):
    """A uploads through a slow link and is stopped while its payload is in flight (sent, not yet
    at the server); B takes the run over and commits that same step; then A's upload lands. B's
    checkpoint must stay whole, and A, thawed, must leave it alone."""
    from conftest import Proxy

    proxy = Proxy(int(s3_server.rsplit(":", 1)[1]), rate=30_000, report=True)
    proxy.start()
    url = f"{s3_bucket}/tiny"
    run = tiny(image_folder, tmp_path / "runs", "resume=auto", f"checkpoint.url={url}",
               "checkpoint.lease_ttl=3", "checkpoint.keep_last=0")
    a = cli_train([*run, f"checkpoint.endpoint_url={proxy.endpoint}"])
    try:
        wait_for_checkpoint(url, a, endpoint=s3_server)
        upload = proxy.wait_for(r"^received (\d+) PUT \S+/(step-\d+)/state\S*\.pt ",
                                after=len(proxy.lines))
        a.send_signal(signal.SIGSTOP)  # A has sent every byte of it: the upload is in flight
        proxy.hold()  # and the link stalls with it
        since = proxy.lines[proxy.lines.index(upload.string):]  # its connection served others
        assert not any(line.startswith(f"answered {upload[1]} HTTP/1.1 200")
                       for line in since), "the upload landed before the link stalled"
        fs = s3fs.S3FileSystem(endpoint_url=s3_server)
        sleep_until_the_lease_expires(fs, url)  # A's
        # B trains on for longer (an accepted change): its state at A's step differs from A's
        code, out, err = finish(cli_train([*run, f"checkpoint.endpoint_url={s3_server}",
                                           "train.epochs=3"]))
        assert code == 0, err
        assert "taking over" in out and "resumed from" in out and "step 27/27" in out
        seen = len(proxy.lines)
        proxy.release()
        proxy.wait_for(rf"^answered {upload[1]} HTTP/1.1 [2-5]\d\d", after=seen)  # A's landed
        assert main(["checkpoints", "verify", url, "--endpoint-url", s3_server]) == 0
        a.send_signal(signal.SIGCONT)
        code, _, err = finish(a)  # through the proxy still: A learns that it was fenced
        assert code == 2 and "fenced" in err, err
    finally:
        a.kill()
        proxy.stop()
    store = CheckpointStore(url, endpoint_url=s3_server)
    assert [info.step for info in store.list()] == list(range(3, 28, 3))
    assert all(store.verify(info) is None for info in store.list())
    fs.invalidate_cache()
    [b_checkpoint] = [info for info in store.list() if info.name == upload[2]]
    assert fs.ls(f"{url}/{upload[2]}", detail=False) == [  # A removed its own upload, only
        f"{url[5:]}/{upload[2]}/{name}" for name in (MANIFEST, b_checkpoint.payload)]
