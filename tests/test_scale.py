"""Device-speed properties that can be checked on the CPU: a sync-free training step, AuxK over the
dead columns only (against the dense definition), parallel decode and on-device dequantisation in
the loader, bf16 autocast. The CUDA-only halves are marked ``cuda`` and skipped without a GPU."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import pytest
import torch

from sae.train.config import TrainConfig
from sae.train.trainer import Trainer

from .helpers import write_store

HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


@contextlib.contextmanager
def count_host_reads(monkeypatch: pytest.MonkeyPatch):
    """Count every Python-level device→host read of a tensor value while the block runs."""
    calls: list[str] = []
    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, __real=real, __name=name, **kw):
            calls.append(__name)
            return __real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    try:
        yield calls
    finally:
        monkeypatch.undo()


def _trainer(variant: str = "none", d_in: int = 32, d_sae: int = 256, dead: int = 0, **kw) -> Trainer:
    cfg = TrainConfig(d_sae=d_sae, k=8, batch_size=128, variant=variant, dead_tokens=1000, **kw)
    tr = Trainer(cfg, d_in=d_in, total_steps=50)
    if dead:
        tr.tokens_since_fired[:dead] = 10_000  # the first `dead` latents are dead
    return tr


@pytest.mark.parametrize("variant", ["none", "static_ortho"])
@pytest.mark.parametrize("dead", [0, 40])
def test_topk_step_reads_nothing_back_on_non_log_steps(monkeypatch: pytest.MonkeyPatch, variant: str,
                                                       dead: int) -> None:
    tr = _trainer(variant, dead=dead)
    x = torch.randn(10, 128, 32)
    tr.step(x[0], sync=True)  # a log step sizes AuxK's capacity (one read, allowed there)
    assert (tr.aux_cap > 0) == (dead > 0)
    with count_host_reads(monkeypatch) as calls:
        for i in range(1, 10):
            logs = tr.step(x[i], sync=False)
    assert calls == [], f"host reads on non-log steps: {sorted(set(calls))}"
    assert all(isinstance(v, torch.Tensor | float) for v in logs.values())
    if dead:
        assert "auxk" in logs
    # the harness does see reads: a log step makes (few) of them
    with count_host_reads(monkeypatch) as calls:
        logs = tr.step(x[0], sync=True)
    assert 0 < len(calls) <= 4 and isinstance(logs["loss"], float) and math.isfinite(logs["loss"])


@pytest.mark.parametrize("trackers", [[], ["tensorboard", "mlflow", "wandb"]])
def test_sweep_loop_reads_nothing_back_between_log_steps(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         trackers: list[str]) -> None:
    """``train_many`` (a sweep of two SAEs from one stream), with or without experiment trackers, reads
    no tensor value on the loop's thread from the start of a non-log step to the start of the next step:
    the step itself, the metrics writer, the trackers and the progress bar all stay off the device."""
    import threading

    from sae.tracking import TrackingConfig
    from sae.train.run import train_many

    for t in trackers:
        pytest.importorskip(t)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)  # W&B's offline files
    x = torch.randn(4096, 16)
    store = write_store(tmp_path / "s.zarr", x, context_size=64, chunk_tokens=1024)
    cfgs = [TrainConfig(store=str(store), out=str(tmp_path / f"r{i}"), d_sae=64, k=4, batch_size=256,
                        tokens=256 * 12, log_every=5, lr=lr, dead_tokens=300) for i, lr in enumerate((1e-3, 3e-4))]
    tracking = (TrackingConfig(backends=trackers, dir=str(tmp_path / "tracking"),
                               mlflow_uri=f"sqlite:///{tmp_path / 'mlflow.db'}") if trackers else None)
    real_step = Trainer.step
    loop_thread = threading.get_ident()
    state = {"sync": True}  # the kind of the step most recently started (True before the first)
    calls: list[tuple[bool, str]] = []

    def step(self, xb, sync=True):
        state["sync"] = sync
        return real_step(self, xb, sync)

    for name in HOST_READS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, __real=real, __name=name, **kw):
            if threading.get_ident() == loop_thread:
                calls.append((state["sync"], __name))
            return __real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    monkeypatch.setattr(Trainer, "step", step)
    runs = train_many(cfgs, quiet=True, tracking=tracking)
    monkeypatch.undo()
    assert [c for c in calls if not c[0]] == []
    assert any(c[0] for c in calls)  # log steps (0, 5, 10, 11) did read
    for i in range(2):
        lines = (tmp_path / f"r{i}" / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 4  # steps 0, 5, 10 and the last
    if trackers:  # the trackers did receive the log steps
        import json

        refs = json.loads((runs[0] / "cfg.json").read_text())["tracking"]
        assert set(refs) == set(trackers)


# -- AuxK against the dense definition -------------------------------------------------------------
def _dense_auxk(x: torch.Tensor, x_hat: torch.Tensor, W_enc, b_enc, W_dec, b_dec, dead: torch.Tensor,
                aux_k: int) -> torch.Tensor:
    """Gao et al. 2024 App. A.2, written densely in float64: top-k_aux dead pre-activations per token,
    k_aux = min(aux_k, n_dead), decoded without bias, against the detached residual e = x − x̂;
    normalised by Σ‖x − x̄‖² and scaled by min(1, n_dead / aux_k)."""
    n_dead = int(dead.sum())
    pre = (x - b_dec) @ W_enc + b_enc                                   # [B, F]
    masked = torch.where(dead, pre, torch.full_like(pre, -math.inf))
    k_aux = min(aux_k, n_dead)
    top = masked.topk(k_aux, dim=1).indices
    f = torch.zeros_like(pre).scatter(1, top, torch.relu(pre.gather(1, top)))
    e_hat = f @ W_dec
    e = (x - x_hat).detach()
    total_var = (x - x.mean(0)).pow(2).sum()
    return (e_hat - e).pow(2).sum() / total_var * min(1.0, n_dead / aux_k)


@pytest.mark.parametrize("n_dead,aux_k", [(40, 16), (10, 16), (5, 16), (200, 64)])
def test_auxk_over_dead_columns_matches_the_dense_definition(n_dead: int, aux_k: int) -> None:
    torch.manual_seed(0)
    tr = _trainer(dead=0, aux_k=aux_k)
    perm = torch.randperm(256)
    tr.tokens_since_fired[perm[:n_dead]] = 5000 + torch.arange(n_dead)  # scattered dead latents
    tr.refresh_aux_capacity()
    assert tr.aux_cap >= n_dead
    sae = tr.sae
    x = torch.randn(64, 32)
    x_hat = x + 0.3 * torch.randn(64, 32)
    dead = tr.tokens_since_fired > tr.cfg.dead_tokens
    x_c = x - sae.b_dec
    pre = (x_c @ sae.W_enc + sae.b_enc).detach()
    total_var = (x - x.mean(0)).pow(2).sum()
    aux, overflow = tr._auxk(x, x - x_hat, pre, dead, total_var)
    assert not bool(overflow)
    params = [sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec]
    g = torch.autograd.grad(aux, params)
    P = [p.detach().double().requires_grad_() for p in params]
    ref = _dense_auxk(x.double(), x_hat.double(), P[0], P[1], P[2], P[3], dead, aux_k)
    g_ref = torch.autograd.grad(ref, P)
    assert float(aux.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    for a, b in zip(g, g_ref, strict=True):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-7)


def test_auxk_capacity_overflow_is_flagged_and_uses_the_stalest() -> None:
    tr = _trainer(aux_k=16)
    tr.tokens_since_fired[:20] = 5000
    tr.refresh_aux_capacity()
    assert tr.aux_cap == 84  # n_dead + a margin of 64
    tr.tokens_since_fired[20:120] = 2000  # more die before the next log step
    x = torch.randn(64, 32)
    dead = tr.tokens_since_fired > tr.cfg.dead_tokens
    x_c = x - tr.sae.b_dec
    pre = (x_c @ tr.sae.W_enc + tr.sae.b_enc).detach()
    _, overflow = tr._auxk(x, x, pre, dead, x.pow(2).sum())
    assert bool(overflow)


# -- the loader: parallel decode, stored-form shuffle, device dequantisation -----------------------
def _stream(store_path: Path, n: int = 6, **kw) -> list[torch.Tensor]:
    from sae.store import ActivationStore, ShuffledBatches

    s = ActivationStore(store_path)
    loader = ShuffledBatches(s, s.hook_names[0], 300, seed=3, mix_chunks=2, scale=0.5, **kw)
    it = iter(loader)
    out = [next(it).clone() for _ in range(n)]
    it.close()
    return out


@pytest.fixture(scope="module")
def codec_stores(tmp_path_factory) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6000, 24, generator=g) * 3
    root = tmp_path_factory.mktemp("codecs")
    return {f"{c}-{d}": write_store(root / f"{c}-{d}.zarr", x, chunk_tokens=512, codec=c, dtype=d)
            for c, d in (("zstd", "float32"), ("zstd", "bfloat16"), ("int8", "float32"), ("fp8", "float32"))}


@pytest.mark.parametrize("codec", ["zstd-float32", "zstd-bfloat16", "int8-float32", "fp8-float32"])
def test_stream_is_identical_for_any_number_of_decode_threads(codec_stores, codec: str) -> None:
    path = codec_stores[codec]
    ref = _stream(path, read_workers=1, prefetch=1)
    for workers, prefetch in ((2, 2), (7, 3)):
        got = _stream(path, read_workers=workers, prefetch=prefetch)
        assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True)), (workers, prefetch)


def test_windows_are_staged_in_their_stored_form(codec_stores) -> None:
    """The window is shuffled as stored (int8/fp8 codes + scales, bf16 bits) and dequantised after,
    so 1–2 bytes per value (+ 4 per row) are staged instead of 4. (The values are the loader's
    definition: tests/test_chunk_decode.py.)"""
    from sae.store import ActivationStore, ShuffledBatches

    for path in codec_stores.values():
        s = ActivationStore(path)
        b = ShuffledBatches(s, s.hook_names[0], 300, seed=3, mix_chunks=2, scale=0.5)
        it = iter(b)
        for _ in range(8):
            next(it)
        it.close()
        item = 1 if s.codec.has_scale else (4 if s.codec.dtype == "float32" else 2)
        per_row = s.d_model * item + (4 if s.codec.has_scale else 0)
        assert b.bytes_staged == b.bytes_read > 0 and b.bytes_staged % per_row == 0, path.name
        if item < 4:
            assert per_row < 4 * s.d_model  # fewer bytes than float32 rows


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stream_matches_cpu_and_never_syncs(codec_stores) -> None:
    from sae.store import ActivationStore, ShuffledBatches

    for path in codec_stores.values():
        s = ActivationStore(path)
        cpu = iter(ShuffledBatches(s, s.hook_names[0], 300, seed=3, mix_chunks=2, scale=0.5))
        gpu = iter(ShuffledBatches(s, s.hook_names[0], 300, seed=3, mix_chunks=2, scale=0.5, device="cuda"))
        first = next(gpu)  # the pipeline has started
        assert first.is_cuda and torch.equal(first.cpu(), next(cpu))
        torch.cuda.set_sync_debug_mode("error")
        try:
            got = [next(gpu) for _ in range(6)]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        for g in got:
            assert torch.equal(g.cpu(), next(cpu)), path.name


# -- precision -------------------------------------------------------------------------------------
def test_autocast_bf16_runs_the_encoder_gemm_in_bf16_and_keeps_fp32_state() -> None:
    from sae.train.sparse_ops import dense_pre_no_grad

    g = torch.Generator().manual_seed(1)
    x, W, b = torch.randn(64, 32, generator=g), torch.randn(32, 256, generator=g), torch.randn(256, generator=g)
    exact = x.double() @ W.double() + b.double()
    fp32 = dense_pre_no_grad(x, W, b).clone()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = dense_pre_no_grad(x, W, b).clone()
    assert low.dtype == torch.float32
    err32, err16 = (fp32.double() - exact).abs().max(), (low.double() - exact).abs().max()
    assert err16 > 100 * err32  # really computed in bf16 ...
    assert err16 < 0.02 * exact.abs().max()  # ... to bf16 precision

    def train(autocast: str) -> tuple[Trainer, float]:
        torch.manual_seed(0)
        tr = _trainer(autocast=autocast)
        data = torch.randn(4096, 8) @ torch.randn(8, 32)  # low-rank: learnable
        logs = {}
        for i in range(60):
            logs = tr.step(data[(i * 128) % 4096:][:128], sync=i == 59)
        return tr, logs["explained_variance"]

    tr16, ev16 = train("bf16")
    tr32, ev32 = train("none")
    assert all(p.dtype == torch.float32 for p in tr16.sae.parameters())
    assert all(v.dtype == torch.float32 for s in tr16.opt.state.values() for v in s.values() if v.is_floating_point())
    assert ev32 > 0.4 and abs(ev16 - ev32) < 0.02, (ev16, ev32)
    assert not torch.equal(tr16.sae.W_enc, tr32.sae.W_enc)  # bf16 changed the arithmetic


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("autocast", ["none", "bf16"])
def test_cuda_topk_step_is_sync_free(autocast: str) -> None:
    cfg = TrainConfig(d_sae=4096, k=32, batch_size=1024, dead_tokens=1000, autocast=autocast)
    tr = Trainer(cfg, d_in=256, total_steps=50, device="cuda")
    tr.tokens_since_fired[:300] = 10_000  # AuxK active
    x = torch.randn(10, 1024, 256, device="cuda")
    tr.step(x[0], sync=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 10):
            tr.step(x[i], sync=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    logs = tr.step(x[0], sync=True)
    assert math.isfinite(logs["loss"]) and logs["auxk"] > 0
