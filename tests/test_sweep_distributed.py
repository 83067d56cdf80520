"""Sweeps over dask: group planning, equality with a local sweep, a worker SIGKILLed mid-group, a group
that fails alone, refusals before anything runs. Real ``LocalCluster`` processes on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sae.cli import app
from sae.errors import ConfigError
from sae.rundir.sae import SAE
from sae.train.config import TrainConfig
from sae.train.distributed import TEST_DELAY_ENV, SweepError, plan_groups, sae_bytes
from sae.train.run import RunDirError
from sae.train.sweep import expand, parse_grid, run_sweep
from tests.helpers import tree_hash

PARAMS = ("W_enc", "W_dec", "b_enc", "b_dec")


@pytest.fixture(scope="module")
def store(planted_store_factory):
    return planted_store_factory(8192, d_in=16, n_features=32, active=2, seed=3)


def _local(cfgs: list[TrainConfig], out: Path) -> dict[str, Path]:
    """The reference: the same grid as a local one-pass sweep, at one intra-op thread (as each worker)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dirs = run_sweep([TrainConfig(**{**c.to_dict(), "adam_betas": tuple(c.adam_betas),
                                         "out": str(out / Path(c.out).name)}) for c in cfgs], quiet=True)
    finally:
        torch.set_num_threads(threads)
    return {p.name: p for p in dirs}


def _assert_same(a: Path, b: Path) -> None:
    x, y = SAE.load(a), SAE.load(b)
    for n in PARAMS:
        assert torch.equal(getattr(x, n), getattr(y, n)), (a.name, n)


def test_plan_groups_spreads_over_workers_splits_streams_and_respects_memory() -> None:
    base = TrainConfig(store="s", d_sae=64, k=4, batch_size=256, tokens=2560)
    cfgs = expand(base, ["none"], parse_grid(["k=1,2,3,4,5,6,7"]), "/o")
    sizes = [len(g) for g in plan_groups(cfgs, workers=2, d_in=16)]
    assert sizes == [4, 3]  # one pass per worker
    g = plan_groups(cfgs, workers=2, d_in=16)
    assert [Path(c.out).name for c in g[1]] == ["topk-k=2", "topk-k=4", "topk-k=6"]  # round-robin
    assert [len(g) for g in plan_groups(cfgs, workers=2, d_in=16, group_size=2)] == [2, 2, 2, 1]
    # a budget of three SAEs (formula written out: 4 copies of 2·16·64+64+16 floats + 2 × 256 × 64 floats)
    one = 4 * (4 * (2 * 16 * 64 + 64 + 16) + 2 * 256 * 64)
    assert sae_bytes(cfgs[0], 16) == one
    assert [len(g) for g in plan_groups(cfgs, workers=1, d_in=16, budget=3 * one)] == [3, 2, 2]
    with pytest.raises(ConfigError, match="needs ~.* GiB to train"):
        plan_groups(cfgs, workers=1, d_in=16, budget=one - 1)
    # configurations that cannot share a pass (batch size) are never grouped together
    mixed = expand(base, ["none"], parse_grid(["batch_size=128,256"]), "/o")
    assert [len(g) for g in plan_groups(mixed, workers=1, d_in=16)] == [1, 1]
    with pytest.raises(ConfigError, match="--group-size 0"):
        plan_groups(cfgs, workers=1, d_in=16, group_size=0)


def test_two_worker_sweep_equals_local_sweep_per_run(store, tmp_path, capsys) -> None:
    base = TrainConfig(store=str(store), d_sae=32, k=2, batch_size=256, tokens=256 * 10, device="cpu")
    cfgs = expand(base, ["none", "ortsae"], parse_grid(["k=2,3"]), tmp_path / "dask")
    assert len(cfgs) == 4
    dirs = run_sweep(cfgs, workers=2, quiet=True)
    assert [p.name for p in dirs] == [Path(c.out).name for c in cfgs[0::2]] + [Path(c.out).name for c in cfgs[1::2]]
    ref = _local(cfgs, tmp_path / "local")
    for p in dirs:
        _assert_same(p, ref[p.name])
    # finished runs are recognised by --resume: nothing retrains, nothing changes
    before = tree_hash(tmp_path / "dask")
    resumed = [TrainConfig(**{**c.to_dict(), "adam_betas": tuple(c.adam_betas), "resume": True}) for c in cfgs]
    run_sweep(resumed, workers=2, quiet=True)
    assert tree_hash(tmp_path / "dask") == before


