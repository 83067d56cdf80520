"""The architectures (``--arch``): BatchTopK, JumpReLU, Matryoshka BatchTopK (and TopK/ReLU through
the same interface), each checked against a plain dense reference written from its paper, plus
save → load, resume exactness, composition with every penalty, the SAELens-layout fields and the CLI.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from sae.cli import app
from sae.rundir.sae import SAE, SparseCodes
from sae.train.archs import arch_names, build_arch
from sae.train.archs.batchtopk import batch_topk_select
from sae.train.config import TrainConfig
from sae.train.run import train, train_many
from sae.train.trainer import Trainer
from sae.train.variants import variant_names
from tests.helpers import planted_features

pytestmark = pytest.mark.usefixtures("one_thread")
NEW_ARCHS = ("batchtopk", "jumprelu", "matryoshka")


@pytest.fixture(scope="module")
def store(planted_store_factory) -> Path:
    return planted_store_factory(n_tokens=4096, d_in=16, n_features=32, active=2)


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = dict(store=str(store), out=str(out), d_sae=64, k=4, batch_size=256, tokens=256 * 12, lr=3e-3,
                lr_warmup_steps=2, device="cpu", checkpoint_every=4, log_every=1)
    return TrainConfig(**{**base, **kw})


def _dense(codes: SparseCodes, d_sae: int) -> torch.Tensor:
    return codes.vals.new_zeros(codes.vals.shape[0], d_sae).scatter_add(1, codes.idx, codes.vals)


# -- BatchTopK ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("guess", [None, "low", "high", "exact"])
@pytest.mark.parametrize("skew", [False, True])
def test_batchtopk_selection_equals_the_flat_top_B_times_k(skew: bool, guess: str | None) -> None:
    g = torch.Generator().manual_seed(1)
    B, F, k = 96, 200, 5
    pre = torch.randn(B, F, generator=g)
    if skew:  # a few tokens hold far more than 2k of the batch's top entries
        pre[:3] += 4.0
    # reference (Bussmann et al. 2024): keep the B·k largest entries of ReLU(pre) over the whole batch
    acts = pre.relu().flatten()
    top = acts.topk(B * k).indices
    ref = torch.zeros_like(acts, dtype=torch.bool)
    ref[top] = True
    ref = ref.view(B, F) & (pre > 0)
    tau_ref = float(acts[top].min())
    # the guess only sets the cost: too low (many candidates), too high (falls back), exact
    lo = {None: None, "low": 0.1 * tau_ref, "high": 3 * tau_ref, "exact": tau_ref}[guess]
    rows, lat, tau = batch_topk_select(pre, k, lo)
    got = torch.zeros(B, F, dtype=torch.bool)
    got[rows, lat] = True
    assert torch.equal(got, ref)
    assert rows.numel() == B * k and float(tau) == tau_ref
    assert torch.equal(rows * F + lat, (rows * F + lat).sort().values)  # (token, latent) order: ragged form
    codes = SparseCodes.ragged(rows, lat, pre[rows, lat], B)
    assert codes.idx.shape[1] == int(ref.sum(1).max())  # its padded form: to the largest per-token count
    assert torch.equal(codes.to_dense(F) > 0, ref) and torch.equal(_dense(codes, F) > 0, ref)
    counts = ref.sum(1)
    if skew:
        assert int(counts.max()) > 2 * k and int(counts.min()) < k  # per-token L0 varies


def test_batchtopk_keeps_every_positive_entry_when_fewer_than_B_times_k_are_positive() -> None:
    pre = -torch.rand(8, 50)
    pre[0, :3] = torch.tensor([0.5, 0.2, 0.1])
    pre[5, 7] = 0.3
    rows, lat, tau = batch_topk_select(pre, 4)
    assert rows.tolist() == [0, 0, 0, 5] and lat.tolist() == [0, 1, 2, 7] and float(tau) == 0.0
    pre[1, 1] = pre[1, 2] = 0.3
    pre[2, :3] = pre[3, 4] = 0.2  # positives 0.5, 0.3 ×3, 0.2 ×5, 0.1: the 8th largest is tied with two more
    for guess in (None, 0.25, 0.01):
        rows, lat, tau = batch_topk_select(pre, 1, guess)
        assert float(tau) == pytest.approx(0.2) and rows.numel() == 9  # ties at τ are all kept


def test_batchtopk_threshold_is_a_running_estimate_of_the_smallest_kept_activation() -> None:
    cfg = TrainConfig(arch="batchtopk", k=3, d_sae=40, arch_params={"threshold_lr": 0.25})
    arch = build_arch("batchtopk", 8, 40, 3, cfg.arch_params, cfg)
    mins, expected = [0.8, 0.4, 1.2, 0.6], None
    for m in mins:
        vals = torch.tensor([[m, 2.0, 0.0], [3.0, m + 0.5, 0.0]])
        arch.update_threshold(SparseCodes(vals, torch.tensor([[0, 1, 2], [3, 4, 5]])))
        expected = m if expected is None else 0.75 * expected + 0.25 * m  # θ₀ = first minimum, then the EMA
        assert float(arch.threshold) == pytest.approx(expected)


def test_batchtopk_saved_as_jumprelu_matches_the_batch_selection_in_L0() -> None:
    """At inference each token is encoded alone with threshold θ; on stationary data its mean L0 must
    be close to the training target k (θ estimates the batch threshold)."""
    x, _ = planted_features(8192, d_in=16, n_features=48, active=3, seed=4)
    cfg = TrainConfig(arch="batchtopk", k=6, d_sae=96, lr=3e-3, lr_warmup_steps=2, batch_size=512, tokens=512 * 120,
                      device="cpu", arch_params={"threshold_lr": 0.05})
    tr = Trainer(cfg, 16, 120, b_dec_init=x.mean(0))
    g = torch.Generator().manual_seed(0)
    for _ in range(120):
        logs = tr.step(x[torch.randint(0, 4096, (512,), generator=g)])
    assert logs["l0"] == pytest.approx(6.0)          # BatchTopK: exactly k on average in training
    inf = tr.inference_sae()
    assert inf.activation == "jumprelu" and torch.all(inf.threshold == inf.threshold[0])
    held_out = x[4096:]
    l0 = float((inf.encode(held_out) > 0).sum(1).float().mean())
    assert abs(l0 - 6.0) / 6.0 < 0.15, l0
    # and the per-token JumpReLU encoding equals ReLU(pre)·1[pre > θ]
    pre = (held_out - inf.b_dec) @ inf.W_enc + inf.b_enc
    assert torch.equal(inf.encode(held_out), pre.relu() * (pre > inf.threshold))


# -- JumpReLU -------------------------------------------------------------------------------------------
def _rect(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).float()


@pytest.mark.parametrize("target", [0.0, 6.0])
def test_jumprelu_ste_gradients_match_the_paper(target: float) -> None:
    """Dense reference of Rajamanoharan et al. 2024 (eqs. 11-12): ∂f/∂pre = H(pre − θ); ∂f/∂θ =
    −(θ/ε)K((pre − θ)/ε); ∂H/∂θ = −(1/ε)K(...); the L0 term sends no gradient to pre."""
    g = torch.Generator().manual_seed(0)
    B, d, F, eps, lam = 64, 8, 32, 0.4, 0.7
    x = torch.randn(B, d, generator=g) * 2
    cfg = TrainConfig(arch="jumprelu", k=4, d_sae=F, arch_params={"bandwidth": eps, "l0_coefficient": lam,
                                                                   "target_l0": target, "init_threshold": 0.5})
    sae = SAE(d, F, "relu")
    sae.init_weights(torch.Generator().manual_seed(1), x.mean(0))
    with torch.no_grad():
        sae.b_enc.copy_(torch.randn(F, generator=g) * 0.3)
    arch = build_arch("jumprelu", d, F, 4, cfg.arch_params, cfg)
    with torch.no_grad():
        arch.log_threshold.copy_((0.3 + torch.rand(F, generator=g)).log())
    total_var = (x - x.mean(0)).pow(2).sum()
    enc = arch.encode(sae, x - sae.b_dec, 100, 100, torch.zeros(F, dtype=torch.bool))
    loss, _, _ = arch.reconstruction(sae, x, enc.codes, total_var)
    (loss + sum(enc.losses.values())).backward()

    # reference, dense and by hand
    W_enc, b_enc = sae.W_enc.detach().clone().requires_grad_(), sae.b_enc.detach().clone().requires_grad_()
    W_dec, b_dec = sae.W_dec.detach().clone().requires_grad_(), sae.b_dec.detach().clone().requires_grad_()
    theta = arch.log_threshold.detach().exp()
    pre = (x - b_dec) @ W_enc + b_enc
    H = (pre > theta).float()
    f = pre * H.detach()                                   # gradient to pre is H (no STE on pre)
    f.retain_grad()
    x_hat = f @ W_dec + b_dec
    rec = (x - x_hat).pow(2).sum() / total_var
    L0 = H.sum() / B
    rec.backward()
    g_f = f.grad
    kern = _rect((pre.detach() - theta) / eps)
    d_theta = (g_f * (-(theta / eps)) * kern).sum(0)
    dsp_dL0 = lam * 2 * (L0 / target - 1) / target if target > 0 else lam
    d_theta = d_theta + dsp_dL0 * (-(1 / eps) * kern).sum(0) / B
    assert float(kern.sum()) > 10  # the band is populated: the θ gradient is really exercised
    assert torch.allclose(sae.W_enc.grad, W_enc.grad, atol=1e-6)
    assert torch.allclose(sae.b_enc.grad, b_enc.grad, atol=1e-6)
    assert torch.allclose(sae.W_dec.grad, W_dec.grad, atol=1e-6)
    assert torch.allclose(sae.b_dec.grad, b_dec.grad, atol=1e-6)
    assert torch.allclose(arch.log_threshold.grad, d_theta * theta, atol=1e-6)  # chain rule through exp
    assert enc.logs["l0_surrogate"] == pytest.approx(float(L0))
    assert torch.equal(_dense(enc.codes, F), (pre * H).detach())


def test_jumprelu_anthropic_tanh_and_dead_preact_losses_match_a_dense_reference() -> None:
    g = torch.Generator().manual_seed(2)
    B, d, F, eps, lam, c, lp = 48, 8, 24, 0.3, 0.02, 4.0, 0.5
    x = torch.randn(B, d, generator=g) * 2
    cfg = TrainConfig(arch="jumprelu", k=4, d_sae=F, arch_params={
        "sparsity_loss": "anthropic", "bandwidth": eps, "l0_coefficient": lam, "tanh_scale": c,
        "pre_act_coefficient": lp, "init_threshold": 0.5})
    sae = SAE(d, F, "relu")
    sae.init_weights(torch.Generator().manual_seed(3), x.mean(0))
    arch = build_arch("jumprelu", d, F, 4, cfg.arch_params, cfg)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[[1, 5, 7]] = True
    enc = arch.encode(sae, x - sae.b_dec, 50, 50, dead)
    theta = arch.threshold.detach()
    pre = (x - sae.b_dec.detach()) @ sae.W_enc.detach() + sae.b_enc.detach()
    f = pre * (pre > theta)
    ref_tanh = lam * float(torch.tanh(c * f).sum(1).mean())  # Anthropic: Σ_i tanh(c·f_i·‖W_dec,i‖), unit rows
    assert float(enc.losses["sparsity"].detach()) == pytest.approx(ref_tanh, rel=1e-5)
    ref_pa = ((theta - pre).relu() * dead).sum(1).mean()  # SAELens calculate_pre_act_loss with unit decoder norms
    assert float(enc.losses["pre_act"].detach()) == pytest.approx(lp * float(ref_pa), rel=1e-5)
    enc.losses["pre_act"].backward()
    assert sae.W_enc.grad[:, ~dead].abs().max() == 0 and sae.W_enc.grad[:, dead].abs().max() > 0


def test_jumprelu_first_batch_threshold_starts_at_L0_near_k() -> None:
    x, _ = planted_features(2048, d_in=16, n_features=48, active=3, seed=5)
    cfg = TrainConfig(arch="jumprelu", k=5, d_sae=80, batch_size=2048, tokens=2048, device="cpu")
    tr = Trainer(cfg, 16, 1, b_dec_init=x.mean(0))
    logs = tr.step(x)
    assert logs["l0"] == pytest.approx(5.0, rel=0.05)


# -- Matryoshka -----------------------------------------------------------------------------------------
def test_matryoshka_loss_sums_every_prefix_reconstruction() -> None:
    g = torch.Generator().manual_seed(0)
    B, d, F = 40, 8, 48
    x = torch.randn(B, d, generator=g)
    cfg = TrainConfig(arch="matryoshka", k=6, d_sae=F, arch_params={"groups": "6,12,24"})
    sae = SAE(d, F, "relu")
    sae.init_weights(torch.Generator().manual_seed(1), x.mean(0))
    arch = build_arch("matryoshka", d, F, 6, cfg.arch_params, cfg)
    assert arch.widths == [6, 12, 24, 48]
    total_var = (x - x.mean(0)).pow(2).sum()
    enc = arch.encode(sae, x - sae.b_dec, 0, 10, torch.zeros(F, dtype=torch.bool))
    loss, x_hat, logs = arch.reconstruction(sae, x, enc.codes, total_var)
    loss.backward()
    # dense reference in float64: the same selected entries (a fixed mask), every gradient
    W_enc, b_enc, W_dec, b_dec = (p.detach().double().clone().requires_grad_()
                                  for p in (sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec))
    mask = (_dense(enc.codes, F) > 0).detach()
    f = ((x.double() - b_dec) @ W_enc + b_enc).relu() * mask
    ref, per = 0.0, []
    for m in (6, 12, 24, 48):  # Bussmann et al. 2025: Σ_m ‖x − f_{:m} W_dec[:m] − b_dec‖²
        fvu = (x.double() - (f[:, :m] @ W_dec[:m] + b_dec)).pow(2).sum() / total_var.double()
        per.append(float(fvu.detach()))
        ref = ref + fvu
    ref.backward()
    assert float(loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert [logs[f"fvu_prefix_{m}"] for m in (6, 12, 24, 48)] == pytest.approx(per, rel=1e-5)
    assert logs["fvu"] == pytest.approx(per[-1], rel=1e-5)
    for got, want in ((sae.W_dec, W_dec), (sae.b_dec, b_dec), (sae.W_enc, W_enc), (sae.b_enc, b_enc)):
        assert torch.allclose(got.grad.double(), want.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(x_hat.double(), f.detach() @ W_dec.detach() + b_dec.detach(), atol=1e-5)


@pytest.mark.parametrize("groups,err", [("32,8", "strictly increasing"), ("0.5,2.5", "fractions"),
                                        ("16,128", "exceeds d_sae"), ("a,b", "comma-separated")])
def test_matryoshka_bad_groups_are_refused_before_any_side_effect(store, tmp_path, groups, err) -> None:
    from sae.errors import ConfigError

    with pytest.raises(ConfigError, match=err):
        train(_cfg(store, tmp_path / "run", arch="matryoshka", variant_params={"groups": groups}), quiet=True)
    assert not (tmp_path / "run").exists()


# -- every arch: training, composition, saving, resume ----------------------------------------------------
def test_every_penalty_composes_with_every_arch_in_one_pass(store, tmp_path) -> None:
    penalties = [v for v in variant_names() if v not in ("none", "topk", "relu")]
    cfgs = [_cfg(store, tmp_path / f"{a}-{v}", arch=a, variant=v, tokens=256 * 4)
            for a in arch_names() for v in ["none", *penalties]]
    runs = train_many(cfgs, quiet=True)
    for c, run in zip(cfgs, runs, strict=True):
        rec = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
        assert all(math.isfinite(r["loss"]) for r in rec), run
        if c.variant != "none":
            assert any(k.startswith("penalty/") for k in rec[-1]), run
        cfg = json.loads((run / "cfg.json").read_text())
        assert cfg["trained_architecture"] == c.arch and cfg["variant"] == c.variant


@pytest.mark.parametrize("arch", ["topk", "relu", *NEW_ARCHS])
def test_saved_sae_reloads_with_identical_encodings_and_saelens_fields(store, tmp_path, arch) -> None:
    run = train(_cfg(store, tmp_path / "run", arch=arch, variant="none"), quiet=True)
    cfg = json.loads((run / "cfg.json").read_text())
    with safe_open(str(run / "sae_weights.safetensors"), "pt") as fh:
        keys = set(fh.keys())
    # SAELens 6.x SAE.load_from_disk (sae_lens/saes/sae.py, loading/pretrained_sae_loaders.py): no
    # sae_lens_version → handle_pre_6_0_config renames activation_fn_str → activation_fn, picks the class by
    # `architecture`, and load_state_dict is strict, so the tensor names must be exactly the class's.
    expected = {"topk": "topk", "relu": "standard"}.get(arch, "jumprelu")
    assert cfg["architecture"] == expected
    assert cfg["d_in"] == 16 and cfg["d_sae"] == 64 and cfg["apply_b_dec_to_input"] is True
    assert cfg["normalize_activations"] == "none" and cfg["dtype"] == "float32"
    if expected == "jumprelu":
        assert keys == {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}
        assert cfg["activation_fn_str"] == "relu" and cfg["activation_fn_kwargs"] == {}
        th = load_file(str(run / "sae_weights.safetensors"))["threshold"]
        assert th.shape == (64,) and bool(torch.all(th > 0))
    else:
        assert keys == {"W_enc", "W_dec", "b_enc", "b_dec"}
    if expected == "topk":
        assert cfg["activation_fn_str"] == "topk" and cfg["activation_fn_kwargs"] == {"k": 4}
    if arch == "matryoshka":
        assert cfg["matryoshka_widths"] == [4, 8, 16, 32, 64]
    if arch in ("batchtopk", "matryoshka"):
        assert torch.all(th == cfg["batchtopk_threshold"]) and cfg["target_l0"] == 4
    sae = SAE.load(run)
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(9)) * 1.5
    f = sae.encode(x)
    assert torch.equal(sae.encode_sparse(x).to_dense(64), f)
    assert torch.allclose(sae(x), f @ sae.W_dec + sae.b_dec, atol=1e-5)
    if expected == "jumprelu":
        pre = (x - sae.b_dec) @ sae.W_enc + sae.b_enc  # SAELens JumpReLUSAE.encode
        assert torch.equal(f, pre.relu() * (pre > sae.threshold))


@pytest.mark.parametrize("arch", NEW_ARCHS)
def test_resume_after_a_kill_is_bit_identical(store, tmp_path, monkeypatch, arch) -> None:
    kw = dict(arch=arch, variant="topk_pairs")
    train(_cfg(store, tmp_path / "ref", **kw), quiet=True)
    real = Trainer.step

    def dying(self, x, sync=True):
        out = real(self, x, sync)
        if self.step_idx == 7:
            raise RuntimeError("node lost")
        return out

    monkeypatch.setattr(Trainer, "step", dying)
    with pytest.raises(RuntimeError, match="node lost"):
        train(_cfg(store, tmp_path / "cut", **kw), quiet=True)
    monkeypatch.undo()
    train(_cfg(store, tmp_path / "cut", resume=True, **kw), quiet=True)
    wa, wb = load_file(str(tmp_path / "ref" / "sae_weights.safetensors")), load_file(
        str(tmp_path / "cut" / "sae_weights.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[n], wb[n]) for n in wa)


# -- CLI --------------------------------------------------------------------------------------------------
def _invoke(args: list[str]):
    return CliRunner().invoke(app, args)


def test_cli_arch_choices_aliases_and_errors(store, tmp_path) -> None:
    common = ["--store", str(store), "--d-sae", "64", "--k", "4", "--tokens", "1024", "--batch-size", "256",
              "--device", "cpu", "--quiet"]
    r = _invoke(["train", "--arch", "jumprelu", "--jumprelu-sparsity", "anthropic", "--out", str(tmp_path / "j"),
                 *common])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "j" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["jumprelu_sparsity_loss"], cfg["variant"]) == ("jumprelu", "anthropic", "none")
    r = _invoke(["train", "--arch", "jumprelu", "--jumprelu-variant", "anthropic", "--out", str(tmp_path / "j2"),
                 *common])  # the old spelling keeps working, with a notice
    assert r.exit_code == 0 and "note: --jumprelu-variant is now --jumprelu-sparsity" in r.output, r.output
    assert json.loads((tmp_path / "j2" / "cfg.json").read_text())["jumprelu_sparsity_loss"] == "anthropic"
    r = _invoke(["train", "--variant", "ortsae", "--arch", "matryoshka", "-p", "groups=16,32", "--out",
                 str(tmp_path / "m"), *common])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "m" / "cfg.json").read_text())
    assert cfg["matryoshka_widths"] == [16, 32, 64] and cfg["variant"] == "ortsae"
    assert cfg["arch_config"]["groups"] == "16,32" and "groups" not in cfg["variant_config"]
    for args, msg in [(["--variant", "relu", "--arch", "jumprelu"], "--variant relu means --arch relu"),
                      (["--arch", "gated"], "--arch 'gated': choose one of topk, relu, batchtopk"),
                      (["--arch", "jumprelu", "-p", "bandwidth=-1"], "bandwidth=-1.0 (arch 'jumprelu') is out of"),
                      (["--arch", "batchtopk", "-p", "groups=4"], "has no parameter 'groups'"),
                      (["--jumprelu-sparsity", "anthropic"], "--jumprelu-sparsity needs --arch jumprelu")]:
        r = _invoke(["train", *args, "--out", str(tmp_path / "bad"), *common])
        assert r.exit_code != 0 and msg in r.output and "Traceback" not in r.output, (args, r.output)
        assert not (tmp_path / "bad").exists()


def test_sweep_grid_over_arch(store, tmp_path) -> None:
    r = _invoke(["sweep", "--store", str(store), "--variants", "topk,topk_pairs", "--grid", "arch=topk,batchtopk",
                 "--expansion", "4", "--k", "4", "--tokens", "1024", "--batch-size", "256", "--device", "cpu",
                 "--out", str(tmp_path / "sw"), "--quiet"])
    assert r.exit_code == 0, r.output
    runs = sorted(p.name for p in (tmp_path / "sw").iterdir() if (p / "cfg.json").exists())
    assert runs == ["topk-arch=batchtopk", "topk-arch=topk", "topk_pairs-arch=batchtopk", "topk_pairs-arch=topk"]
    arch = {n: json.loads((tmp_path / "sw" / n / "cfg.json").read_text())["architecture"] for n in runs}
    assert arch["topk_pairs-arch=batchtopk"] == "jumprelu" and arch["topk-arch=topk"] == "topk"


def test_cofiring_sets_of_heavy_tailed_variable_count_codes_are_exact() -> None:
    """BatchTopK gives rare tokens hundreds of latents: the pair engine enumerates rows in buckets
    of similar count (bounded memory) and must still find exactly the co-firing pairs."""
    from sae.train.variants.pairs import _row_buckets, cofiring_pairs, occurrence_keys

    g = torch.Generator().manual_seed(0)
    B, F = 200, 600
    pre = torch.randn(B, F, generator=g)
    pre[:2] += 3.0  # two heavy tokens
    rows, lat, _ = batch_topk_select(pre, 4)
    codes = SparseCodes.ragged(rows, lat, pre[rows, lat].relu(), B)
    keep, idx = codes.live, codes.idx
    assert _row_buckets(keep) is not None and idx.shape[1] > 100
    f = _dense(codes, F)
    on = (f > 0).double()
    ref_counts = torch.triu(on.T @ on, 1)
    ref_scores = torch.triu(f.double().T @ f.double(), 1)
    ref_keys = ref_counts.nonzero()
    cof = cofiring_pairs(codes, F, with_scores=True)
    assert torch.equal(cof.keys, ref_keys[:, 0] * F + ref_keys[:, 1])
    assert torch.equal(cof.counts, ref_counts[ref_keys[:, 0], ref_keys[:, 1]].long())
    assert torch.allclose(cof.scores.double(), ref_scores[ref_keys[:, 0], ref_keys[:, 1]], rtol=1e-5)
    occ = occurrence_keys(codes, F).sort().values
    assert torch.equal(occ, torch.repeat_interleave(cof.keys, cof.counts))


def test_batchtopk_saves_the_mean_batch_threshold_of_the_final_steps() -> None:
    x, _ = planted_features(4096, d_in=16, n_features=48, active=3, seed=6)
    steps = 40
    cfg = TrainConfig(arch="batchtopk", k=6, d_sae=96, lr=3e-3, lr_warmup_steps=2, batch_size=256,
                      tokens=256 * steps, device="cpu", arch_params={"calibrate_frac": 0.25})
    tr = Trainer(cfg, 16, steps, b_dec_init=x.mean(0))
    g = torch.Generator().manual_seed(0)
    taus = []
    for _ in range(steps):
        batch = x[torch.randint(0, 4096, (256,), generator=g)]
        with torch.no_grad():  # τ_B recomputed from the definition: the (B·k)-th largest ReLU(pre)
            pre = (batch - tr.sae.b_dec) @ tr.sae.W_enc + tr.sae.b_enc
            taus.append(float(pre.relu().flatten().topk(256 * 6).values.min()))
        tr.step(batch)
    expected = sum(taus[30:]) / 10  # the final quarter of the steps
    inf = tr.inference_sae()
    assert float(inf.threshold[0]) == pytest.approx(expected, rel=1e-5)
    assert inf.cfg["batchtopk_threshold"] == pytest.approx(expected, rel=1e-5)
    ema = TrainConfig(**{**cfg.to_dict(), "adam_betas": (0.9, 0.999), "arch_params": {"calibrate_frac": 0.0}})
    tr2 = Trainer(ema, 16, 1, b_dec_init=x.mean(0))
    tr2.step(x[:256])
    assert float(tr2.inference_sae().threshold[0]) == pytest.approx(float(tr2.arch.threshold))


def test_sweep_takes_arch_params_from_the_config_file(store, tmp_path) -> None:
    toml = tmp_path / "relu.toml"
    toml.write_text("[arch_params]\ninit_bias = true\n")
    r = _invoke(["sweep", "--store", str(store), "--variants", "relu", "--grid", "l1_coefficient=0.01,0.02",
                 "--config", str(toml), "--expansion", "4", "--tokens", "512", "--batch-size", "256", "--device", "cpu",
                 "--out", str(tmp_path / "sw"), "--quiet"])
    assert r.exit_code == 0, r.output
    for name in ("relu-l1_coefficient=0.01", "relu-l1_coefficient=0.02"):
        cfg = json.loads((tmp_path / "sw" / name / "cfg.json").read_text())
        assert cfg["arch_config"] == {"init_bias": True} and cfg["architecture"] == "standard"


def test_relu_init_bias_starts_at_L0_near_k() -> None:
    x, _ = planted_features(2048, d_in=16, n_features=48, active=3, seed=7)
    for init_bias, expect in ((True, 5.0), (False, None)):
        cfg = TrainConfig(variant="relu", k=5, d_sae=80, batch_size=2048, tokens=2048, device="cpu",
                          arch_params={"init_bias": init_bias})
        tr = Trainer(cfg, 16, 1, b_dec_init=x.mean(0))
        logs = tr.step(x)
        if expect:
            assert logs["l0"] == pytest.approx(expect, rel=0.05)
        else:
            assert logs["l0"] > 20  # b_enc = 0: every latent with a positive projection fires


@pytest.mark.parametrize("arch", ["topk", "relu", "jumprelu", "batchtopk"])
def test_save_unit_decoder_scales_codes_and_keeps_reconstructions(store, tmp_path, arch) -> None:
    """--save-unit-decoder (default) vs --no-save-unit-decoder, same training: unit rows, codes × ‖W_dec,i‖ of the
    other file, the same active sets, reconstructions equal to 1e-6 relative (SAELens' fold_W_dec_norm)."""
    kw = dict(arch=arch, variant="none", l1_coefficient=0.01)
    a = SAE.load(train(_cfg(store, tmp_path / "unit", **kw), quiet=True))
    b = SAE.load(train(_cfg(store, tmp_path / "raw", save_unit_decoder=False, **kw), quiet=True))
    n = b.W_dec.norm(dim=1)
    assert abs(float(n.mean()) - 1) > 0.01  # the raw file really has non-unit rows (1/s)
    torch.testing.assert_close(a.W_dec.norm(dim=1), torch.ones(64), rtol=0, atol=1e-6)
    assert json.loads((tmp_path / "unit" / "cfg.json").read_text())["unit_decoder"] is True
    assert json.loads((tmp_path / "raw" / "cfg.json").read_text())["unit_decoder"] is False
    x = torch.randn(300, 16, generator=torch.Generator().manual_seed(2)) * 3
    with torch.no_grad():
        fa, fb = a.encode(x), b.encode(x)
        assert torch.equal(fa > 0, fb > 0)
        torch.testing.assert_close(fa, fb * n, rtol=1e-5, atol=1e-6)
        ra, rb = a(x), b(x)
        assert float((ra - rb).norm() / rb.norm()) < 1e-6


def test_a_base_architecture_given_as_variant_is_read_as_arch_with_a_notice(store, tmp_path) -> None:
    common = ["--store", str(store), "--d-sae", "64", "--k", "4", "--tokens", "1024", "--batch-size", "256",
              "--device", "cpu", "--quiet"]
    for old, arch in (("topk", "topk"), ("relu", "relu")):
        r = _invoke(["train", "--variant", old, "--out", str(tmp_path / old), *common])
        assert r.exit_code == 0, r.output
        assert f"note: --variant {old} names a base architecture; read as --variant none --arch {arch}" in r.output
        cfg = json.loads((tmp_path / old / "cfg.json").read_text())
        assert (cfg["variant"], cfg["trained_architecture"]) == ("none", arch)
        r = _invoke(["train", "--arch", arch, "--out", str(tmp_path / f"new-{old}"), *common])
        assert r.exit_code == 0 and "note:" not in r.output, r.output
        new = json.loads((tmp_path / f"new-{old}" / "cfg.json").read_text())
        assert new["run_settings"] == cfg["run_settings"]            # the same run, spelled two ways
    assert TrainConfig(variant="topk", arch="batchtopk").activation == "batchtopk"
