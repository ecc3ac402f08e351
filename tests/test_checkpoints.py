from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch
from conftest import payload_path, unavailable

from pipeline.__main__ import main
from pipeline.config import load_config
from pipeline.errors import UserError
from pipeline.evaluation import load_member
from pipeline.models import create_anytime_model
from pipeline.storage.atomic import create_only
from pipeline.storage.checkpoints import (
    MANIFEST,
    NO_MANIFEST,
    PAYLOAD,
    QUARANTINE,
    SAVE_IN_PROGRESS_S,
    CheckpointStore,
    StorageError,
)


class Evil:
    """Unpickling this runs a command: what a malicious object in a bucket would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def state(value: float) -> dict:
    return {"model": {"w": torch.full((3, 3), value)}, "step": int(value), "gen": (1, [2, 3])}


def test_save_list_load_round_trip(tmp_path):
    store = CheckpointStore(str(tmp_path / "ckpt"), keep_last=0)
    store.save(10, state(10.0), meta={"epoch": 1})
    store.save(20, state(20.0), meta={"epoch": 2})
    infos = store.list()
    assert [i.step for i in infos] == [10, 20]
    assert infos[1].meta == {"epoch": 2} and infos[1].size > 0
    latest = store.latest_valid()
    assert latest.step == 20
    loaded = store.load(latest)
    assert torch.equal(loaded["model"]["w"], torch.full((3, 3), 20.0))
    assert loaded["gen"] == (1, [2, 3])


def test_file_url_works(tmp_path):
    store = CheckpointStore(f"file://{tmp_path}/ckpt")
    store.save(1, state(1.0))
    assert store.load(store.latest_valid())["step"] == 1


def test_a_folder_in_the_way_is_moved_to_quarantine_never_overwritten(tmp_path, caplog):
    store = CheckpointStore(str(tmp_path), keep_last=1)
    store.save(5, state(5.0))
    first = Path(payload_path(store.fs, str(tmp_path / "step-00000005"))).read_bytes()
    with caplog.at_level(logging.WARNING):
        store.save(5, state(6.0))  # a resumed run saving the same step again
    (moved,) = (tmp_path / QUARANTINE).iterdir()
    assert moved.name.startswith("step-00000005.")
    assert str(moved.relative_to(tmp_path)) in caplog.text
    assert Path(payload_path(store.fs, str(moved))).read_bytes() == first
    assert store.load(store.latest_valid())["step"] == 6
    for step in (6, 7):  # retention rotates checkpoints, never the quarantine
        store.save(step, state(float(step)))
    assert [i.name for i in store.list()] == ["step-00000007"]
    assert Path(payload_path(store.fs, str(moved))).read_bytes() == first


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "no_payload"])
def test_latest_valid_skips_damaged_checkpoints(tmp_path, caplog, damage):
    store = CheckpointStore(str(tmp_path), keep_last=0)
    store.save(1, state(1.0))
    store.save(2, state(2.0))
    folder = tmp_path / "step-00000002"
    payload = Path(payload_path(store.fs, str(folder)))
    data = payload.read_bytes()
    if damage == "truncate":
        payload.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        payload.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    elif damage == "no_manifest":
        (folder / MANIFEST).unlink()
    else:
        payload.unlink()
    with caplog.at_level(logging.WARNING):
        latest = store.latest_valid()
    assert latest.step == 1
    assert "step-00000002" in caplog.text
    with pytest.raises(UserError, match="step-00000002 is broken"):
        store.load(store.list()[-1])


def test_loading_refuses_arbitrary_pickles(tmp_path):
    marker = tmp_path / "MARKER"
    store = CheckpointStore(str(tmp_path / "ckpt"))
    store.save(1, {"x": Evil(marker)})  # sha256 fine: the bytes are what was written
    (info,) = store.list()
    assert info.problem is None  # the manifest is sound; the payload is not
    assert store.latest_valid() is None
    with pytest.raises(UserError, match=r"step-00000001 is broken.*posix\.system.*untrusted") as e:
        store.load(info)
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)
    assert not marker.exists()


def test_retention_keeps_the_newest(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=2)
    for step in range(1, 6):
        store.save(step, state(float(step)))
    assert [i.step for i in store.list()] == [4, 5]


def test_load_latest_valid_reads_each_payload_once(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path), keep_last=0)
    store.save(1, state(1.0))
    store.save(2, state(2.0))
    Path(payload_path(store.fs, str(tmp_path / "step-00000002"))).write_bytes(b"broken")
    reads = []
    cat_file = store.fs.cat_file
    monkeypatch.setattr(store.fs, "cat_file", lambda path, **kw: reads.append(path) or
                        cat_file(path, **kw))
    info, loaded = store.load_latest_valid()
    assert info.step == 1 and loaded["step"] == 1
    assert sum(p.endswith(".pt") for p in reads) == 2  # the broken one, then the good one


# --- broken for any reason, locally and on the S3 server: reported, skipped, moved aside --------


@dataclass
class Where:
    """A checkpoint URL and raw access to its objects, to damage them for real."""

    url: str
    endpoint: str
    fs: Any
    root: str

    def store(self, **kw: Any) -> CheckpointStore:
        return CheckpointStore(self.url, endpoint_url=self.endpoint, retry_delay=0.2, **kw)

    def cli(self, *args: str) -> int:
        return main(["checkpoints", *args, self.url, "--endpoint-url", self.endpoint])

    def payload(self, folder: str) -> str:
        """The payload's path inside the root, as read() and write() take it."""
        return payload_path(self.fs, f"{self.root}/{folder}")[len(self.root) + 1:]

    def read(self, path: str) -> bytes:
        return self.fs.cat_file(f"{self.root}/{path}")

    def write(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(f"{self.root}/{path}", data)

    def tree(self, folder: str) -> dict[str, bytes]:
        self.fs.invalidate_cache()
        base = f"{self.root}/{folder}"
        return {p[len(base) + 1:]: self.fs.cat_file(p) for p in self.fs.find(base)}

    def rewrite_manifest(self, folder: str, change: Callable[[dict], object]) -> None:
        manifest = json.loads(self.read(f"{folder}/{MANIFEST}"))
        change(manifest)
        self.write(f"{folder}/{MANIFEST}", json.dumps(manifest).encode())


@pytest.fixture(params=["local", "s3"])
def where(request, tmp_path) -> Where:
    if request.param == "local":
        return Where(str(tmp_path / "ckpt"), "", fsspec.filesystem("file"), str(tmp_path / "ckpt"))
    import s3fs

    server, bucket = request.getfixturevalue("s3_server"), request.getfixturevalue("s3_bucket")
    return Where(f"{bucket}/run", server, s3fs.S3FileSystem(endpoint_url=server),
                 f"{bucket[5:]}/run")


def flip(where: Where, folder: str, marker: Path) -> None:
    path = where.payload(folder)
    data = where.read(path)
    i = len(data) // 2
    where.write(path, data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1:])


