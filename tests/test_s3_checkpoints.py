"""CheckpointStore against a real S3-compatible server (moto_server over HTTP) through s3fs."""

from __future__ import annotations

import json
import logging
import re
import threading

import pytest
import s3fs
import torch
from conftest import payload_path, wait_until

from pipeline.errors import UserError
from pipeline.storage.checkpoints import (
    MANIFEST,
    QUARANTINE,
    CheckpointStore,
    StorageError,
)
from pipeline.storage.local_s3 import free_port


def state(value: float, numel: int = 9) -> dict:
    return {"model": {"w": torch.full((numel,), value)}, "step": int(value)}


def store_at(url: str, endpoint: str, **kw) -> CheckpointStore:
    return CheckpointStore(url, endpoint_url=endpoint, retry_delay=0.2, **kw)


def test_save_list_load_and_retention_on_s3(s3_server, s3_bucket):
    store = store_at(f"{s3_bucket}/runs/a", s3_server, keep_last=2, keep_every_epochs=2)
    for step in range(1, 6):
        store.save(step, state(float(step)), meta={"epoch": step, "end_of_epoch": True})
    # last two (4, 5) plus every 2nd epoch end (2, 4)
    assert [i.step for i in store.list()] == [2, 4, 5]
    latest = store.latest_valid()
    assert latest.step == 5 and latest.meta["epoch"] == 5
    assert torch.equal(store.load(latest)["model"]["w"], torch.full((9,), 5.0))
    # A new process (a resumed job) sees the same through a fresh client.
    other = store_at(f"{s3_bucket}/runs/a", s3_server)
    assert [i.step for i in other.list()] == [2, 4, 5]


