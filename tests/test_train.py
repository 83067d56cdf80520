"""SAE math, trainer and run directories: planted-feature recovery, resume, save/load."""

from __future__ import annotations

import json

import pytest
import torch

from sae.rundir.metrics import read_metrics
from sae.rundir.sae import SAE, SparseCodes
from sae.train import run as run_mod
from sae.train.config import TrainConfig
from sae.train.run import RunDirError, train
from sae.train.sparse_ops import gather_pre_acts
from sae.train.trainer import Trainer
from tests.helpers import planted_features, write_store


def test_sparse_encoder_backward_matches_dense_autograd() -> None:
    torch.manual_seed(0)
    sae = SAE(12, 40, "topk", k=5).double()
    sae.init_weights(torch.Generator().manual_seed(1))
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    x = torch.randn(30, 12, dtype=torch.float64)
    w = torch.randn(30, 5, dtype=torch.float64)
    x_c = x - sae.b_dec
    pre = (x_c @ sae.W_enc + sae.b_enc).detach()
    idx = pre.topk(5, dim=-1).indices
    (gather_pre_acts(x_c, sae.W_enc, sae.b_enc, idx, pre) * w).sum().backward()
    fast = [p.grad.clone() for p in (sae.W_enc, sae.b_enc, sae.b_dec)]
    sae.zero_grad()
    (sae.pre_acts(x).gather(1, idx) * w).sum().backward()
    for a, p in zip(fast, (sae.W_enc, sae.b_enc, sae.b_dec), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_sparse_decode_equals_dense_decode() -> None:
    sae = SAE(8, 30, "topk", k=4)
    sae.init_weights(torch.Generator().manual_seed(0), torch.randn(8))
    x = torch.randn(10, 8)
    codes = sae.encode_sparse(x)
    assert isinstance(codes, SparseCodes) and codes.idx.shape == (10, 4)
    torch.testing.assert_close(sae.decode_sparse(codes), sae.decode(sae.encode(x)))
    assert ((sae.encode(x) > 0).sum(-1) <= 4).all()
    relu = SAE(8, 30, "relu")
    relu.init_weights(torch.Generator().manual_seed(0))
    torch.testing.assert_close(relu(x), relu.decode(relu.encode(x)), atol=1e-5, rtol=1e-5)


def test_init_is_tied_and_unit_norm_and_steps_keep_unit_norm() -> None:
    cfg = TrainConfig(d_sae=64, k=4, batch_size=64, lr=1e-2)
    tr = Trainer(cfg, d_in=16, total_steps=20)
    torch.testing.assert_close(tr.sae.W_enc, tr.sae.W_dec.T)
    assert tr.sae.W_enc.abs().sum() > 0
    for _ in range(5):
        tr.step(torch.randn(64, 16))
        torch.testing.assert_close(tr.sae.W_dec.norm(dim=1), torch.ones(64))
    # gradient projection removes the radial component
    tr.sae.W_dec.grad = torch.randn(64, 16)
    tr.sae.project_decoder_grad_()
    assert (tr.sae.W_dec.grad * tr.sae.W_dec).sum(1).abs().max() < 1e-5


def test_lr_and_l1_schedules() -> None:
    tr = Trainer(TrainConfig(d_sae=32, lr=1e-3, lr_warmup_steps=10, lr_decay_frac=0.2, l1_warmup_frac=0.1,
                             l1_coefficient=2.0),
                 d_in=8, total_steps=100)
    assert tr.lr_at(0) == pytest.approx(1e-4) and tr.lr_at(9) == pytest.approx(1e-3)
    assert tr.lr_at(50) == pytest.approx(1e-3) and tr.lr_at(90) == pytest.approx(5e-4)
    assert tr.lr_at(99) == pytest.approx(5e-5)
    assert tr.l1_at(0) == pytest.approx(0.2) and tr.l1_at(50) == pytest.approx(2.0)


def test_auxk_trains_dead_latents() -> None:
    cfg = TrainConfig(d_sae=64, k=2, batch_size=128, dead_tokens=0)
    tr = Trainer(cfg, d_in=16, total_steps=10)
    tr.tokens_since_fired.fill_(10)  # everything "dead"
    before = tr.sae.W_enc.detach().clone()
    logs = tr.step(torch.randn(128, 16))
    assert logs["auxk"] > 0 and logs["dead_fraction"] == 1.0
    changed = (tr.sae.W_enc.detach() - before).abs().sum(0) > 0
    assert changed.sum() > 2 * 128 // 64  # many more latents than the k active ones got gradient


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory):
    x, feats = planted_features(40_000, d_in=32, n_features=64, active=3, seed=0)
    path = write_store(tmp_path_factory.mktemp("planted") / "p.zarr", x, context_size=64, chunk_tokens=4096)
    return path, feats