def truncate(where: Where, folder: str, marker: Path) -> None:
    path = where.payload(folder)
    where.write(path, where.read(path)[:100])


def not_json(where: Where, folder: str, marker: Path) -> None:
    where.write(f"{folder}/{MANIFEST}", b'{"format": 1, "step": ')


def no_step(where: Where, folder: str, marker: Path) -> None:
    where.rewrite_manifest(folder, lambda m: m.pop("step"))


def size_as_text(where: Where, folder: str, marker: Path) -> None:
    where.rewrite_manifest(folder, lambda m: next(iter(m["files"].values())).update(size="123"))


def outside_file(where: Where, folder: str, marker: Path) -> None:
    """An entry naming the older checkpoint's payload, with its right size and sha256."""
    [(name, older)] = json.loads(where.read(f"step-00000001/{MANIFEST}"))["files"].items()
    where.rewrite_manifest(folder, lambda m: m["files"].update({f"../step-00000001/{name}":
                                                                older}))


def malicious_pickle(where: Where, folder: str, marker: Path) -> None:
    """A payload whose unpickling runs a command, with its size and sha256 recomputed."""
    buffer = io.BytesIO()
    torch.save({"model": Evil(marker)}, buffer)
    payload = buffer.getvalue()
    path = where.payload(folder)
    where.write(path, payload)
    where.rewrite_manifest(folder, lambda m: m["files"].update(
        {path.rsplit("/", 1)[1]: {"size": len(payload),
                                  "sha256": hashlib.sha256(payload).hexdigest()}}))