def test_worker_sigkilled_mid_group_is_rescheduled_and_resumes_to_identical_weights(store, tmp_path, monkeypatch,
                                                                                   capsys) -> None:
    from distributed import Client, LocalCluster

    base = TrainConfig(store=str(store), d_sae=32, k=2, batch_size=256, tokens=256 * 60, device="cpu",
                       checkpoint_every=5)
    cfgs = expand(base, ["none"], parse_grid(["k=2,3"]), tmp_path / "dask")
    monkeypatch.setenv(TEST_DELAY_ENV, "0.05")  # inherited by the worker processes: ~3 s per group
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                           dashboard_address=None)
    client = Client(cluster)
    killed: list[int] = []

    def kill_one_busy_worker() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if all((Path(c.out) / "checkpoint.pt").exists() for c in cfgs):  # whichever we kill, it resumes
                busy = [addr for addr, keys in client.processing().items() if keys]
                if busy:
                    pid = client.run(os.getpid, workers=[busy[0]])[busy[0]]
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                    return
            time.sleep(0.02)

    try:
        killer = threading.Thread(target=kill_one_busy_worker)
        killer.start()
        dirs = run_sweep(cfgs, scheduler=cluster.scheduler_address, quiet=True)
        killer.join()
    finally:
        client.close()
        cluster.close()
    assert killed, "no worker was killed: the test did not exercise anything"
    assert "resumes from its last checkpoint" in capsys.readouterr().err
    monkeypatch.delenv(TEST_DELAY_ENV)
    ref = _local(cfgs, tmp_path / "local")
    for p in dirs:
        assert not (p / "checkpoint.pt").exists()
        _assert_same(p, ref[p.name])


def test_a_diverging_group_fails_alone_and_names_its_run(store, tmp_path) -> None:
    base = TrainConfig(store=str(store), d_sae=32, k=2, batch_size=256, tokens=256 * 6, device="cpu", log_every=1)
    cfgs = expand(base, ["none"], parse_grid(["lr=1e-3,1e30,3e-3"]), tmp_path / "dask")
    with pytest.raises(SweepError) as e:
        run_sweep(cfgs, workers=2, group_size=1, quiet=True)
    msg = str(e.value)
    assert "1 of 3 groups failed (2 runs finished)" in msg and "topk-lr=1e30 diverged" in msg
    assert "\n" not in msg
    for name in ("topk-lr=1e-3", "topk-lr=3e-3"):
        assert (tmp_path / "dask" / name / "sae_weights.safetensors").exists()
    assert not (tmp_path / "dask" / "topk-lr=1e30" / "sae_weights.safetensors").exists()


def test_refusals_come_before_any_worker_or_directory(store, tmp_path) -> None:
    base = TrainConfig(store=str(store), d_sae=32, k=2, batch_size=256, tokens=256 * 4, device="cpu")
    cfgs = expand(base, ["none"], parse_grid(["k=2,3"]), tmp_path / "sw")
    (tmp_path / "sw" / "topk-k=3").mkdir(parents=True)
    (tmp_path / "sw" / "topk-k=3" / "notes.txt").write_text("a teammate's file")
    before = tree_hash(tmp_path)
    with pytest.raises(RunDirError, match="already exists: pass --resume"):
        run_sweep(cfgs, workers=2, quiet=True)
    resumed = [TrainConfig(**{**c.to_dict(), "adam_betas": tuple(c.adam_betas), "resume": True}) for c in cfgs]
    with pytest.raises(RunDirError, match="not an sae run directory"):
        run_sweep(resumed, workers=2, quiet=True)
    assert tree_hash(tmp_path) == before
    runner = CliRunner()
    common = ["sweep", "--store", str(store), "--variants", "none", "--tokens", "1024", "--batch-size", "256"]
    for extra, why in ((["--out", "s3://bucket/runs", "--workers", "2"], "not a URL"),
                       (["--out", str(tmp_path / "x"), "--group-size", "2"], "--group-size applies to a distributed"),
                       (["--out", str(tmp_path / "x"), "--workers", "-1"], "positive number"),
                       (["--out", str(tmp_path / "x"), "--workers", "2", "--scheduler", "tcp://127.0.0.1:1"],
                        "exclusive"),
                       (["--out", str(tmp_path / "x"), "--scheduler", "tcp://127.0.0.1:1"], "no dask scheduler")):
        r = runner.invoke(app, common + extra)
        assert r.exit_code == 2 and why in r.output, (extra, r.output)
    assert tree_hash(tmp_path) == before
