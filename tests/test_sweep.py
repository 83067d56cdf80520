"""Sweeps: grid expansion, one-pass equivalence with solo training, dask workers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sae.rundir.sae import SAE
from sae.train import run as run_mod
from sae.train.config import TrainConfig
from sae.train.run import train
from sae.train.sweep import expand, max_decoder_cosines, parse_grid, run_sweep, summarize


@pytest.fixture(scope="module")
def store(planted_store_factory):
    return planted_store_factory(8192, d_in=16, n_features=32, active=2, seed=1)


def test_parse_and_expand_grid(tmp_path) -> None:
    g = parse_grid(["topk.k=2,3", "lr=1e-3,3e-4"])
    assert g == {"topk": {"k": ["2", "3"]}, "*": {"lr": ["1e-3", "3e-4"]}}
    base = TrainConfig(store="s", tokens=1000)
    cfgs = expand(base, ["topk", "relu"], parse_grid(["lr=1e-3,3e-4"]), tmp_path)
    assert [(c.variant, c.activation) for c in cfgs] == [("none", "topk")] * 2 + [("none", "relu")] * 2
    assert [Path(c.out).name for c in expand(base, ["none", "ortsae"], {}, tmp_path)] == ["topk", "ortsae"]
    assert [c.lr for c in cfgs] == [1e-3, 3e-4, 1e-3, 3e-4]
    assert cfgs[1].out.endswith("topk-lr=3e-4")
    with pytest.raises(ValueError, match="unknown variant 'nope'"):
        expand(base, ["nope"], {}, tmp_path)
    with pytest.raises(ValueError, match="must look like"):
        parse_grid(["adaptive.alpha"])
    with pytest.raises(ValueError, match="unknown training option 'lrr'"):
        expand(base, ["topk"], parse_grid(["lrr=1"]), tmp_path)


def test_one_pass_sweep_equals_solo_runs_and_reads_once(store, tmp_path, monkeypatch) -> None:
    base = TrainConfig(store=str(store), d_sae=32, k=2, batch_size=256, tokens=256 * 12, log_every=3)
    cfgs = expand(base, ["topk", "relu"], parse_grid(["lr=1e-3,3e-3"]), tmp_path / "sweep")
    reads = {"n": 0}
    real = run_mod.ShuffledBatches._start_window  # once per window read from the store

    def counting(self, *a):
        reads["n"] += 1
        return real(self, *a)

    monkeypatch.setattr(run_mod.ShuffledBatches, "_start_window", counting)
    dirs = run_sweep(cfgs, quiet=True)
    sweep_reads = reads["n"]
    reads["n"] = 0
    solo = train(cfgs[3].__class__(**{**cfgs[3].to_dict(), "adam_betas": (0.9, 0.999),
                                      "out": str(tmp_path / "solo")}), quiet=True)
    assert reads["n"] == sweep_reads  # four SAEs cost the reads of one
    a, b = SAE.load(dirs[3]), SAE.load(solo)
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(a, n), getattr(b, n)), n
    rows = summarize(dirs)
    assert [r["run"] for r in rows] == ["topk-lr=1e-3", "topk-lr=3e-3", "relu-lr=1e-3", "relu-lr=3e-3"]
    assert all(0 <= r["mean_max_cos"] <= 1 for r in rows)
    assert all(r["explained_variance"] > 0.2 for r in rows if r["variant"] == "topk")


def test_max_decoder_cosines_matches_dense() -> None:
    W = torch.randn(50, 8)
    d = W / W.norm(dim=1, keepdim=True)
    c = (d @ d.T).abs()
    c.fill_diagonal_(0)
    torch.testing.assert_close(max_decoder_cosines(W, chunk=7), c.max(1).values)


def test_sweep_over_two_local_dask_workers(store, tmp_path) -> None:
    base = TrainConfig(store=str(store), d_sae=32, k=2, batch_size=256, tokens=256 * 6)
    cfgs = expand(base, ["topk"], parse_grid(["k=2,3,4"]), tmp_path / "dask")
    dirs = run_sweep(cfgs, workers=2, quiet=True)
    assert sorted(p.name for p in dirs) == ["topk-k=2", "topk-k=3", "topk-k=4"]
    solo = train(TrainConfig(**{**cfgs[1].to_dict(), "adam_betas": (0.9, 0.999), "out": str(tmp_path / "s")}),
                 quiet=True)
    a, b = SAE.load(tmp_path / "dask" / "topk-k=3"), SAE.load(solo)
    torch.testing.assert_close(a.W_dec, b.W_dec)


def test_seeds_train_in_one_pass_and_equal_solo_runs_of_that_init_seed(store, tmp_path) -> None:
    """sae sweep --seeds 0,1,2: every configuration once per initialisation seed, one data pass (the same
    data order, --seed); each equals a solo run with that init_seed, and the seeds really differ."""
    from typer.testing import CliRunner

    from sae.cli import app

    r = CliRunner().invoke(app, ["sweep", "--store", str(store), "--variants", "topk", "--seeds", "0,1,2",
                                 "--expansion", "2", "--k", "2", "--tokens", str(256 * 8), "--batch-size", "256",
                                 "--device", "cpu", "--out", str(tmp_path / "sw"), "--quiet"])
    assert r.exit_code == 0, r.output
    runs = sorted((tmp_path / "sw").glob("topk-init_seed=*"))
    assert [p.name for p in runs] == ["topk-init_seed=0", "topk-init_seed=1", "topk-init_seed=2"]
    solo = train(TrainConfig(store=str(store), expansion=2, k=2, tokens=256 * 8, batch_size=256, device="cpu",
                             init_seed=2, out=str(tmp_path / "solo")), quiet=True)
    a, b = SAE.load(runs[2]), SAE.load(solo)
    assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("W_enc", "W_dec", "b_enc", "b_dec"))
    assert not torch.equal(SAE.load(runs[0]).W_dec, a.W_dec)
    r = CliRunner().invoke(app, ["sweep", "--store", str(store), "--seeds", "1,1", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "distinct" in r.output