@pytest.mark.parametrize("damage, words", [
    (flip, "does not match its sha256"),
    (truncate, "has 100 bytes, the manifest says"),
    (not_json, "manifest.json is not JSON"),
    (no_step, "manifest.json lacks step"),
    (size_as_text, "entry for state-"),
    (outside_file, "'../step-00000001/state-"),
    (malicious_pickle, "Trying to load unsupported GLOBAL posix.system"),
])
def test_a_broken_checkpoint_is_reported_skipped_and_moved_aside(where, tmp_path, caplog, capsys,
                                                                damage, words):
    marker = tmp_path / "MARKER"
    store = where.store(keep_last=0)
    store.save(1, state(1.0))
    store.save(2, state(2.0))
    damage(where, "step-00000002", marker)
    broken = where.tree("step-00000002")

    good, bad = store.list()
    assert (good.name, good.problem, bad.name) == ("step-00000001", None, "step-00000002")
    assert bad.problem is None or words in bad.problem  # list() reads manifests only
    assert words in store.verify(bad) and store.verify(good) is None
    with caplog.at_level(logging.WARNING):
        assert store.latest_valid().step == 1
        info, loaded = store.load_latest_valid()
    assert info.step == 1 and loaded["step"] == 1
    assert f"{where.url}/step-00000002: " in caplog.text and words in caplog.text
    with pytest.raises(UserError, match="step-00000002 is broken") as e:
        store.load(bad)
    assert words in str(e.value) and "weights_only=False" not in str(e.value)

    capsys.readouterr()
    assert where.cli("verify") == 1
    out, err = capsys.readouterr()
    assert "step-00000001" in out and "step-00000002" in err and words in err
    assert where.cli("verify", "--json") == 1
    rows = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["status"]) for r in rows][0] == ("step-00000001", "valid")
    assert words in rows[1]["status"]
    assert where.cli("list") == (1 if bad.problem else 0)
    assert "step-00000002" in capsys.readouterr().out

    with caplog.at_level(logging.WARNING):
        assert store.save(2, state(22.0)) == "step-00000002"  # the resumed run saves step 2 again
    assert [(i.name, i.problem) for i in store.list()] == [("step-00000001", None),
                                                            ("step-00000002", None)]
    assert store.load(store.latest_valid())["step"] == 22
    where.fs.invalidate_cache()
    (moved,) = [p.rsplit("/", 1)[-1] for p in where.fs.ls(f"{where.root}/{QUARANTINE}")]
    assert moved.startswith("step-00000002.") and f"{QUARANTINE}/{moved}" in caplog.text
    assert where.tree(f"{QUARANTINE}/{moved}") == broken  # kept as it was, for a person to see
    assert not marker.exists()


def entry(manifest: dict) -> dict:
    """The payload's entry in a manifest's files."""
    return next(iter(manifest["files"].values()))


@pytest.mark.parametrize("change, words", [
    (lambda m: m.clear() or m.update(files={PAYLOAD: {}}), "lacks format, step, meta"),
    (lambda m: m.update(format=2), "format 2"),
    (lambda m: m.update(format=True), "format True"),
    (lambda m: m.update(step="2"), "names step '2'"),
    (lambda m: m.update(step=3), "names step 3, its folder step 2"),
    (lambda m: m.update(meta=[]), "meta is a list"),
    (lambda m: m.update(files=[]), "files is not a non-empty object"),
    (lambda m: m.update(files={}), "files is not a non-empty object"),
    (lambda m: entry(m).update(sha256="A" * 64), "64 lowercase hex"),
    (lambda m: entry(m).update(size=-1), "bytes >= 0"),
    (lambda m: m["files"].update({".hidden": entry(m)}), "starts with '.'"),
    (lambda m: m["files"].update({"": entry(m)}), "an empty name"),
    (lambda m: m["files"].update({"a\\b": entry(m)}), "path separator"),
    (lambda m: m.update(files={"other.pt": entry(m)}), "does not list a payload"),
    (lambda m: m["files"].update({PAYLOAD: entry(m)}), "lists 2 payloads, not one"),
    # meta values the trainer reads back, of another type than it writes
    (lambda m: m["meta"].update(global_batch="32"), 'meta.global_batch is "32", not an integer'),
    (lambda m: m["meta"].update(world_size=0), "meta.world_size is 0, not an integer >= 1"),
    (lambda m: m["meta"].update(epoch=1.5), "meta.epoch is 1.5, not an integer >= 0"),
    (lambda m: m["meta"].update(end_of_epoch="yes"), 'meta.end_of_epoch is "yes", not true or'),
    (lambda m: m["meta"].update(config=["a"]), 'meta.config is ["a"], not an object'),
])
def test_every_unexpected_manifest_shape_is_a_problem_not_a_traceback(tmp_path, capsys, change,
                                                                     words):
    where = Where(str(tmp_path), "", fsspec.filesystem("file"), str(tmp_path))
    store = where.store(keep_last=0)
    store.save(1, state(1.0))
    store.save(2, state(2.0))
    where.rewrite_manifest("step-00000002", change)
    assert words in store.list()[1].problem
    assert store.latest_valid().step == 1
    with pytest.raises(UserError, match=f"step-00000002 is broken: .*{re.escape(words)}"):
        store.load(store.list()[1])
    assert where.cli("list") == 1
    assert words in capsys.readouterr().err