def test_training_recovers_planted_features(planted_store, tmp_path) -> None:
    path, feats = planted_store
    cfg = TrainConfig(store=str(path), d_sae=128, k=3, batch_size=256, tokens=256 * 600, lr=3e-3,
                      out=str(tmp_path / "run"), log_every=50, checkpoint_every=1000)
    run_dir = train(cfg, quiet=True)
    sae = SAE.load(run_dir)
    dirs = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    mmcs = (feats @ dirs.T).max(dim=1).values.mean().item()
    assert mmcs > 0.9, mmcs
    m = read_metrics(run_dir)
    assert m[-1]["explained_variance"] > 0.9 and m[-1]["explained_variance"] > m[0]["explained_variance"] + 0.2
    assert {"loss", "fvu", "l0", "dead_fraction", "lr", "tokens"} <= set(m[-1])


def test_saved_sae_works_on_raw_activations(planted_store, tmp_path) -> None:
    path, _ = planted_store
    cfg = TrainConfig(store=str(path), d_sae=64, k=3, batch_size=256, tokens=256 * 20, out=str(tmp_path / "r"))
    run_dir = train(cfg, quiet=True)
    sae = SAE.load(run_dir)
    c = json.loads((run_dir / "cfg.json").read_text())
    for key in ("d_in", "d_sae", "model_name", "hook_name", "hook_layer", "architecture", "activation_fn_str", "k",
                "apply_b_dec_to_input", "dtype", "normalize_activations", "variant", "variant_config",
                "store_fingerprint", "training_tokens", "context_size", "dataset_path"):
        assert key in c, key
    assert c["d_in"] == 32 and c["d_sae"] == 64 and c["k"] == 3 and c["training_tokens"] == 256 * 20
    scale = c["activation_scale_folded"]
    assert scale != 1.0
    # the folded SAE on raw x equals the normalised SAE on s·x, divided by s
    tr = Trainer(cfg, 32, 1)
    tr.sae.load_state_dict({"W_enc": sae.W_enc / scale, "W_dec": sae.W_dec * scale, "b_enc": sae.b_enc,
                            "b_dec": sae.b_dec * scale})
    x = torch.randn(16, 32) * 3
    torch.testing.assert_close(sae(x), tr.sae(x * scale) / scale, atol=1e-5, rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="no sae_weights"):
        SAE.load(tmp_path)


def test_resume_after_kill_ends_with_identical_weights(planted_store, tmp_path, monkeypatch) -> None:
    path, _ = planted_store
    base = dict(store=str(path), d_sae=64, k=3, batch_size=200, tokens=200 * 30, log_every=4, checkpoint_every=7)
    ref = train(TrainConfig(**base, out=str(tmp_path / "ref")), quiet=True)
    real_step = run_mod.Trainer.step
    count = {"n": 0}

    def dying_step(self, x, sync=True):
        if count["n"] == 17:
            raise KeyboardInterrupt("killed")
        count["n"] += 1
        return real_step(self, x, sync)

    monkeypatch.setattr(run_mod.Trainer, "step", dying_step)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base, out=str(cut)), quiet=True)
    monkeypatch.setattr(run_mod.Trainer, "step", real_step)
    assert (cut / "checkpoint.pt").exists() and not (cut / "sae_weights.safetensors").exists()
    with pytest.raises(RunDirError, match="already exists"):
        train(TrainConfig(**base, out=str(cut)), quiet=True)
    train(TrainConfig(**base, out=str(cut), resume=True), quiet=True)
    a, b = SAE.load(ref), SAE.load(cut)
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(a, n), getattr(b, n)), n
    assert read_metrics(ref) == [{**r, "elapsed_s": read_metrics(ref)[i]["elapsed_s"]}
                                 for i, r in enumerate(read_metrics(cut))]
    assert not (cut / "checkpoint.pt").exists()


def test_relu_variant_trains_and_toml_config(planted_store, tmp_path) -> None:
    path, _ = planted_store
    toml = tmp_path / "c.toml"
    toml.write_text(f'store = "{path}"\nvariant = "relu"\nd_sae = 64\nbatch_size = 256\ntokens = 12800\n'
                    'l1_coefficient = 0.5\n')
    cfg = TrainConfig.from_toml(toml, out=str(tmp_path / "relu"))
    assert cfg.activation == "relu" and cfg.l1_coefficient == 0.5
    run_dir = train(cfg, quiet=True)
    m = read_metrics(run_dir)
    assert m[-1]["explained_variance"] > 0.5 and "l1" in m[-1] and m[-1]["l0"] < 64
    assert SAE.load(run_dir).activation == "relu"
    bad = tmp_path / "bad.toml"
    bad.write_text('stor = "x"\n')
    with pytest.raises(ValueError, match="unknown training option 'stor'"):
        TrainConfig.from_toml(bad)
