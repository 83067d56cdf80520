"""Pretrained SAEs by name (``sae import saelens:RELEASE/SAE_ID``) and Gemma Scope's ``params.npz``:
real release ids from SAELens' table, files placed in a Hugging Face cache as a download leaves them
(no network), codes equal to SAELens' own loading of the same files and to the release's formula."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sae.cli import app
from sae.rundir.sae import SAE
from tests.helpers import tree_hash

sae_lens = pytest.importorskip("sae_lens")

REV = "1" * 40
GEMMA_SCOPE = ("gemma-scope-2b-pt-res", "google/gemma-scope-2b-pt-res", "layer_12/width_16k/average_l0_82")


@pytest.fixture()
def hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache, offline."""
    import huggingface_hub.constants as hc

    root = tmp_path / "hub"
    root.mkdir()
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    return root


def _snapshot(hub: Path, repo_id: str) -> Path:
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REV)
    return repo / "snapshots" / REV


def _gemma_scope_params(folder: Path, d_in: int = 2304, d_sae: int = 16384, seed: int = 0) -> dict[str, np.ndarray]:
    """params.npz at the release's real shapes (Gemma 2 2B: d_model 2304; width_16k), random values with
    non-negative thresholds, as the release stores them."""
    g = np.random.default_rng(seed)
    p = {"W_enc": (g.standard_normal((d_in, d_sae)) * 0.02).astype(np.float32),
         "W_dec": (g.standard_normal((d_sae, d_in)) * 0.02).astype(np.float32),
         "b_enc": (g.standard_normal(d_sae) * 0.01).astype(np.float32),
         "b_dec": (g.standard_normal(d_in) * 0.1).astype(np.float32),
         "threshold": np.abs(g.standard_normal(d_sae) * 0.02).astype(np.float32)}
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "params.npz", **p)
    return p