def test_an_array_manifest_and_one_without_json_are_listed(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=0)
    store.save(1, state(1.0))
    (tmp_path / "step-00000002").mkdir()
    (tmp_path / "step-00000002" / MANIFEST).write_text("[]")
    (tmp_path / "step-00000003").mkdir()
    (tmp_path / "step-00000003" / MANIFEST).write_bytes(b"\xff\xfe")
    (tmp_path / "step-00000004").mkdir()  # a save that died before its manifest, long ago
    os.utime(tmp_path / "step-00000004", (time.time() - 3600, time.time() - 3600))
    assert [(i.step, i.problem) for i in store.list()] == [
        (1, None), (2, "manifest.json holds a list, not an object"),
        (3, store.list()[2].problem), (4, NO_MANIFEST)]
    assert "is not JSON" in store.list()[2].problem
    assert store.load_latest_valid()[0].step == 1


def test_create_only_never_replaces_an_object(where):
    """The manifest's commit: S3's If-None-Match on the real server, a hard link locally."""
    where.fs.makedirs(f"{where.root}/step-00000001", exist_ok=True)
    path = f"{where.root}/step-00000001/{MANIFEST}"
    create_only(where.fs, path, b"first")
    with pytest.raises(FileExistsError):
        create_only(where.fs, path, b"second")
    where.fs.invalidate_cache()
    assert where.fs.cat_file(path) == b"first"
    assert where.fs.ls(f"{where.root}/step-00000001", detail=False) == [path]  # no temp left


def test_a_save_whose_step_another_writer_committed_meanwhile_leaves_it_alone(where, caplog):
    """Between this writer's last lease check and its commit, another commits the same step (a
    fenced writer inside its window): that checkpoint stays as it is, this save fails, and only
    its own payload is removed."""
    store, other = where.store(keep_last=0), where.store(keep_last=0)
    checks = []

    def commit_the_other_one_second() -> None:
        checks.append(1)
        if len(checks) == 2:  # right before this save's commit
            other.save(1, state(7.0))

    with caplog.at_level(logging.WARNING), pytest.raises(
            StorageError, match="step-00000001 was committed by another writer while this one "
                                "saved it; left as it is"):
        store.save(1, state(1.0), may_write=commit_the_other_one_second)
    [info] = store.list()
    assert store.load(info)["step"] == 7
    assert sorted(where.tree("step-00000001")) == sorted([MANIFEST, info.payload])


def test_a_save_in_progress_is_not_broken_until_it_is_old(where, capsys, caplog):
    """`checkpoints verify` while a save is being written: the folder without its manifest is
    "in progress" (exit 0), skipped by a resume, and left alone by retention; once it stopped
    changing for longer than a save may take it is broken (exit 1), and retention deletes it,
    saying so."""
    store = where.store(keep_last=2)
    store.save(1, state(1.0))
    where.fs.makedirs(f"{where.root}/step-00000002", exist_ok=True)
    where.write("step-00000002/state-0123456789abcdef.pt", b"the first bytes of an upload")
    assert where.cli("verify") == 0
    out, err = capsys.readouterr()
    assert re.search(r"a save in progress \(last write \d+ s ago\)", out) and err == "", out
    assert store.load_latest_valid()[0].step == 1
    store.save(3, state(3.0))
    assert [i.step for i in store.list()] == [1, 2, 3]  # still being written: not deleted
    if where.endpoint:
        return  # an object's time cannot be set back on S3; the rest is the same code
    old = time.time() - SAVE_IN_PROGRESS_S - 1
    folder = Path(where.root) / "step-00000002"
    for path in (folder, *folder.iterdir()):
        os.utime(path, (old, old))
    assert where.cli("verify") == 1
    assert f"step-00000002 ({NO_MANIFEST})" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING):
        store.save(4, state(4.0))
    assert [i.step for i in store.list()] == [3, 4]
    assert f"deleting {where.url}/step-00000002, a save that never finished" in caplog.text


