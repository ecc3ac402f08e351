"""pipeline/job.py: the one job context that train, eval and assemble enter. Real gloo groups,
joined from the launcher's environment variables as pipeline/distributed.py reads them."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipeline.eann.assemble import assemble
from pipeline.errors import UserError
from pipeline.evaluation import evaluate_checkpoint
from pipeline.job import open_job
from pipeline.storage.local_s3 import free_port


@pytest.fixture
def launcher_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """What torchrun / Ray Train set for a job of one process."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")


@pytest.fixture
def process_group(launcher_env: None):
    """A real gloo group of world size 1, made before the job as Ray Train makes it (the job
    finds it and joins); destroyed here too should a test fail before its job closes it."""
    dist.init_process_group("gloo")  # env://: MASTER_ADDR/PORT, RANK, WORLD_SIZE
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def test_a_job_that_raised_closes_the_process_group(process_group: None):
    with pytest.raises(RuntimeError, match="boom"), open_job("cpu", "none") as job:
        assert dist.is_initialized() and dist.get_world_size() == 1
        assert (job.dist.rank, job.dist.world_size, job.device) == (0, 1, torch.device("cpu"))
        raise RuntimeError("boom")
    assert not dist.is_initialized()


def test_a_job_that_ends_closes_the_process_group(process_group: None):
    with open_job("cpu", "bf16") as job, job.autocast:
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert not dist.is_initialized()


@pytest.mark.parametrize("verb", ["eval", "assemble"])
def test_eval_and_assemble_close_the_group_when_they_fail(process_group: None, tmp_path: Path,
                                                          verb: str):
    missing = str(tmp_path / "no-run")
    with pytest.raises(UserError):
        if verb == "eval":
            evaluate_checkpoint(missing, str(tmp_path), device="cpu")
        else:
            assemble([missing], str(tmp_path), str(tmp_path / "eann"), device="cpu")
    assert not dist.is_initialized()


def _rank_job(rank: int, port: int, results: dict) -> None:
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE="2")
    logger = logging.getLogger("pipeline")
    logger.setLevel(logging.INFO)
    try:
        with open_job("cpu", "none") as job:
            inside = (logger.level, dist.get_world_size(), job.dist.rank)
            dist.barrier()  # both ranks joined before either raises
            raise UserError("a rank's mistake")
    except UserError:
        results[rank] = (*inside, logger.level, dist.is_initialized())


def test_ranks_other_than_0_are_quiet_then_restored():
    """Two real processes joining from the environment: rank 1 logs warnings only inside the
    job, and both get their level back and the group closed after the job raised."""
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank_job, args=(free_port(), results), nprocs=2)  # raises what a rank raised
        got = dict(results)
    assert got[0] == (logging.INFO, 2, 0, logging.INFO, False)
    assert got[1] == (logging.WARNING, 2, 1, logging.INFO, False)


@pytest.mark.parametrize("device,amp,message", [
    ("tpu", "none", "device='tpu' is not one of auto, cpu, cuda"),
    ("cpu", "fp32", "amp='fp32' is not one of none, bf16, fp16"),
    ("cpu", "fp16", "train.amp=fp16 needs a CUDA GPU"),
    pytest.param("cuda", "none", "no CUDA GPU is visible", marks=pytest.mark.skipif(
        torch.cuda.is_available(), reason="a GPU is visible")),
])
def test_bad_device_or_amp_is_one_line(launcher_env: None, device: str, amp: str, message: str):
    with pytest.raises(UserError) as e, open_job(device, amp):
        pytest.fail("entered a job with a bad device or amp")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not dist.is_initialized()