@pytest.mark.parametrize("damage", ["truncate", "flip_byte", "no_manifest", "absent_object"])
def test_damaged_checkpoints_are_skipped_on_s3(s3_server, s3_bucket, caplog, damage):
    store = store_at(f"{s3_bucket}/run", s3_server, keep_last=0)
    store.save(1, state(1.0))
    store.save(2, state(2.0))
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    folder = f"{s3_bucket[5:]}/run/step-00000002"
    path = payload_path(fs, folder)
    payload = fs.cat_file(path)
    if damage == "truncate":
        fs.pipe_file(path, payload[: len(payload) // 3])
    elif damage == "flip_byte":
        i = len(payload) // 2
        fs.pipe_file(path, payload[:i] + bytes([payload[i] ^ 0x40]) + payload[i + 1:])
    elif damage == "no_manifest":
        fs.rm(f"{folder}/{MANIFEST}")
    else:  # the manifest lists an object that is not there
        manifest = json.loads(fs.cat_file(f"{folder}/{MANIFEST}"))
        manifest["files"]["extra.bin"] = {"size": 3, "sha256": "0" * 64}
        fs.pipe_file(f"{folder}/{MANIFEST}", json.dumps(manifest).encode())
    with caplog.at_level(logging.WARNING):
        latest = store_at(f"{s3_bucket}/run", s3_server).latest_valid()
    assert latest.step == 1
    assert "step-00000002" in caplog.text  # a folder without its manifest is listed, and skipped
    assert torch.equal(store.load(latest)["model"]["w"], torch.full((9,), 1.0))


def test_a_run_whose_every_checkpoint_is_broken_starts_afresh_on_s3(s3_server, s3_bucket,
                                                                    caplog):
    """Resume finds nothing valid, trains the same steps again and saves them: each broken folder
    in the way goes to quarantine (copy + delete on S3), where retention never reaches it."""
    store = store_at(f"{s3_bucket}/run", s3_server, keep_last=1)
    store.save(1, state(1.0))
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    root = f"{s3_bucket[5:]}/run"
    bad_payload = payload_path(fs, f"{root}/step-00000001")
    fs.pipe_file(bad_payload, b"not a checkpoint")
    fs.pipe_file(f"{root}/step-00000002/{MANIFEST}", b"{}")  # written by hand, say
    with caplog.at_level(logging.WARNING):
        assert store.load_latest_valid() is None
    assert f"step-00000001: {bad_payload.rsplit('/', 1)[1]} has 16 bytes" in caplog.text
    assert "step-00000002: manifest.json lacks format, step, files, meta" in caplog.text
    for step in (1, 2, 3):
        store.save(step, state(float(step)))
    assert [(i.name, i.problem) for i in store.list()] == [("step-00000003", None)]
    fs.invalidate_cache()
    moved = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{QUARANTINE}"))
    assert [m[:13] for m in moved] == ["step-00000001", "step-00000002"]
    assert fs.cat_file(payload_path(fs, f"{root}/{QUARANTINE}/{moved[0]}")) == b"not a checkpoint"
    assert fs.cat_file(f"{root}/{QUARANTINE}/{moved[1]}/{MANIFEST}") == b"{}"


def test_upload_survives_the_server_being_cut_and_restored(s3_proxy, s3_bucket, caplog):
    s3_proxy.stop()
    s3_proxy.rate = 4e6  # 4 MB/s: the 12 MB upload takes 3 s, so the cut lands inside it
    s3_proxy.report = True  # to see the upload pass
    s3_proxy.start()
    store = store_at(f"{s3_bucket}/run", s3_proxy.endpoint, retries=5, keep_last=0)
    big = state(3.0, numel=3_000_000)
    saved: dict = {}

    def save() -> None:
        try:
            saved["name"] = store.save(3, big)
        except Exception as e:  # reported by the assertion below
            saved["error"] = e

    with caplog.at_level(logging.WARNING):
        writer = threading.Thread(target=save)
        writer.start()
        # The payload's PUT has begun: its 12 MB reach the server at 4 MB/s, and the answer
        # comes only after the last byte, so the cut below lands inside the upload.
        upload = s3_proxy.wait_for(r"^request (\d+) PUT \S+/step-00000003/state\S*\.pt ")
        # No final answer on its connection since (group 1 numbers the connection, which an
        # earlier, answered request may have used; "100 Continue", the server's go-ahead for the
        # body, is not an answer)
        since = s3_proxy.lines[s3_proxy.lines.index(upload.string):]
        answered = re.compile(rf"^answered {upload[1]} HTTP/1\.1 [2-5]\d\d ")
        assert not any(answered.match(line) for line in since), since
        s3_proxy.stop()  # every connection dies mid-request
        # The storage stays away until the store has seen the failure and is backing off.
        wait_until(lambda: "retry 1/5" in caplog.text, "retry of the cut upload", timeout=60)
        s3_proxy.rate = 0  # back at full speed: the retry need not crawl
        s3_proxy.start()
        writer.join(timeout=120)
    assert "error" not in saved, saved.get("error")
    assert saved["name"] == "step-00000003"
    # It waited out the outage: the store retried, and the payload went up again in full.
    assert "upload step-00000003 failed" in caplog.text, caplog.text
    latest = store.latest_valid()
    assert latest.step == 3
    assert torch.equal(store.load(latest)["model"]["w"][:5], torch.full((5,), 3.0))


def test_storage_down_for_good_raises_storage_error(s3_proxy, s3_bucket, caplog):
    store = store_at(f"{s3_bucket}/run", s3_proxy.endpoint, retries=2)
    store.save(1, state(1.0))
    s3_proxy.stop()
    with caplog.at_level(logging.WARNING), pytest.raises(StorageError, match=r"failed 3 times"):
        store.save(2, state(2.0))
    # it backed off between tries, doubling the wait (each retry logs its wait before it)
    waits = re.findall(r"retry (\d)/2 in (\S+)s", caplog.text)
    assert waits == [("1", "0.2"), ("2", "0.4")], caplog.text


def test_the_stores_retries_are_the_only_ones(caplog):
    """`checkpoint.retries` is the policy: the S3 client under it does not retry on its own (it
    did: 50 connections and 40 s for one look at a folder on a server that was down)."""
    from conftest import Proxy

    down = Proxy(free_port(), report=True)  # in front of a port where nothing listens
    down.start()
    try:
        store = store_at("s3://bucket-x/run", down.endpoint, retries=2)
        with pytest.raises(StorageError, match=r"check step-00000001 .* failed 3 times"):
            store.save(1, state(1.0))
    finally:
        down.stop()
    connections = [line for line in down.lines if line.startswith("connection")]
    assert len(connections) == 3 * 2, connections  # 3 tries, each one HEAD and one LIST


def test_missing_s3_dependency_or_bad_url_is_a_clear_error():
    with pytest.raises(UserError, match="cannot be opened"):
        CheckpointStore("nosuchscheme://bucket/x")
