"""Distributed harvest on a real dask LocalCluster (worker processes on 127.0.0.1) with the tiny model:
the same store as a single-process harvest, to a local directory and to the loopback S3 server, also
when a worker process is killed by pid mid-harvest."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from sae.errors import ConfigError
from sae.harvest.distributed import TEST_DELAY_ENV
from sae.harvest.harvest import HarvestConfig, harvest
from sae.store import ActivationStore
from sae.store.location import as_location
from sae.store.verify import verify_store
from tests.remote_servers import s3_server

distributed = pytest.importorskip("distributed")


def _cfg(model_dir: Path, out: str, **kw) -> HarvestConfig:
    return HarvestConfig(**{**dict(layers=[1, 2], model=str(model_dir), tokens=4096, context_size=64, batch_size=8,
                                   dtype="float32", chunk_tokens=512, device="cpu", out=out), **kw})


def _assert_same_store(a_url: str, b_url: str, b_opts: dict | None = None) -> None:
    """Identical tokens, identical stored bytes of every hook, identical statistics and content digest."""
    a, b = ActivationStore(a_url), ActivationStore(b_url, storage_options=b_opts)
    assert a.content_digest == b.content_digest and a.attrs["stats"] == b.attrs["stats"]
    assert np.array_equal(a.tokens, b.tokens) and a.hook_names == b.hook_names
    ga = zarr.open_group(store=as_location(a_url).zarr_store(), mode="r")
    gb = zarr.open_group(store=as_location(b_url, b_opts).zarr_store(), mode="r")
    for h in a.hook_names:
        assert np.array_equal(np.asarray(ga[h][:]), np.asarray(gb[h][:])), h
    assert verify_store(b).ok


@pytest.fixture(scope="module")
def reference(tiny_model_dir, tiny_lm, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ref") / "ref.zarr")
    return harvest(_cfg(tiny_model_dir, out), loaded=tiny_lm, quiet=True)


def test_a_two_process_local_cluster_harvest_equals_a_single_process_one(reference, tiny_model_dir, tiny_lm,
                                                                         tmp_path) -> None:
    out = harvest(_cfg(tiny_model_dir, str(tmp_path / "dist.zarr"), workers=2), loaded=tiny_lm, quiet=True)
    _assert_same_store(reference, out)


def test_a_distributed_harvest_into_s3_equals_the_local_one(reference, tiny_model_dir, tiny_lm) -> None:
    pytest.importorskip("s3fs")
    with s3_server("dist") as opts:  # its own bucket: moto's state outlives the server in this process
        url = "s3://dist/acts.zarr"
        harvest(_cfg(tiny_model_dir, url, workers=2, storage_options=opts), loaded=tiny_lm, quiet=True)
        _assert_same_store(reference, url, opts)


def test_a_worker_killed_by_pid_mid_harvest_still_yields_the_identical_store(reference, tiny_model_dir, tiny_lm,
                                                                             tmp_path, monkeypatch) -> None:
    """--scheduler on our own LocalCluster (so the test knows the worker pids): SIGKILL one worker while
    its task sleeps inside a chunk; dask reschedules its chunks (the nanny restarts the worker)."""
    monkeypatch.setenv(TEST_DELAY_ENV, "0.4")  # inherited by the worker processes started below
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_"):
        monkeypatch.delenv(var, raising=False)  # distributed sets these in *our* environment: restored after
    out = str(tmp_path / "killed.zarr")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster, distributed.Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        errors: list[BaseException] = []

        def run() -> None:
            try:
                harvest(_cfg(tiny_model_dir, out, scheduler=cluster.scheduler_address), loaded=tiny_lm, quiet=True)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)

        t = threading.Thread(target=run)
        t.start()
        commits = Path(out) / "commits" / "blocks.1.hook_resid_post"
        deadline = time.time() + 120
        while time.time() < deadline and not (commits.is_dir() and len(list(commits.iterdir())) >= 2):
            time.sleep(0.05)
        assert commits.is_dir(), "no chunk was committed"
        os.kill(pids[0], signal.SIGKILL)  # mid-harvest: 8 chunks, 2 committed, one in flight on this worker
        t.join(timeout=240)
        assert not t.is_alive() and not errors, errors
        assert pids[0] not in client.run(os.getpid).values()  # the killed process is gone (nanny restarted it)
    _assert_same_store(reference, out)


def test_bad_worker_options_are_one_line_before_anything_starts(tiny_model_dir, tmp_path) -> None:
    with pytest.raises(ConfigError, match="--workers"):
        harvest(_cfg(tiny_model_dir, str(tmp_path / "a.zarr"), workers=0), quiet=True)
    with pytest.raises(ConfigError, match="exclusive"):
        harvest(_cfg(tiny_model_dir, str(tmp_path / "a.zarr"), workers=2, scheduler="tcp://127.0.0.1:1"),
                quiet=True)
    assert not (tmp_path / "a.zarr").exists()