def test_gemma_scope_release_by_name_equals_saelens_and_the_formula(hub, tmp_path) -> None:
    release, repo_id, sae_id = GEMMA_SCOPE
    folder = _snapshot(hub, repo_id) / sae_id
    p = _gemma_scope_params(folder)
    r = CliRunner().invoke(app, ["import", f"saelens:{release}/{sae_id}", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    ours = SAE.load(tmp_path / "run")
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((64, 2304)).astype(np.float32))
    # the release's reference JumpReLU, written from Lieberum et al. 2024: pre = x W_enc + b_enc (no centring)
    pre = x.double() @ torch.from_numpy(p["W_enc"]).double() + torch.from_numpy(p["b_enc"]).double()
    ref = pre * (pre > torch.from_numpy(p["threshold"]).double())
    codes = ours.encode(x).double()
    torch.testing.assert_close(codes, ref, rtol=1e-4, atol=1e-5)
    theirs = sae_lens.SAE.from_pretrained(release, sae_id, device="cpu")
    torch.testing.assert_close(ours.encode(x), theirs.encode(x), rtol=1e-4, atol=1e-5)
    cfg = json.loads((tmp_path / "run" / "cfg.json").read_text())
    assert cfg["model_name"] == "google/gemma-2-2b" and cfg["hook_name"] == "blocks.12.hook_resid_post"
    assert cfg["pretrained"] == {"release": release, "sae_id": sae_id, "repo_id": repo_id, "revision": REV,
                                 "path": sae_id, "sae_lens_model": "gemma-2-2b"}
    assert cfg["imported_from"]["format"] == "gemma_scope" and cfg["imported_from"]["folds"] == ["input_bias"]


def test_a_saelens_layout_release_resolves_to_its_folder(hub, tmp_path, planted_store_factory) -> None:
    """A release in SAELens' own layout (converter none): the folder is read as a SAELens save."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    from sae.train.config import TrainConfig
    from sae.train.run import train

    release = "gpt2-small-res-jb"
    lookup = get_pretrained_saes_directory()[release]
    assert lookup.conversion_func is None
    sae_id = next(iter(lookup.saes_map))
    store = planted_store_factory(4096, d_in=16, n_features=32, active=2, seed=2)
    src = train(TrainConfig(store=str(store), d_sae=32, k=2, batch_size=256, tokens=1024, device="cpu",
                            out=str(tmp_path / "src")), quiet=True)
    folder = _snapshot(hub, lookup.repo_id) / lookup.saes_map[sae_id]
    folder.mkdir(parents=True)
    for f in ("cfg.json", "sae_weights.safetensors"):
        (folder / f).write_bytes((src / f).read_bytes())
    r = CliRunner().invoke(app, ["import", f"saelens:{release}/{sae_id}", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    a, b = SAE.load(src), SAE.load(tmp_path / "run")
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):  # the exact folds in float64, rounded back to float32
        torch.testing.assert_close(getattr(b, n), getattr(a, n), rtol=1e-6, atol=1e-6)
    assert json.loads((tmp_path / "run" / "cfg.json").read_text())["pretrained"]["repo_id"] == lookup.repo_id


def test_bad_names_are_one_line_and_write_nothing(hub, tmp_path) -> None:
    release, _, sae_id = GEMMA_SCOPE
    before = tree_hash(tmp_path)
    cases = [
        ("saelens:gemma-scope-2b-pt-resx/x", "unknown SAELens release 'gemma-scope-2b-pt-resx' (close:"),
        (f"saelens:{release}/layer_12/width_16k/average_l0_8", "has no SAE 'layer_12/width_16k/average_l0_8'"),
        (f"saelens:{release}/{sae_id}", "cannot fetch"),  # offline and not in the cache
        ("saelens:goodfire-llama-3.1-8b-instruct/layer_19", "converter, which sae import does not read yet"),
    ]
    for ref, why in cases:
        r = CliRunner().invoke(app, ["import", ref, "--out", str(tmp_path / "run")])
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1 and why in errors[0], (ref, r.output)
    assert tree_hash(tmp_path) == before


def test_gemma_scope_folder_import_needs_model_and_refuses_bad_files(tmp_path) -> None:
    folder = tmp_path / "gs" / "layer_3" / "width_1k"
    _gemma_scope_params(folder, d_in=16, d_sae=32)
    r = CliRunner().invoke(app, ["import", str(folder), "--from", "gemma_scope", "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and "does not record its model" in r.output
    r = CliRunner().invoke(app, ["import", str(folder), "--from", "gemma_scope", "--model", "google/gemma-2-2b",
                                 "--hook-name", "blocks.3.hook_resid_post", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    np.savez(tmp_path / "neg.npz", **{**dict(np.load(folder / "params.npz")),
                                      "threshold": -np.ones(32, dtype=np.float32)})
    bad = tmp_path / "bad"
    bad.mkdir()
    (tmp_path / "neg.npz").rename(bad / "params.npz")
    r = CliRunner().invoke(app, ["import", str(bad), "--from", "gemma_scope", "--model", "m",
                                 "--hook-name", "blocks.3.hook_resid_post", "--out", str(tmp_path / "run2")])
    assert r.exit_code == 2 and "negative thresholds" in r.output and not (tmp_path / "run2").exists()


def test_llama_scope_release_by_name_equals_the_formula_and_saelens(hub, tmp_path) -> None:
    """``llama_scope_lxr_8x/l0r_8x``: hyperparams.json + checkpoints/final.safetensors (bfloat16, as
    released) in the cache; SAELens reads the widths from hyperparams.json, so small ones serve."""
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    from safetensors.torch import save_file

    release, sae_id = "llama_scope_lxr_8x", "l0r_8x"
    lookup = get_pretrained_saes_directory()[release]
    s_table = lookup.norm_scaling_factor[sae_id]
    d_in, d_sae, theta0, avg_in = 64, 256, 0.02, 1.25
    folder = _snapshot(hub, lookup.repo_id) / lookup.saes_map[sae_id]
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "hyperparams.json").write_text(json.dumps({
        "d_model": d_in, "d_sae": d_sae, "hook_point_in": "blocks.0.hook_resid_post", "jump_relu_threshold": theta0,
        "dataset_average_activation_norm": {"in": avg_in, "out": 2.0}}))
    g = torch.Generator().manual_seed(0)
    w = {"encoder.weight": torch.randn(d_sae, d_in, generator=g) * 0.01,
         "encoder.bias": torch.randn(d_sae, generator=g) * 0.01,
         "decoder.weight": torch.randn(d_in, d_sae, generator=g) * 0.1,
         "decoder.bias": torch.randn(d_in, generator=g) * 0.1}
    w = {k: v.to(torch.bfloat16) for k, v in w.items()}
    save_file(w, str(folder / "checkpoints" / "final.safetensors"))
    r = CliRunner().invoke(app, ["import", f"saelens:{release}/{sae_id}", "--out", str(tmp_path / "run")])
    assert r.exit_code == 0, r.output
    ours = SAE.load(tmp_path / "run")
    x = torch.randn(256, d_in, generator=g) * 0.1
    # SAELens' math for these files, written out: pre = (s x) Wᵀ_enc + b_enc, θ = jump_relu_threshold · √d/avg_in
    W_e, b_e = w["encoder.weight"].double(), w["encoder.bias"].double()
    pre = (s_table * x.double()) @ W_e.T + b_e
    ref = pre * (pre > theta0 * d_in ** 0.5 / avg_in)
    torch.testing.assert_close(ours.encode(x).double(), ref, rtol=1e-4, atol=1e-6)
    xhat = (ref @ w["decoder.weight"].double().T + w["decoder.bias"].double()) / s_table
    torch.testing.assert_close(ours.decode(ours.encode(x)).double(), xhat, rtol=1e-4, atol=1e-5)
    theirs = sae_lens.SAE.from_pretrained(release, sae_id, device="cpu")  # folds in bfloat16: looser
    a, b = ours.encode(x), theirs.encode(x).float()
    assert float(((a > 0) == (b > 0)).float().mean()) > 0.995
    both = (a > 0) & (b > 0)
    torch.testing.assert_close(a[both], b[both], rtol=2e-2, atol=1e-3)
    cfg = json.loads((tmp_path / "run" / "cfg.json").read_text())
    assert cfg["model_name"] == "meta-llama/Llama-3.1-8B" and cfg["hook_name"] == "blocks.0.hook_resid_post"
    assert cfg["imported_from"]["format"] == "llama_scope"


def test_a_gemma_scope_sae_is_evaluated_beside_ours_with_the_same_numbers(tmp_path, tiny_model_dir,
                                                                         tiny_store) -> None:
    """Our BatchTopK run (saved as JumpReLU, θ > 0) written out in Gemma Scope's ``params.npz`` form
    (``pre = x W_enc + b_enc`` with no centring, so ``b_enc_gs = b_enc − b_dec W_enc``; the same θ), imported
    back, and ``sae evaluate``d beside the original on the same store and held-out tokens: the comparison
    table lists both and every core number agrees (the two are the same function)."""
    from safetensors.torch import load_file

    from sae.train.config import TrainConfig
    from sae.train.run import train

    hook = "blocks.1.hook_resid_post"
    src = train(TrainConfig(store=str(tiny_store), hook_name=hook, arch="batchtopk", d_sae=128, k=8,
                            batch_size=256, tokens=256 * 6, device="cpu", out=str(tmp_path / "ours")), quiet=True)
    w = {k: v.double() for k, v in load_file(str(src / "sae_weights.safetensors")).items()}
    assert float(w["threshold"].min()) >= 0 and float(w["threshold"].max()) > 0
    folder = tmp_path / "gemma-scope-tiny-res" / "layer_1" / "width_128" / "average_l0_8"
    folder.mkdir(parents=True)
    np.savez(folder / "params.npz", W_enc=w["W_enc"].float().numpy(), W_dec=w["W_dec"].float().numpy(),
             b_enc=(w["b_enc"] - w["b_dec"] @ w["W_enc"]).float().numpy(), b_dec=w["b_dec"].float().numpy(),
             threshold=w["threshold"].float().numpy())
    runner = CliRunner()
    r = runner.invoke(app, ["import", str(folder), "--from", "gemma_scope", "--model", str(tiny_model_dir),
                            "--store", str(tiny_store), "--out", str(tmp_path / "gs")])
    assert r.exit_code == 0 and "warning" not in r.output, r.output
    assert json.loads((tmp_path / "gs" / "cfg.json").read_text())["hook_name"] == hook  # from layer_1 in the path
    r = runner.invoke(app, ["evaluate", str(src), str(tmp_path / "gs"), "--store", str(tiny_store), "--eval", "core",
                            "--tokens", "512", "--device", "cpu", "--quiet"])
    assert r.exit_code == 0, r.output
    assert "ours" in r.output and "gs" in r.output
    a, b = (json.loads((d / "eval_results" / "core.json").read_text())["eval_result_metrics"]
            for d in (src, tmp_path / "gs"))
    compared = 0
    for group in ("reconstruction_quality", "model_behavior_preservation", "sparsity"):
        for key, va in a[group].items():
            if isinstance(va, float):
                assert b[group][key] == pytest.approx(va, rel=1e-4, abs=1e-5), (group, key)
                compared += 1
    assert compared >= 5


def test_a_gemma_scope_sae_is_fine_tuned_with_a_penalty_from_its_first_step(tmp_path, tiny_model_dir,
                                                                           tiny_store) -> None:
    """Issue 31's use case: add an orthogonality penalty to a Gemma Scope SAE. A ``params.npz`` (Gemma
    Scope's JumpReLU form, no input centring) imported with ``--from gemma_scope``, then ``sae train
    --init-from`` it with ``--variant ortsae``: one step at lr 1e-12 saves the initialisation, whose
    reconstructions equal the release formula's on the ``params.npz`` arrays; a real fine-tune moves the
    decoder but stays near it; ``cfg.json`` records where it started."""
    from safetensors.torch import load_file

    from sae.store import ActivationStore
    from sae.train.config import TrainConfig
    from sae.train.run import train

    hook = "blocks.1.hook_resid_post"
    src = train(TrainConfig(store=str(tiny_store), hook_name=hook, arch="batchtopk", d_sae=128, k=8,
                            batch_size=256, tokens=256 * 6, device="cpu", out=str(tmp_path / "ours")), quiet=True)
    w = {k: v.double() for k, v in load_file(str(src / "sae_weights.safetensors")).items()}
    folder = tmp_path / "gemma-scope-tiny-res" / "layer_1" / "width_128" / "average_l0_8"
    folder.mkdir(parents=True)
    gs = {"W_enc": w["W_enc"].float().numpy(), "W_dec": w["W_dec"].float().numpy(),
          "b_enc": (w["b_enc"] - w["b_dec"] @ w["W_enc"]).float().numpy(), "b_dec": w["b_dec"].float().numpy(),
          "threshold": w["threshold"].float().numpy()}
    np.savez(folder / "params.npz", **gs)
    runner = CliRunner()
    r = runner.invoke(app, ["import", str(folder), "--from", "gemma_scope", "--model", str(tiny_model_dir),
                            "--store", str(tiny_store), "--out", str(tmp_path / "gs")])
    assert r.exit_code == 0, r.output
    common = ["train", "--store", str(tiny_store), "--hook", hook, "--init-from", str(tmp_path / "gs"),
              "--arch", "jumprelu", "--variant", "ortsae", "--d-sae", "128", "--batch-size", "256", "--device", "cpu",
              "--quiet"]
    r = runner.invoke(app, [*common, "--tokens", "256", "--lr", "1e-12",
                            "--out", str(tmp_path / "step0")])
    assert r.exit_code == 0, r.output
    s = ActivationStore(tiny_store)
    x = s.read_rows(hook, 0, 512).double()
    x = x[x.norm(dim=1) < 10 * x.norm(dim=1).median()]  # leave out BOS rows (norm far above the rest)
    p = {k: torch.from_numpy(v).double() for k, v in gs.items()}
    pre = x @ p["W_enc"] + p["b_enc"]  # Gemma Scope: no b_dec subtracted before the encoder
    f = pre * (pre > p["threshold"])
    want = f @ p["W_dec"] + p["b_dec"]
    v = {k: t.double() for k, t in load_file(str(tmp_path / "step0" / "sae_weights.safetensors")).items()}
    pre_ft = (x - v["b_dec"]) @ v["W_enc"] + v["b_enc"]  # our saved form (SAELens' JumpReLU)
    f_ft = pre_ft * (pre_ft > v["threshold"])
    assert torch.equal(f_ft > 0, f > 0)
    torch.testing.assert_close(f_ft @ v["W_dec"] + v["b_dec"], want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    cfg = json.loads((tmp_path / "step0" / "cfg.json").read_text())
    assert cfg["init_from"]["path"] == str((tmp_path / "gs").resolve()) and cfg["variant"] == "ortsae"
    r = runner.invoke(app, [*common, "--tokens", str(256 * 8), "--out", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    a = p["W_dec"]
    b = load_file(str(tmp_path / "ft" / "sae_weights.safetensors"))["W_dec"].double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    assert not torch.allclose(a, b) and float(cos.mean()) > 0.9
