"""Geometry evaluation: chunked pairwise cosines, condition numbers and clustering against dense NumPy
references; learned groups, Jaccard stability and densities read from a run directory."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from sae.evaluate.geometry import (
    Config,
    available,
    cluster_groups,
    compute_geometry,
    condition_numbers,
    find_learned_groups,
    jaccard_series,
    pairwise_cosine_stats,
    run,
)
from sae.evaluate.registry import EvalContext, eval_module
from sae.rundir.results import read_result, write_result
from sae.rundir.sae import SAE
from tests.helpers import write_store

pytestmark = pytest.mark.usefixtures("one_thread")


def dense_abs_cos(W: np.ndarray) -> np.ndarray:
    """Reference |cos| matrix ``[n, n]`` with a zero diagonal."""
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    C = np.abs(U @ U.T)
    np.fill_diagonal(C, 0.0)
    return C


def random_sae(d_in: int, d_sae: int, seed: int = 0) -> SAE:
    sae = SAE(d_in, d_sae, "topk", k=4)
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # an encoder that is not just the decoder transposed
        sae.W_enc.add_(0.3 * torch.randn(d_in, d_sae, generator=torch.Generator().manual_seed(seed + 1)))
    sae.cfg = {"variant": "topk", "variant_config": {}, "hook_name": "blocks.0.hook_resid_post"}
    return sae


def test_pairwise_stats_match_dense_reference() -> None:
    W = torch.randn(301, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64).float()
    st = pairwise_cosine_stats(W, thresholds=(0.3, 0.5, 0.8), chunk_size=64)  # 5 chunks, last one partial
    C = dense_abs_cos(W.double().numpy())
    np.testing.assert_allclose(st.max_abs_cos.numpy(), C.max(1), rtol=1e-5, atol=1e-6)
    assert (st.nearest.numpy() == C.argmax(1)).all()
    iu = np.triu_indices(301, 1)
    for t in (0.3, 0.5, 0.8):
        assert st.pairs_above[t] == int((C[iu] > t).sum())
    assert st.n_pairs == 301 * 300 // 2
    assert st.pairs_above[0.3] > st.pairs_above[0.5] > 0


def test_planted_duplicates_give_max_cos_one_and_counts() -> None:
    sae = random_sae(32, 100)
    with torch.no_grad():
        sae.W_dec[10] = sae.W_dec[3]
        sae.W_dec[20] = -sae.W_dec[7]          # antiparallel: |cos| = 1 too
        sae.W_dec[30] = sae.W_dec[3]           # a triple: pairs (3,10), (3,30), (10,30)
    out = compute_geometry(sae, cfg=Config(chunk_size=32, groups="none"))
    dec = out.metrics["decoder"]
    C = dense_abs_cos(sae.W_dec.detach().double().numpy())
    iu = np.triu_indices(100, 1)
    for i in (3, 10, 30, 7, 20):
        assert out.details[i]["max_decoder_cos"] == pytest.approx(1.0, abs=1e-6)
    assert dec["max_max_cos"] == pytest.approx(1.0, abs=1e-6)
    assert dec["n_pairs_above_0p8"] == int((C[iu] > 0.8).sum()) >= 4
    assert dec["frac_pairs_above_0p8"] == pytest.approx(dec["n_pairs_above_0p8"] / 4950)
    assert dec["n_pairs_above_0p5"] == int((C[iu] > 0.5).sum())
    assert dec["frac_latents_max_cos_above_0p8"] == pytest.approx(float((C.max(1) > 0.8).mean()))
    assert dec["mean_max_cos"] == pytest.approx(float(C.max(1).mean()), abs=1e-6)
    assert dec["median_max_cos"] == pytest.approx(float(np.median(C.max(1))), abs=1e-3)  # torch: lower median
    E = dense_abs_cos(sae.W_enc.detach().double().numpy().T)
    assert out.metrics["encoder"]["mean_max_cos"] == pytest.approx(float(E.max(1).mean()), abs=1e-6)
    assert out.metrics["encoder"]["n_pairs_above_0p5"] == int((E[iu] > 0.5).sum())


def test_condition_numbers_match_numpy_cond() -> None:
    g = torch.Generator().manual_seed(1)
    W = torch.randn(80, 16, generator=g, dtype=torch.float64)
    groups = torch.randint(0, 4, (80,), generator=g)
    groups[:5] = -1                         # unassigned latents
    groups[5:25] = 7                        # 20 rows > d_in = 16: κ of a tall block
    groups[25] = 9                          # a singleton: no κ
    groups[26:29] = 11
    W[28] = 3 * W[26]                       # group 11 is rank-deficient → κ = inf
    res = {r["group"]: r for r in condition_numbers(W.float(), groups)}
    assert 9 not in res and -1 not in res
    U = (W / W.norm(dim=1, keepdim=True)).numpy()
    for gid, r in res.items():
        members = (groups == gid).numpy()
        assert r["size"] == members.sum()
        if gid == 11:
            assert math.isinf(r["kappa"])
        else:
            assert r["kappa"] == pytest.approx(np.linalg.cond(U[members]), rel=1e-4)


def test_cluster_groups_recovers_planted_directions() -> None:
    g = torch.Generator().manual_seed(2)
    centers = torch.linalg.qr(torch.randn(32, 4, generator=g))[0].T          # 4 orthonormal directions
    truth = torch.arange(40) % 4
    signs = torch.where(torch.rand(40, generator=g) < 0.5, -1.0, 1.0)         # |cos| ignores sign
    W = signs[:, None] * (centers[truth] + 0.05 * torch.randn(40, 32, generator=g))
    found = cluster_groups(W, 4, seed=0)
    pairs = {(int(a), int(b)) for a, b in zip(truth, found, strict=True)}
    assert len(pairs) == 4 and len({b for _, b in pairs}) == 4                # a bijection of labels


def test_learned_groups_stability_and_core_density_from_run_dir(tmp_path: Path) -> None:
    sae = random_sae(16, 48)
    sae.cfg["variant"] = "adaptive"
    groups = [i % 6 for i in range(48)]
    (tmp_path / "groups.json").write_text(json.dumps({"groups": groups}))
    recs = [{"step": s, "tokens": 100 * (s + 1), "loss": 1.0, "penalty/jaccard": j, "penalty/alpha": 0.1}
            for s, j in zip(range(0, 40, 10), (None, 0.5, 0.7, 0.9), strict=True)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    density = [0.0] * 8 + [10.0 ** (-i / 10) for i in range(40)]
    write_result(tmp_path, "core", {}, {"sparsity": {"l0": 4.0}},
                 [{"index": i, "feature_density": d} for i, d in enumerate(density)])
    out = compute_geometry(sae, run_dir=tmp_path)
    lg = out.metrics["learned_groups"]  # the run's own groups: a separate, labelled metric
    assert lg["available"] == 1 and out.unstructured["learned_group_source"] == "learned (groups.json)"
    assert lg["n_groups"] == 6 and lg["mean_group_size"] == 8
    assert [d["learned_group"] for d in out.details] == groups
    W = sae.W_dec.detach().double().numpy()
    U = W / np.linalg.norm(W, axis=1, keepdims=True)
    kappas = [np.linalg.cond(U[np.asarray(groups) == g]) for g in range(6)]
    assert lg["max_kappa"] == pytest.approx(max(kappas), rel=1e-4)
    # the comparable κ: the same k-means grouping (k = ceil(48 / 32) = 2) as for any other run
    src = out.unstructured["group_source"]
    assert src.startswith("clustered") and "into 2 groups" in src
    clustered = np.asarray([d["group"] for d in out.details])
    want = [np.linalg.cond(U[clustered == g]) for g in np.unique(clustered) if (clustered == g).sum() >= 2]
    assert out.metrics["groups"]["max_kappa"] == pytest.approx(max(want), rel=1e-4)
    assert out.metrics["stability"] == pytest.approx({"mean_jaccard": 0.7, "final_jaccard": 0.9,
                                                      "min_jaccard": 0.5})
    assert out.unstructured["jaccard"]["tokens"] == [1100, 2100, 3100]
    assert out.unstructured["final_penalty_logs"] == {"penalty/jaccard": 0.9, "penalty/alpha": 0.1}
    assert out.metrics["density"]["frac_dead"] == pytest.approx(8 / 48)
    assert out.unstructured["density_source"] == "eval_results/core.json"
    hist = out.unstructured["histograms"]["log10_density"]
    assert hist["n_dead"] == 8 and sum(hist["counts"]) == 40
    assert sum(out.unstructured["histograms"]["max_decoder_cos"]["counts"]) == 48
    # the result file round-trips through the SAEBench-shaped schema
    write_result(tmp_path, "geometry", out.eval_config, out.metrics, out.details, sae.cfg, out.unstructured)
    assert read_result(tmp_path, "geometry")["eval_result_metrics"]["learned_groups"]["available"] == 1


def test_group_sources_checkpoint_and_metrics_then_clustering(tmp_path: Path) -> None:
    d_sae = 24
    assert find_learned_groups(tmp_path, d_sae)[0] is None
    rec = {"step": 5, "penalty/group_sizes": [12, 12], "penalty/group": [i // 12 for i in range(d_sae)]}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(rec) + "\n")
    groups, src = find_learned_groups(tmp_path, d_sae)
    assert groups.tolist() == rec["penalty/group"] and "metrics.jsonl penalty/group" in src
    state = {"trainer": {"model": {"sae.W_dec": torch.zeros(d_sae, 4), "penalty.group": torch.arange(d_sae) % 3}}}
    torch.save(state, tmp_path / "checkpoint.pt")
    groups, src = find_learned_groups(tmp_path, d_sae)
    assert groups.tolist() == [i % 3 for i in range(d_sae)] and "checkpoint.pt" in src
    # a plain run: groups come from clustering, and the result says so
    sae = random_sae(8, 64)
    out = compute_geometry(sae, run_dir=tmp_path / "nothing", cfg=Config(n_groups=4))
    assert out.metrics["learned_groups"]["available"] == 0 and out.metrics["learned_groups"]["median_kappa"] is None
    assert out.unstructured["group_source"].startswith("clustered") and "4 groups" in out.unstructured["group_source"]
    assert out.metrics["groups"]["n_groups"] <= 4 and out.metrics["stability"]["mean_jaccard"] is None
    assert out.metrics["density"]["frac_dead"] is None


def test_jaccard_series_absent_and_other_key() -> None:
    assert jaccard_series([{"step": 0, "loss": 1.0}]) is None
    s = jaccard_series([{"step": 0, "tokens": 8, "penalty/pair_jaccard": 0.25},
                        {"step": 1, "tokens": 16, "penalty/pair_jaccard": 0.75}])
    assert s["key"] == "penalty/pair_jaccard" and s["mean"] == 0.5 and s["tokens"] == [8, 16]


def test_density_from_store_and_registry_entry(tmp_path: Path) -> None:
    n, d, cs = 512, 8, 64
    x = -torch.ones(n, d)
    fires = [3, 70, 71, 200, 511]
    x[fires, 0] = 2.0
    store = write_store(tmp_path / "s.zarr", x, context_size=cs, chunk_tokens=128)
    sae = SAE(d, 4, "relu")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(d)[:, :4])
        sae.W_dec.copy_(torch.eye(d)[:4])
    sae.cfg = {"variant": "relu", "hook_name": "blocks.0.hook_resid_post", "store_path": str(store)}
    ctx = EvalContext(lm=None, hook_name="blocks.0.hook_resid_post", layer=0, dataset="synthetic",  # type: ignore[arg-type]
                      context_size=cs, run_dir=tmp_path / "run", store_path=str(store))
    assert eval_module("geometry").EVAL_TYPE_ID == "geometry" and available(ctx) is None
    out = run(sae, ctx, Config(groups="cluster", n_groups=2))
    n_valid = n - n // cs                                   # BOS rows (every 64th, activation 1000) excluded
    dens = [r["feature_density"] for r in out.details]
    assert dens[0] == pytest.approx(len(fires) / n_valid) and dens[1:] == [0.0, 0.0, 0.0]
    assert out.metrics["density"]["frac_dead"] == 0.75
    assert "store" in out.unstructured["density_source"]
    assert out.metrics["decoder"]["max_max_cos"] == pytest.approx(0.0, abs=1e-7)   # orthonormal rows
    assert out.eval_config["thresholds"] == [0.5, 0.8]


def test_each_result_is_written_as_soon_as_its_sae_is_done(tmp_path: Path, tiny_model_dir, monkeypatch) -> None:
    """An evaluation that fails on the second SAE keeps the first SAE's result file (runner writes per SAE)."""
    from sae.evaluate import evaluate_runs
    from sae.rundir.results import read_result

    runs = []
    for i in range(2):
        sae = SAE(64, 128, "topk", k=8)
        sae.init_weights(torch.Generator().manual_seed(i))
        sae.save(tmp_path / f"run{i}", {"model_name": str(tiny_model_dir), "hook_name": "blocks.1.hook_resid_post",
                                        "hook_layer": 1, "dataset_path": "embedded", "context_size": 64, "d_in": 64})
        runs.append(tmp_path / f"run{i}")
    mod = eval_module("geometry")
    real, calls = mod.run, []

    def failing_second(sae, ctx, cfg):  # type: ignore[no-untyped-def]
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the machine went away")
        return real(sae, ctx, cfg)

    monkeypatch.setattr(mod, "run", failing_second)
    with pytest.raises(RuntimeError, match="went away"):
        evaluate_runs(runs, evals=["geometry"], device="cpu", quiet=True)
    assert read_result(runs[0], "geometry")["eval_type_id"] == "geometry"
    assert not (runs[1] / "eval_results" / "geometry.json").exists()
