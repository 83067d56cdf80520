"""The ground-truth evaluation: every SynthSAEBench metric equals SAELens' ``eval_sae_on_synthetic_data``
on the same SAE and samples (to 1e-4), absorption and classification against hand-computed
references, intervals, held-out samples, and the CLI end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sae.cli import app
from sae.evaluate.ground_truth import Config, evaluate_samples, parent_pairs
from sae.rundir.sae import SAE
from sae.store import ActivationStore
from sae.synth.config import SynthConfig
from sae.synth.presets import to_toml
from sae.synth.store import EVAL_STREAM, HOOK, load_synthetic_model, sample_block, stream_seed, write_synthetic_store
from tests.test_synth_store import tiny_config

sae_lens = pytest.importorskip("sae_lens", reason="the synth extra (SAELens) is in dev")
from sae_lens.synthetic import eval_sae_on_synthetic_data  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gt")
    cfg = root / "tiny.toml"
    cfg.write_text(to_toml(tiny_config()))
    store = root / "synth.zarr"
    write_synthetic_store(SynthConfig(config=str(cfg), tokens=8192, chunk_tokens=1024, out=str(store)), quiet=True)
    return {"root": root, "store": store}


def _train(store: Path, out: Path, arch: str) -> Path:
    from sae.train.config import TrainConfig
    from sae.train.run import train

    kw = {"l1_coefficient": 0.01} if arch == "relu" else {}
    return train(TrainConfig(store=str(store), arch=arch, variant="none", d_sae=32, k=4, batch_size=256,
                             tokens=256 * 30, device="cpu", out=str(out), **kw), quiet=True)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "matryoshka", "relu"])
def test_every_metric_equals_saelens_on_the_same_sae_and_samples(synth, tmp_path, arch) -> None:
    run = _train(synth["store"], tmp_path / arch, arch)
    store = ActivationStore(str(synth["store"]))
    model = load_synthetic_model(store)
    n, seed = 4096, 0
    x, a = sample_block(model, n, seed, EVAL_STREAM, 0, with_features=True)
    ours = evaluate_samples(SAE.load(run), model.feature_dict.feature_vectors, [(x, a)],
                            store.attrs["synthetic"]["hierarchy"],
                            Config(n_samples=n, batch_size=n, bootstrap_block=n, n_bootstrap=0)).metrics
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, EVAL_STREAM, 0))  # the same draws as our block 0
        theirs = eval_sae_on_synthetic_data(sae_lens.SAE.load_from_disk(str(run)), model.feature_dict,
                                            model.activation_generator, num_samples=n, batch_size=n)
    pairs = {
        ("recovery", "mcc"): theirs.mcc, ("recovery", "uniqueness"): theirs.uniqueness,
        ("classification", "precision"): theirs.classification.precision,
        ("classification", "recall"): theirs.classification.recall,
        ("classification", "f1_score"): theirs.classification.f1_score,
        ("classification", "accuracy"): theirs.classification.accuracy,
        ("reconstruction", "explained_variance"): theirs.explained_variance,
        ("reconstruction", "shrinkage"): theirs.shrinkage,
        ("sparsity", "sae_l0"): theirs.sae_l0, ("sparsity", "true_l0"): theirs.true_l0,
        ("sparsity", "dead_latents"): theirs.dead_latents,
    }
    for (section, name), want in pairs.items():
        assert ours[section][name] == pytest.approx(want, abs=1e-4), (arch, name, ours[section][name], want)
    assert ours["sparsity"]["true_l0"] > 0 and ours["classification"]["f1_score"] > 0


class _Fixed(SAE):
    """A ReLU SAE with given weights (no bias): f = relu(x W_enc), x̂ = f W_dec."""

    def __init__(self, W_enc: torch.Tensor, W_dec: torch.Tensor) -> None:
        super().__init__(d_in=W_enc.shape[0], d_sae=W_enc.shape[1], activation="relu")
        with torch.no_grad():
            self.W_enc.copy_(W_enc)
            self.W_dec.copy_(W_dec)
            self.b_enc.zero_()
            self.b_dec.zero_()


def test_absorption_and_classification_against_hand_counts() -> None:
    # 4 orthonormal features; feature 0 is the parent of 1 and 2 (mutually exclusive children)
    D = torch.eye(4)
    hierarchy = {"roots": [{"feature_index": 0, "children": [{"feature_index": 1, "children": []},
                                                             {"feature_index": 2, "children": []}]},
                           {"feature_index": 3, "children": []}]}
    assert parent_pairs(hierarchy) == [(0, [1, 2])]
    a = torch.tensor([[1.0, 1, 0, 0], [1, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1], [1, 1, 0, 0]])
    x = a @ D
    cfg = Config(n_bootstrap=0, bootstrap_block=5, batch_size=5, min_events=1)
    # an SAE whose parent latent is suppressed whenever a child is active: every event is absorbed
    W_enc = torch.eye(4)
    W_enc[1, 0] = W_enc[2, 0] = -10.0
    out = evaluate_samples(_Fixed(W_enc, torch.eye(4)), D, [(x, a)], hierarchy, cfg).metrics
    ab = out["absorption"]
    # events = rows with parent and a child active: rows 0, 1, 4; absorbed = all three
    assert (ab["n_events"], ab["absorption_rate"], ab["parent_silent_rate"]) == (3, 1.0, 1.0)
    # latent 0 fires only on row 2 (tp 1, fp 0, fn 3): precision 1, recall 1/4, F1 0.4; the others are perfect
    assert out["classification"]["precision"] == pytest.approx(1.0)
    assert out["classification"]["recall"] == pytest.approx((0.25 + 3) / 4)
    assert out["classification"]["f1_score"] == pytest.approx((0.4 + 3) / 4)
    assert out["recovery"]["mcc"] == pytest.approx(1.0) and out["recovery"]["uniqueness"] == 1.0
    # the SAE reconstructs rows 3 and 2 exactly and loses the parent elsewhere: EV by the formula
    x_hat = torch.relu(x @ W_enc) @ torch.eye(4)
    total = (x ** 2).sum() - len(x) * (x.mean(0) ** 2).sum()
    assert out["reconstruction"]["explained_variance"] == pytest.approx(float(1 - ((x - x_hat) ** 2).sum() / total))
    # the plain identity SAE absorbs nothing
    clean = evaluate_samples(_Fixed(torch.eye(4), torch.eye(4)), D, [(x, a)], hierarchy, cfg).metrics
    assert clean["absorption"]["absorption_rate"] == 0.0 and clean["classification"]["f1_score"] == 1.0
    # a parent silent while its child's latent is silent too is a miss, not absorption
    W_enc2 = torch.eye(4)
    W_enc2[1, 0] = W_enc2[2, 0] = -10.0
    W_enc2[:, 1] = 0.0  # latent 1 never fires
    miss = evaluate_samples(_Fixed(W_enc2, torch.eye(4)), D, [(x, a)], hierarchy, cfg).metrics["absorption"]
    # feature 1's latent still matches by decoder cosine, but never fires: rows 0 and 4 are silent misses
    assert miss["parent_silent_rate"] == 1.0 and miss["absorption_rate"] == pytest.approx(1 / 3)


def test_cli_end_to_end_with_intervals_on_held_out_samples(synth, tmp_path) -> None:
    run = _train(synth["store"], tmp_path / "run", "topk")
    r = CliRunner().invoke(app, ["evaluate", str(run), "--store", str(synth["store"]), "-p",
                                 "ground_truth.n_samples=6000", "-p", "ground_truth.n_bootstrap=200"])
    assert r.exit_code == 0, r.output
    res = json.loads((run / "eval_results" / "ground_truth.json").read_text())
    m = res["eval_result_metrics"]
    for section, name in (("classification", "f1_score"), ("reconstruction", "explained_variance"),
                          ("absorption", "absorption_rate")):
        lo, hi = m[section][f"{name}_ci"]
        assert lo <= m[section][name] <= hi and lo < hi
    assert res["eval_result_unstructured"]["n_samples"] == 6000
    assert (run / "eval_results" / "geometry.json").exists()  # the default on a synthetic store
    # the held-out samples are not store rows
    store = ActivationStore(str(synth["store"]))
    model = load_synthetic_model(store)
    x, a = sample_block(model, 4096, 0, EVAL_STREAM, 0, with_features=True)
    # rows with 0 or 1 active features can repeat exactly (the bias; a feature of near-constant magnitude)
    x = x[(a > 0).sum(1) >= 2]
    rows = store.read_rows(HOOK, 0, store.n_tokens)
    assert len(x) > 500 and torch.cdist(x, rows, compute_mode="donot_use_mm_for_euclid_dist").min() > 1e-3


def test_language_model_evaluations_are_refused_on_a_synthetic_store(synth, tmp_path) -> None:
    run = _train(synth["store"], tmp_path / "run", "topk")
    r = CliRunner().invoke(app, ["evaluate", str(run), "--store", str(synth["store"]), "--eval", "core"])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "synthetic store" in r.output
    assert not (run / "eval_results").exists()


def test_ground_truth_skips_a_store_without_ground_truth(planted_store_factory, tmp_path) -> None:
    store = planted_store_factory(n_tokens=2048, d_in=16, n_features=32, active=2)
    run = _train(Path(store), tmp_path / "run", "topk")
    r = CliRunner().invoke(app, ["evaluate", str(run), "--store", str(store), "--eval", "ground_truth"])
    assert r.exit_code == 0 and "no ground truth" in r.output