# --- storage that cannot take a save: answered at once, and nothing partial left behind --------


@pytest.fixture
def small_mount(tmp_path) -> Callable[[str], Path]:
    """mount(options): a real 64 KiB tmpfs (root only), unmounted at the end."""
    mounted = []

    def mount(options: str) -> Path:
        folder = tmp_path / f"mnt{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode:
            unavailable(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=True)


def test_no_space_is_not_retried_and_the_partial_folder_is_removed(small_mount, caplog):
    root = small_mount("size=64k")
    store = CheckpointStore(str(root), retries=3, retry_delay=1.0)
    with caplog.at_level(logging.WARNING), pytest.raises(
            StorageError, match=f"upload step-00000001 at {root} failed: no space left on the "):
        store.save(1, {"w": torch.zeros(100_000)})  # 400 kB into 64 kB
    assert "retry" not in caplog.text  # each retry logs one line before it waits
    assert list(root.iterdir()) == [] and "removed" in caplog.text
    store.save(1, state(1.0))  # nothing in the way: the failed save left no folder
    assert store.load(store.latest_valid())["step"] == 1


def test_read_only_storage_is_not_retried(small_mount, caplog):
    root = small_mount("size=64k,ro")
    store = CheckpointStore(str(root), retries=3, retry_delay=1.0)
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError, match="read-only"):
        store.save(1, state(1.0))
    assert "retry" not in caplog.text  # each retry logs one line before it waits


# --- eval and assemble find checkpoints through the store ---------------------------------------


def test_eval_falls_back_from_a_broken_newest_and_names_a_broken_one(tmp_path, caplog):
    cfg = load_config("configs/demo_fmnist_resnet_ann.yaml",
                      ["model.name=resnet_ann_cifar", "model.kwargs={depth: 8, width: 8}"])
    model = create_anytime_model(cfg.model.name, 10, **cfg.model.kwargs)
    run = tmp_path / "run"
    store = CheckpointStore(str(run / "checkpoints"), keep_last=0)
    for step in (1, 2):
        store.save(step, {"model": model.state_dict()}, meta={"config": cfg.to_dict()})
    where = Where(str(run), "", fsspec.filesystem("file"), str(run / "checkpoints"))
    no_step(where, "step-00000002", tmp_path)
    with caplog.at_level(logging.WARNING):
        assert load_member(str(run)).step == 1
        assert load_member(str(run / "checkpoints")).step == 1
    assert "step-00000002: manifest.json lacks step" in caplog.text
    with pytest.raises(UserError, match="step-00000002 is broken: manifest.json lacks step") as e:
        load_member(str(run / "checkpoints" / "step-00000002"))
    assert "\n" not in str(e.value)


def test_a_checkpoint_that_does_not_fit_its_own_config_is_one_line_naming_the_weight(tmp_path):
    cfg = load_config("configs/demo_fmnist_resnet_ann.yaml",
                      ["model.name=resnet_ann_cifar", "model.kwargs={depth: 8, width: 8}"])
    wider = load_config("configs/demo_fmnist_resnet_ann.yaml",
                        ["model.name=resnet_ann_cifar", "model.kwargs={depth: 8, width: 16}"])
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    model = create_anytime_model(wider.model.name, 10, **wider.model.kwargs)
    store.save(1, {"model": model.state_dict()}, meta={"config": cfg.to_dict()})
    with pytest.raises(UserError, match=r"does not fit the model of its own config "
                                        r"\(resnet_ann_cifar, .*\): \S+ is \[16, .*\] there "
                                        r"and \[8, .*\] here") as e:
        load_member(str(tmp_path / "checkpoints"))
    assert "\n" not in str(e.value)
