"""Data-parallel training of one SAE with torch.distributed (gloo, 127.0.0.1): 2 ranks under a real
``torchrun`` equal 1 process to a stated tolerance for every architecture and every penalty; a
checkpoint resumes with another rank count; a killed rank stops the job with one ``error:`` line and
``--resume`` finishes it. The data-parallel pieces (distributed BatchTopK selection, the loader's
parts) are also checked against their one-process definitions."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from sae.rundir.format import CHECKPOINT_FILE, METRICS_FILE, PENALTY_STATE_FILE, WEIGHTS_FILE
from sae.store import ActivationStore, ShuffledBatches
from sae.train.config import TrainConfig
from sae.train.run import TEST_DELAY_ENV, train_many
from tests.helpers import tree_hash

ATOL = 1e-5
"""Largest |Δ| allowed between a 2-rank and a 1-process run's weights (|W| ≲ 2): the ranks' partial sums
(gradients, Σ‖x − x̄‖²) are added in another order than one GEMM adds them, so the weights agree to
float32 rounding, ~2e-7 after 30 steps here; not bit for bit."""
METRIC_RTOL = 1e-4
BASE = dict(d_sae=64, k=2, batch_size=256, tokens=256 * 30, device="cpu", log_every=5, dead_tokens=512)
CASES = {  # every architecture and every penalty, each at least once
    "topk_pairs": dict(variant="topk_pairs"),
    "topk_dead": dict(variant="none", d_sae=256),  # many dead latents: AuxK and its counters
    "batchtopk_temporal": dict(arch="batchtopk", variant="temporal", variant_params={"window_tokens": 512}),
    "jumprelu_adaptive": dict(arch="jumprelu", variant="adaptive"),
    "jumprelu_anthropic_static": dict(arch="jumprelu", variant="static_ortho",
                                      variant_params={"sparsity_loss": "anthropic"}),
    "relu_progressive": dict(arch="relu", variant="progressive", variant_params={"init_bias": True}),
    "matryoshka_ortsae": dict(arch="matryoshka", variant="ortsae", d_sae=128),
}
DRIVER = """
import json, sys
from sae.train.config import TrainConfig
from sae.train.run import train_many
cfgs = [TrainConfig(**{**d, "adam_betas": tuple(d["adam_betas"])}) for d in json.load(open(sys.argv[1]))]
train_many(cfgs, quiet=True)
"""


@pytest.fixture(scope="module")
def store(planted_store_factory):
    return planted_store_factory(8192, d_in=16, n_features=32, active=2, seed=5)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    return {**env, "HF_HUB_OFFLINE": "1", **extra}


def _cfgs(store: Path, out: Path) -> list[TrainConfig]:
    return [TrainConfig(**{**BASE, "store": str(store), "out": str(out / name), **kw}) for name, kw in CASES.items()]


def _torchrun(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], capture_output=True, text=True, timeout=timeout, env=_env(OMP_NUM_THREADS="1"))


def _compare(a: Path, b: Path) -> float:
    """Max |Δ| of the weights (and penalty state) of two run directories; metrics agree to METRIC_RTOL."""
    wa, wb = load_file(a / WEIGHTS_FILE), load_file(b / WEIGHTS_FILE)
    assert wa.keys() == wb.keys()
    worst = max(float((wa[n] - wb[n]).abs().max()) for n in wa)
    if (a / PENALTY_STATE_FILE).exists():
        pa, pb = load_file(a / PENALTY_STATE_FILE), load_file(b / PENALTY_STATE_FILE)
        for n in pa:
            assert pa[n].shape == pb[n].shape, (a.name, n)
            if pa[n].is_floating_point():
                worst = max(worst, float((pa[n].double() - pb[n].double()).abs().max()))
            else:
                assert torch.equal(pa[n], pb[n]), (a.name, n)
    ma = [json.loads(x) for x in (a / METRICS_FILE).read_text().splitlines()]
    mb = [json.loads(x) for x in (b / METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    for ra, rb in zip(ma, mb, strict=True):
        assert set(ra) == set(rb), a.name
        for key, va in ra.items():
            if key != "elapsed_s" and isinstance(va, float):
                assert rb[key] == pytest.approx(va, rel=METRIC_RTOL, abs=1e-6), (a.name, ra["step"], key)
    ca, cb = json.loads((a / "cfg.json").read_text()), json.loads((b / "cfg.json").read_text())
    for key in ("batchtopk_threshold", "training_steps"):
        if key in ca:
            assert cb[key] == pytest.approx(ca[key], rel=METRIC_RTOL)
    return worst


def test_two_ranks_under_torchrun_equal_one_process_for_every_arch_and_penalty(store, tmp_path) -> None:
    spec = tmp_path / "cfgs.json"
    spec.write_text(json.dumps([c.to_dict() for c in _cfgs(store, tmp_path / "ddp")]))
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    r = _torchrun([str(driver), str(spec)])
    assert r.returncode == 0, r.stderr[-3000:]
    train_many(_cfgs(store, tmp_path / "one"), quiet=True)
    for name in CASES:
        worst = _compare(tmp_path / "one" / name, tmp_path / "ddp" / name)
        assert worst <= ATOL, (name, worst)
    lines = (tmp_path / "one/topk_dead" / METRICS_FILE).read_text().splitlines()
    dead = [json.loads(x)["dead_fraction"] for x in lines]
    assert max(dead) > 0.1  # the dead-latent counters and AuxK were exercised
    assert not any((tmp_path / "ddp" / n / CHECKPOINT_FILE).exists() for n in CASES)


def _train_cmd(store: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sae", "train", "--store", str(store), "--variant", "topk_pairs", "--d-sae", "64",
            "--k", "2", "--batch-size", "256", "--tokens", str(256 * 40), "--log-every", "5",
            "--checkpoint-every", "5", "--out", str(out), "--quiet", *extra]


def _ranks(launcher: psutil.Process) -> dict[int, psutil.Process]:
    out = {}
    for p in launcher.children(recursive=True):
        try:
            rank = p.environ().get("RANK")
        except psutil.Error:
            continue
        if rank is not None and "sae" in " ".join(p.cmdline()):
            out[int(rank)] = p
    return out


def test_a_killed_rank_stops_the_job_with_one_error_line_and_resume_with_one_rank_finishes(store, tmp_path) -> None:
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(store, ref), check=True, capture_output=True, env=_env(), timeout=120)
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(store, run, "--nproc", "2"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=_env(**{TEST_DELAY_ENV: "0.15"}))
    killed = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if (run / CHECKPOINT_FILE).exists():
            ranks = _ranks(psutil.Process(proc.pid))
            if 1 in ranks:
                killed = ranks[1].pid
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    assert killed is not None, "no rank was killed: the test did not exercise anything"
    assert proc.returncode != 0
    lines = [x for x in err.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 of 2 was killed by SIGKILL"), err
    assert not (run / WEIGHTS_FILE).exists() and (run / CHECKPOINT_FILE).exists()  # nothing half-written
    step = torch.load(run / CHECKPOINT_FILE, weights_only=False)["trainer"]["step"]
    assert 0 < step < 40
    assert f"keeps its checkpoint at step {step}: rerun the same command with --resume" in lines[0]
    r = subprocess.run(_train_cmd(store, run, "--resume"), capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert not (run / CHECKPOINT_FILE).exists()
    assert _compare(ref, run) <= ATOL


def test_a_one_process_checkpoint_resumes_on_two_ranks(store, tmp_path) -> None:
    ref = tmp_path / "ref"
    subprocess.run(_train_cmd(store, ref), check=True, capture_output=True, env=_env(), timeout=120)
    run = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(store, run), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env(**{TEST_DELAY_ENV: "0.1"}))
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (run / CHECKPOINT_FILE).exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    r = subprocess.run(_train_cmd(store, run, "--resume", "--nproc", "2"), capture_output=True, text=True,
                       env=_env(), timeout=180)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines() == [f"saved {run}"]
    assert _compare(ref, run) <= ATOL


def test_refusals_come_before_any_rank_or_directory(store, tmp_path) -> None:
    before = tree_hash(tmp_path)
    r = subprocess.run(_train_cmd(store, tmp_path / "run", "--nproc", "3"), capture_output=True, text=True,
                       env=_env(), timeout=60)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "multiple of 3" in r.stderr
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    before = tree_hash(tmp_path)
    r = subprocess.run(_train_cmd(store, tmp_path / "theirs", "--nproc", "2", "--overwrite"), capture_output=True,
                       text=True, env=_env(), timeout=60)
    assert r.returncode == 2 and r.stderr.count("error:") == 1 and "not an sae run directory" in r.stderr
    assert tree_hash(tmp_path) == before


def test_an_error_every_rank_meets_is_printed_once(store, tmp_path) -> None:
    """Under raw torchrun (no launcher check first): the run directory is refused by both ranks, and
    only rank 0 prints it."""
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    r = _torchrun(["-m", "sae", *_train_cmd(store, tmp_path / "theirs", "--overwrite")[3:]], timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("error: ") == 1 and "not an sae run directory" in r.stderr
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"


def test_the_ranks_parts_of_a_batch_are_the_one_process_batch(store) -> None:
    """Each rank keeps only its rows of every window; together they are the one-process batches, across
    window and epoch boundaries (≈ 4 000 rows per window, 8 064 per epoch), from a cursor that is or
    is not a multiple of the batch (a resume, a custom ``start_row``)."""
    s = ActivationStore(str(store))
    hook = s.default_hook(None)
    for start, world in [(512, 4), (300, 2), (0, 2)]:
        whole = ShuffledBatches(s, hook, 256, seed=3, start_row=start)
        parts = [ShuffledBatches(s, hook, 256, seed=3, start_row=start, part=(r, world)) for r in range(world)]
        for n, (b, *ps) in enumerate(zip(whole, *parts, strict=False), start=1):
            assert all(p.shape[0] == 256 // world for p in ps)
            assert torch.equal(b, torch.cat(ps)), (start, world, n)
            if n == 40:  # 10 240 rows: past two window boundaries and the end of the first epoch
                break
        assert all(p.rows_consumed == whole.rows_consumed == start + 40 * 256 for p in parts)
    with pytest.raises(ValueError, match="equal parts"):
        ShuffledBatches(s, hook, 250, part=(0, 4))


class _ThreadCollective:
    """W in-process "ranks" for the distributed BatchTopK selection: ``cat`` returns every part."""

    def __init__(self, parts: list[torch.Tensor], rank: int) -> None:
        self.parts, self.rank, self.world = parts, rank, len(parts)

    active = True

    def cat(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.parts)


def test_distributed_batchtopk_selection_equals_the_flat_top_B_times_k(monkeypatch) -> None:
    """The reference is the definition: the (B·k)-th largest of ReLU(pre) over the whole batch, every
    entry ≥ it kept (here with ties and with fewer positive entries than B·k)."""
    from sae.train.archs.batchtopk import BatchTopK, batch_topk_select

    g = torch.Generator().manual_seed(0)
    for pre, k in [(torch.randn(64, 40, generator=g), 3),
                   (torch.randn(64, 40, generator=g).round(decimals=1), 5),       # many ties
                   (torch.randn(64, 40, generator=g) - 3.0, 8)]:                    # few positive entries
        flat = torch.relu(pre).reshape(-1)
        n = pre.shape[0] * k
        tau = flat.sort(descending=True).values[n - 1]
        want = {(int(i) // 40, int(i) % 40) for i in ((flat >= tau) & (flat > 0)).nonzero().squeeze(1)}
        for world in (2, 4):
            chunks = pre.chunk(world)
            local = [batch_topk_select(c, k * world)[:2] for c in chunks]
            cand = [c[r, lat] for c, (r, lat) in zip(chunks, local, strict=True)]
            got = set()
            for rank, c in enumerate(chunks):
                arch = BatchTopK(40, 40, k, BatchTopK.Config(), None)
                arch.dist = _ThreadCollective(cand, rank)  # type: ignore[assignment]
                rows, lat, t = arch.select_global(c)
                got |= {(int(a) + rank * c.shape[0], int(b)) for a, b in zip(rows, lat, strict=True)}
                assert float(t) == pytest.approx(float(tau) if (flat > 0).sum() >= n else 0.0)
            assert got == want, (world, k)


class _Mirror:
    """A 2-rank collective whose other rank holds the same rows as this one (every sum doubles, every
    gather repeats): the data-parallel code paths of a step, in one process, to count host reads and
    collective calls."""

    rank, world, active, is_writer = 0, 2, True, True

    def __init__(self) -> None:
        self.calls: list[str] = []

    def sum_(self, t):
        self.calls.append("sum")
        return t.mul_(2)

    def min_(self, t):
        self.calls.append("min")
        return t

    def max_(self, t):
        self.calls.append("max")
        return t

    def cat(self, t):
        self.calls.append("cat")
        return torch.cat([t, t])

    def grads_(self, params):
        for p in params:
            self.sum_(p.grad)

    def gather_codes(self, codes, fixed_width=False):
        from sae.rundir.sae import SparseCodes

        self.calls.append("gather_codes")
        return SparseCodes(torch.cat([codes.vals.detach()] * 2), torch.cat([codes.idx] * 2))


@pytest.mark.parametrize("variant", ["none", "static_ortho"])
def test_a_data_parallel_topk_step_adds_no_host_read(monkeypatch, variant) -> None:
    """The existing sync-free harness (tests/test_scale.py) on the data-parallel step: no host read on
    non-log steps; the collectives it adds per step are counted (one for the batch mean, one for
    Σ‖x − x̄‖², one per parameter's gradient, one for the firing counts)."""
    from sae.train.trainer import Trainer
    from tests.test_scale import count_host_reads

    mirror = _Mirror()
    cfg = TrainConfig(d_sae=256, k=8, batch_size=128, variant=variant, dead_tokens=1000)
    tr = Trainer(cfg, d_in=32, total_steps=50, dist=mirror)  # type: ignore[arg-type]
    tr.tokens_since_fired[:40] = 10_000  # dead latents: AuxK on
    x = torch.randn(10, 64, 32)
    tr.step(x[0], sync=True)
    assert tr.aux_cap > 0
    mirror.calls.clear()
    with count_host_reads(monkeypatch) as calls:
        for i in range(1, 10):
            logs = tr.step(x[i], sync=False)
    assert calls == [], f"host reads on non-log steps: {sorted(set(calls))}"
    assert "auxk" in logs
    assert mirror.calls == ["sum", "sum", *["sum"] * 4, "sum"] * 9  # mean, Σ‖x − x̄‖², 4 gradients, counts


def test_a_mirrored_rank_trains_exactly_like_one_process_on_the_doubled_batch() -> None:
    """Two ranks holding identical halves are one process on the batch stacked twice: same loss terms
    (the FVU's x̄ and Σ‖x − x̄‖² are of the doubled batch), same gradients (up to the order of sums)."""
    from sae.train.trainer import Trainer

    for arch, variant in [("topk", "topk_pairs"), ("jumprelu", "none"), ("batchtopk", "temporal")]:
        kw = dict(d_sae=128, k=4, batch_size=128, arch=arch, variant=variant, dead_tokens=100)
        one = Trainer(TrainConfig(**kw), d_in=16, total_steps=20)
        two = Trainer(TrainConfig(**kw), d_in=16, total_steps=20, dist=_Mirror())  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(1)
        for _ in range(6):
            x = torch.randn(64, 16, generator=g)
            a, b = one.step(torch.cat([x, x])), two.step(x)
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (arch, variant)
            assert b["fvu"] == pytest.approx(a["fvu"], rel=1e-5)
            assert b["l0"] == pytest.approx(a["l0"], rel=1e-6)
        for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
            torch.testing.assert_close(getattr(two.sae, n), getattr(one.sae, n), atol=1e-5, rtol=0)
        assert torch.equal(two.tokens_since_fired, one.tokens_since_fired)


def test_a_sweep_under_torchrun_is_refused_in_one_line(store, tmp_path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from sae.cli import app

    monkeypatch.setenv("WORLD_SIZE", "2")
    r = CliRunner().invoke(app, ["sweep", "--store", str(store), "--variants", "none", "--out", str(tmp_path / "s")])
    assert r.exit_code == 2 and "does not run under torchrun" in r.output and r.output.count("error:") == 1
    assert list(tmp_path.iterdir()) == []
