"""The sae-probes evaluation: agreement with the package's own pipeline on the same activations,
the bootstrap's AUC against scikit-learn, an end-to-end run on the tiny model (result shape,
caching), and its refusals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("sae_probes")

from sae.cli import app
from sae.evaluate import evaluate_runs
from sae.evaluate import sae_probes as P
from sae.rundir.results import read_result
from sae.rundir.sae import SAE
from tests.helpers import tree_hash

pytestmark = pytest.mark.usefixtures("one_thread")

HOOK = "blocks.1.hook_resid_post"
DATASETS = ("117_us_state_FL", "118_us_state_CA", "41_truthqa_tf")


def planted_acts(name: str, d: int, seed: int) -> torch.Tensor:
    """One row per prompt of ``name``: noise plus a class direction (so probes have something to find)."""
    from sae_probes.utils_data import get_yvals

    y = np.asarray(get_yvals(name))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(y), d, generator=g)
    direction = torch.randn(d, generator=g)
    return x + 0.8 * torch.as_tensor(y, dtype=torch.float32)[:, None] * direction


def small_sae(d: int, seed: int = 0) -> SAE:
    sae = SAE(d, 48, activation="relu")
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.fill_(-0.2)
    return sae


def test_agrees_with_the_package_on_the_same_activations(tmp_path: Path) -> None:
    """Our splits, codes, latent choice and probe metrics equal sae-probes' own ``run_sae_evals`` and
    ``run_baseline_evals`` fed the same activations (their file layout), to 1e-6."""
    from sae_probes import run_baseline_evals, run_sae_evals

    d, model = 24, "planted"
    cache = tmp_path / "cache"
    (cache / f"model_activations_{model}").mkdir(parents=True)
    acts = {name: planted_acts(name, d, i) for i, name in enumerate(DATASETS)}
    for name, x in acts.items():
        torch.save(x, cache / f"model_activations_{model}" / f"{name}_{HOOK}.pt")
    sae = small_sae(d)
    ks = (1, 2, 4)
    theirs = tmp_path / "theirs"
    run_sae_evals(sae=sae, model_name=model, hook_name=HOOK, reg_type="l1", setting="normal", ks=list(ks),  # type: ignore[arg-type]
                  results_path=theirs, model_cache_path=cache, datasets=list(DATASETS), device="cpu")
    run_baseline_evals(model_name=model, hook_name=HOOK, setting="normal", method="logreg", results_path=theirs,
                       model_cache_path=cache, datasets=list(DATASETS), device="cpu")
    cfg = P.Config(ks=ks, n_jobs=1)
    splits = [P.split_dataset(name, acts[name], cfg.seed) for name in DATASETS]
    fits, chosen = P.probe_fits(sae, splits, cfg)
    for sp in splits:
        rows = json.loads((theirs / f"sae_probes_{model}" / "normal_setting" / f"{sp.name}_{HOOK}_l1.json")
                          .read_text())
        assert [r["k"] for r in rows] == list(ks)
        for r in rows:
            ours = fits[(sp.name, r["k"])]
            for mine, their in (("test_accuracy", "test_acc"), ("test_auc", "test_auc"), ("test_f1", "test_f1"),
                                ("val_auc", "val_auc")):
                assert ours[mine] == pytest.approx(r[their], abs=1e-6), (sp.name, r["k"], mine)
            assert chosen[sp.name][str(r["k"])] == r["indices"]
        base = json.loads((theirs / f"baseline_results_{model}" / "normal_setting" / f"{sp.name}_{HOOK}_logreg.json")
                          .read_text())[0]
        dense = P._fit(sp.x_train.numpy(), sp.y_train, sp.x_test.numpy(), sp.y_test, "l2", cfg.seed)
        assert dense["test_accuracy"] == pytest.approx(base["test_acc"], abs=1e-6)
        assert dense["test_auc"] == pytest.approx(base["test_auc"], abs=1e-6)
        assert base["num_train"] == len(sp.y_train) == min(len(acts[sp.name]) - 100, 1024)
    # a probe on a planted direction does better than chance, so the comparison above is not of noise
    assert max(fits[(sp.name, 4)]["test_auc"] for sp in splits) > 0.7


def test_weighted_auc_matches_sklearn_with_sample_weights() -> None:
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    score = np.round(rng.normal(size=300) + y, 1)  # rounded: many ties, which count ½
    counts = P.bootstrap_counts(300, 20, rng)
    assert (counts.sum(1) == 300).all()
    ours = P.weighted_auc(score, y, counts)
    ref = [roc_auc_score(y, score, sample_weight=w) for w in counts]
    np.testing.assert_allclose(ours, ref, atol=1e-12)
    assert P.weighted_auc(score, y, np.ones((1, 300)))[0] == pytest.approx(roc_auc_score(y, score))


def _tiny_run(tmp_path: Path, tiny_model_dir: Path, name: str = "run") -> Path:
    sae = SAE(64, 128, activation="topk", k=8)
    sae.init_weights(torch.Generator().manual_seed(0))
    run = tmp_path / name
    sae.save(run, {"model_name": str(tiny_model_dir), "hook_name": HOOK, "hook_layer": 1,
                   "dataset_path": "embedded", "context_size": 64, "d_in": 64})
    return run


def test_end_to_end_on_the_tiny_model(tmp_path: Path, tiny_model_dir, tiny_lm, monkeypatch) -> None:
    calls: list[int] = []
    real = P.last_token_acts

    def counting(ctx, prompts, *a, **k):  # type: ignore[no-untyped-def]
        calls.append(len(prompts))
        return real(ctx, prompts, *a, **k)

    monkeypatch.setattr(P, "last_token_acts", counting)
    run = _tiny_run(tmp_path, tiny_model_dir)
    params = {"sae_probes": {"datasets": "117_us_state_FL,*us_state_CA", "ks": "1,2", "n_bootstrap": "200",
                             "n_jobs": "1"}}  # a tag and a pattern (`--datasets` on the command line)
    first = evaluate_runs([run], evals=["sae_probes"], device="cpu", quiet=True, eval_params=params)
    assert calls == [1000, 1000]  # one forward pass per dataset
    again = evaluate_runs([run], evals=["sae_probes"], device="cpu", quiet=True, eval_params=params)
    assert calls == [1000, 1000]  # activations and baselines come from the evaluation cache
    res = read_result(run, "sae_probes")
    assert res["eval_type_id"] == "sparse_probing_sae_probes" and first[0]["eval_type_id"] == res["eval_type_id"]
    assert res["eval_config"]["dataset_names"] == ["117_us_state_FL", "118_us_state_CA"]
    m = res["eval_result_metrics"]
    assert set(m["llm"]) == {"llm_test_accuracy", "llm_test_auc", "llm_test_f1"}
    assert set(m["sae"]) == {f"sae_top_{k}_test_{x}" for k in (1, 2) for x in ("accuracy", "auc", "f1")}
    assert m["sae"] == again[0]["eval_result_metrics"]["sae"]
    assert set(res["sae_metrics_by_k"]) == {"1", "2"}  # SAEBench's top-level key (JSON object keys are strings)
    rows = res["eval_result_details"]
    assert [r["dataset_name"] for r in rows] == ["117_us_state_FL", "118_us_state_CA"]
    for key, mean in m["sae"].items():
        assert mean == pytest.approx(np.mean([r[key] for r in rows]))
        if key.endswith(("accuracy", "auc")):
            lo, hi = m["confidence_intervals"][f"{key}_ci_low"], m["confidence_intervals"][f"{key}_ci_high"]
            assert lo <= mean <= hi and hi - lo < 0.2
    assert all(r["n_train"] == 900 and r["n_test"] == 99 for r in rows)  # min(1000 − 100, 1024); the rest − 1


def test_refusals_are_one_line_and_touch_nothing(tmp_path: Path, tiny_model_dir, monkeypatch) -> None:
    run = _tiny_run(tmp_path, tiny_model_dir)
    before = tree_hash(tmp_path)
    r = CliRunner().invoke(app, ["evaluate", str(run), "--eval", "sae_probes", "-p",
                                 "sae_probes.datasets=no_such_set", "--device", "cpu"])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "no_such_set" in r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(app, ["evaluate", str(run), "--eval", "core", "--datasets", "cpu", "--device", "cpu"])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "add sae_probes to --eval" in r.output
    monkeypatch.setitem(sys.modules, "sae_probes", None)  # the package is not installed
    r = CliRunner().invoke(app, ["evaluate", str(run), "--eval", "sae_probes", "--device", "cpu"])
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "sae[probes]" in r.output
    assert tree_hash(tmp_path) == before
    from sae.evaluate.runner import _applicable

    assert "sae_probes" not in _applicable(None, None, None)  # the default set leaves it out then
