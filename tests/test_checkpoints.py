import logging

import pytest
import torch

from pipeline.errors import UserError
from pipeline.storage.checkpoints import MANIFEST, PAYLOAD, CheckpointStore


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


def test_never_overwrites(tmp_path):
    store = CheckpointStore(str(tmp_path))
    store.save(5, state(5.0))
    with pytest.raises(FileExistsError):
        store.save(5, state(6.0))


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_manifest", "no_payload"])
def test_latest_valid_skips_damaged_checkpoints(tmp_path, caplog, damage):
    store = CheckpointStore(str(tmp_path), keep_last=0)
    store.save(1, state(1.0))
    store.save(2, state(2.0))
    folder = tmp_path / "step-00000002"
    payload = folder / PAYLOAD
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
    if damage != "no_manifest":  # without a manifest the folder is not a checkpoint at all
        assert "step-00000002" in caplog.text
        with pytest.raises(UserError, match="corrupt"):
            store.load(store.list()[-1])


def test_loading_refuses_arbitrary_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    store = CheckpointStore(str(tmp_path))
    store.save(1, {"x": Evil()})  # verifies fine: the bytes are what was written
    with pytest.raises(Exception, match="[Ww]eights only"):
        store.load(store.latest_valid())


def test_retention_keeps_the_newest(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=2)
    for step in range(1, 6):
        store.save(step, state(float(step)))
    assert [i.step for i in store.list()] == [4, 5]


def test_load_latest_valid_reads_each_payload_once(tmp_path, monkeypatch):
    store = CheckpointStore(str(tmp_path), keep_last=0)
    store.save(1, state(1.0))
    store.save(2, state(2.0))
    (tmp_path / "step-00000002" / PAYLOAD).write_bytes(b"broken")
    reads = []
    cat_file = store.fs.cat_file
    monkeypatch.setattr(store.fs, "cat_file", lambda path, **kw: reads.append(path) or
                        cat_file(path, **kw))
    info, loaded = store.load_latest_valid()
    assert info.step == 1 and loaded["step"] == 1
    assert sum(p.endswith(PAYLOAD) for p in reads) == 2  # the broken one, then the good one
