"""Probing evaluations (sparse_probing, scr, tpp): offline tasks, probes on planted signals, SCR/TPP
on hand-built cases, and an end-to-end run through ``evaluate_runs`` on the tiny model."""

from __future__ import annotations

import functools
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from sae.evaluate import evaluate_runs
from sae.evaluate import scr as scr_mod
from sae.evaluate import sparse_probing as sp_mod
from sae.evaluate import tpp as tpp_mod
from sae.evaluate.datasets.tasks import (
    SCR_PAIRS,
    TASKS,
    binary_task,
    confounded_dataset,
    embedded_snippets,
    multiclass_dataset,
    split_group,
    split_snippets,
    verse_form,
    windows,
)
from sae.evaluate.probing import (
    TextActs,
    ablate_pooled,
    fit_probe,
    latent_effects,
    probe_scores,
    sae_pooled_codes,
    select_top_n,
    top_k_mean_diff,
)
from sae.harvest.corpus import PLAY_GENRES, in_split
from sae.rundir.results import read_result, validate_result
from sae.rundir.sae import SAE

HOOK = "blocks.1.hook_resid_post"
CTX = 64


pytestmark = pytest.mark.usefixtures("one_thread")


# -- tasks ------------------------------------------------------------------------------------------
def test_windows_and_verse_form():
    text = "\n\n".join(f"SPEAKER\nline {i} " + "word " * 20 for i in range(12))
    ws = windows(text, 150, 360)
    assert ws and all(150 <= len(w) <= 360 for w in ws)
    assert all(not w.startswith("\n") for w in ws)
    long_block = "\n".join("x" * 50 for _ in range(30))  # one 1529-char block is cut at line breaks
    assert all(len(w) <= 360 for w in windows(long_block, 100, 360)) and len(windows(long_block, 100, 360)) >= 4
    verse = ("HAMLET\nTo be, or not to be: that is the question:\nWhether 'tis nobler in the mind to suffer\n"
             "The slings and arrows of outrageous fortune,\nOr to take arms against a sea of troubles,\n"
             "And by opposing end them?")
    prose = ("BENEDICK\nO, she misused me past the endurance of a block!\nan oak but with one green leaf on it would"
             "\nanswered her; my very visor began to assume life and\nscold with her. She told me, not thinking"
             "\nmyself, that I was the prince's jester, that I was")
    assert verse_form(verse) == "verse" and verse_form(prose) == "prose"
    assert verse_form("ANTONIO\nNo.\n\nEnter SEBASTIAN") is None  # too few lines to tell


def test_known_documents_are_labelled():
    snips = embedded_snippets()
    by_play = {}
    for s in snips:
        if s.labels["source"] == "shakespeare":
            by_play.setdefault(s.labels["play"], s)
    expected = {"hamlet": "tragedies", "a-midsummer-night-s-dream": "comedies", "henry-v": "histories",
                "julius-caesar": "roman", "the-tempest": "romances", "measure-for-measure": "problems"}
    for play, genre in expected.items():
        s = by_play[play]
        assert s.labels["genre"] == genre and s.uid.startswith(f"shakespeare/{play}/")
        assert s.group == s.labels["doc_id"] and split_group(s, "play") == f"play/{play}"
    prose = next(s for s in snips if s.labels["doc_id"] == "prose/identifiers")
    assert prose.labels["source"] == "prose" and prose.group == "prose/identifiers" and "genre" not in prose.labels
    code = next(s for s in snips if s.labels["doc_id"] == "code/zipfile.py")
    assert code.labels["source"] == "code" and code.labels["package"] is None
    events = [s for s in snips if s.labels["doc_id"] == "code/asyncio/events.py"]
    assert events and all(s.labels["package"] == "asyncio" for s in events)
    for s in events:
        has_doc = '"""' in s.text or any(ln.strip().startswith("#") for ln in s.text.splitlines())
        assert s.labels["documented"] == ("yes" if has_doc else "no")
    assert {s.labels["documented"] for s in events} == {"yes", "no"}
    assert Counter(s.labels["form"] for s in snips if s.labels["source"] == "shakespeare")["verse"] > 1000


def test_split_is_by_group_and_prefers_corpus_test_documents():
    sp = split_snippets(0)
    train_groups = {s.group for s in sp["train"]}
    test_groups = {s.group for s in sp["test"]}
    assert not train_groups & test_groups
    for genre in PLAY_GENRES:  # every genre has unseen plays at test time and plays to train on
        assert any(s.labels.get("genre") == genre for s in sp["test"])
        assert any(s.labels.get("genre") == genre for s in sp["train"])
    held_out_docs = {s.group for s in embedded_snippets() if s.labels["source"] != "shakespeare"
                     and in_split(s.labels["doc_id"], "test")}
    assert held_out_docs and held_out_docs <= test_groups
    n_shk = Counter(s.labels["source"] for side in sp.values() for s in side)
    assert 0.2 < sum(s.labels["source"] == "shakespeare" for s in sp["test"]) / n_shk["shakespeare"] < 0.35
    by_play = split_snippets(0, split_by="play")  # the harder variant: whole plays held out
    plays = {side: {s.labels.get("play") for s in v if s.labels.get("play")} for side, v in by_play.items()}
    assert not plays["train"] & plays["test"] and len(plays["test"]) >= 6


@pytest.mark.parametrize("name", ["genre_comedies", "package_email", "prose_vs_code", "verse_vs_prose"])
def test_binary_tasks_are_deterministic_balanced_and_disjoint(name):
    a, b = binary_task(name, 40, 12, seed=0), binary_task(name, 40, 12, seed=0)
    assert [s.uid for s in a.train] == [s.uid for s in b.train] and a.test_labels == b.test_labels
    assert [s.uid for s in binary_task(name, 40, 12, seed=1).train] != [s.uid for s in a.train]
    assert len(a.train) == 80 and len(a.test) == 24
    assert sum(a.train_labels) == 40 and sum(a.test_labels) == 12
    assert not {s.group for s in a.train} & {s.group for s in a.test}
    assert len({s.uid for s in a.train + a.test}) == len(a.train) + len(a.test)
    spec = TASKS[name]
    for snips, labels in ((a.train, a.train_labels), (a.test, a.test_labels)):
        for s, y in zip(snips, labels, strict=True):
            attr, value = spec.positive
            assert (s.labels.get(attr) == value) == bool(y)
            assert y or any(s.labels.get(at) == v for at, v in spec.negatives)
    if name == "genre_comedies":  # negatives drawn evenly from the other five genres; play-level split
        hard = binary_task(name, 20, 8, split_by="play")
        assert not {s.labels["play"] for s in hard.train} & {s.labels["play"] for s in hard.test}
        neg = Counter(s.labels["genre"] for s, y in zip(a.train, a.train_labels, strict=True) if not y)
        assert set(neg) == set(PLAY_GENRES) - {"comedies"} and max(neg.values()) - min(neg.values()) <= 2


def test_multiclass_and_confounded_sets():
    mc = multiclass_dataset(("comedies", "histories", "tragedies"), "genre", n_train=20, n_test=8)
    assert all(len(v) == 20 for v in mc.train.values()) and all(len(v) == 8 for v in mc.test.values())
    ovr = mc.one_vs_rest("histories")
    assert sum(ovr.train_labels) == 20 and len(ovr.train) == 40
    assert Counter(s.labels["genre"] for s, y in zip(ovr.train, ovr.train_labels, strict=True) if not y) == \
        {"comedies": 10, "tragedies": 10}
    assert not {s.group for s in ovr.train} & {s.group for s in ovr.test}

    ds = confounded_dataset(("genre", "comedies", "tragedies"), ("form", "prose", "verse"), 40, 16)
    assert ds.quadrant_size("train") == 10 and ds.quadrant_size("test") == 4
    for side in ("train", "test"):
        quad = ds.train if side == "train" else ds.test
        for (la, lb), snips in quad.items():
            for s in snips:
                assert s.labels["genre"] == ("comedies" if la else "tragedies")
                assert s.labels["form"] == ("prose" if lb else "verse")
        snips, y = ds.binary("biased", side)  # A and B perfectly confounded
        assert all((s.labels["genre"] == "comedies") == (s.labels["form"] == "prose") == bool(t)
                   for s, t in zip(snips, y, strict=True))
        snips, y = ds.binary("a", side)  # labels = genre, form balanced within each class
        assert all((s.labels["genre"] == "comedies") == bool(t) for s, t in zip(snips, y, strict=True))
        assert Counter((t, s.labels["form"]) for s, t in zip(snips, y, strict=True)) == \
            dict.fromkeys([(1, "prose"), (1, "verse"), (0, "prose"), (0, "verse")], ds.quadrant_size(side))
        snips, y = ds.binary("b", side)
        assert all((s.labels["form"] == "prose") == bool(t) for s, t in zip(snips, y, strict=True))
    groups = {side: {s.group for q in (ds.train if side == "train" else ds.test).values() for s in q}
              for side in ("train", "test")}
    assert not groups["train"] & groups["test"]
    code = confounded_dataset(*SCR_PAIRS[1], 40, 16)  # package email/asyncio × documented yes/no
    snips, y = code.binary("biased", "train")
    assert all((s.labels["package"] == "email") == (s.labels["documented"] == "yes") == bool(t)
               for s, t in zip(snips, y, strict=True))


# -- planted signals --------------------------------------------------------------------------------
def identity_sae(d: int) -> SAE:
    """ReLU SAE with ``W_enc = [I, −I]``, ``W_dec = [I; −I]``: latent i = relu(x_i), latent d+i = relu(−x_i)."""
    sae = SAE(d, 2 * d, activation="relu")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def token_lists(means: np.ndarray, n_tok: int, noise: float, rng: np.random.Generator) -> list[torch.Tensor]:
    """Per text ``n_tok`` tokens = the text's mean vector + Gaussian noise."""
    return [torch.tensor(m + noise * rng.standard_normal((n_tok, len(m))), dtype=torch.float32) for m in means]


def test_sparse_probing_finds_a_planted_dimension():
    rng = np.random.default_rng(0)
    d, n = 16, 120
    y = np.array([0, 1] * n)
    means = rng.standard_normal((2 * n, d))
    means[:, 5] = 2.0 * y  # dimension 5 carries the label
    acts = TextActs.from_token_lists(token_lists(means, 4, 0.3, rng))
    x = acts.pooled.double().numpy()
    tr, te = slice(0, n), slice(n, 2 * n)
    llm, chosen = probe_scores(x[tr], y[tr], x[te], y[te], (1, 2, 5), "llm")
    assert llm["llm_test_accuracy"] > 0.95 and llm["llm_top_1_test_accuracy"] > 0.95
    assert chosen[1] == [5] and list(top_k_mean_diff(x[tr], y[tr], 3))[0] == 5
    sae = SAE(d, 32, activation="relu")
    sae.init_weights(torch.Generator().manual_seed(1))
    with torch.no_grad():  # latent 0 reads (and writes) dimension 5 exactly
        sae.W_enc[:, 0] = torch.nn.functional.one_hot(torch.tensor(5), d).float()
        sae.W_dec[0] = sae.W_enc[:, 0]
        sae.b_enc[0] = 0.0
    codes = sae_pooled_codes(sae, acts, batch_tokens=7).double().numpy()
    per_text = [sae.encode(acts.tokens[acts.offsets[j]:acts.offsets[j + 1]]).mean(0) for j in range(2 * n)]
    np.testing.assert_allclose(codes, torch.stack(per_text).detach().double().numpy(), atol=1e-5)
    scores, sae_chosen = probe_scores(codes[tr], y[tr], codes[te], y[te], (1, 2), "sae")
    assert scores["sae_top_1_test_accuracy"] > 0.95 and sae_chosen[1] == [0]
    assert fit_probe(codes[tr], y[tr]).accuracy(codes[te], y[te]) == scores["sae_test_accuracy"] > 0.95


def test_pooled_ablation_and_effects_are_exact():
    """Ablating per token then pooling == ablating the pooled vector; the signed effect equals the
    drop of the probe's mean logit gap when the latent is ablated."""
    rng = np.random.default_rng(1)
    d = 8
    sae = SAE(d, 24, activation="topk", k=4)
    sae.init_weights(torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.3)
    per_text = [torch.tensor(rng.standard_normal((int(rng.integers(1, 6)), d)), dtype=torch.float32)
                for _ in range(30)]
    acts = TextActs.from_token_lists(per_text)
    codes = sae_pooled_codes(sae, acts).double().numpy()
    w_dec = sae.W_dec.detach().double().numpy()
    latents = [3, 7, 11]
    with torch.no_grad():
        manual = []
        for t in per_text:
            f = sae.encode(t)
            err = t - sae.decode(f)
            f[:, latents] = 0.0
            manual.append((sae.decode(f) + err).mean(0))
    assert not np.allclose(codes[:, latents], 0)
    np.testing.assert_allclose(ablate_pooled(acts.pooled.numpy(), codes, w_dec, latents),
                               torch.stack(manual).double().numpy(), atol=1e-5)
    y = np.array([0, 1] * 15)
    x = acts.pooled.double().numpy()
    probe = fit_probe(x, y)

    def gap(xx: np.ndarray) -> float:
        z = probe.decision(xx)
        return float(z[y == 1].mean() - z[y == 0].mean())

    signed = latent_effects(codes, y, probe, w_dec, "scr")
    for i in range(24):
        drop = gap(x) - gap(ablate_pooled(x, codes, w_dec, [i]))
        assert abs(drop) == pytest.approx(signed[i], abs=1e-9)
    assert list(select_top_n(np.array([0.0, 3.0, -1.0, 2.0, 0.0]), 4)) == [1, 3, 2]


def scr_case(rng: np.random.Generator, n: int = 200):
    """Pooled inputs of the three SCR sets: dim 0 = A (weak, noisy), dim 1 = B (strong, ±3)."""
    d = 6

    def make(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        m = rng.standard_normal((len(a), d))
        m[:, 0] = (2 * a - 1) * 1.0 + rng.standard_normal(len(a))
        m[:, 1] = (2 * b - 1) * 3.0 + 0.3 * rng.standard_normal(len(a))
        return m

    sae = identity_sae(d)
    x, f, y = {}, {}, {}
    for side in ("train", "test"):
        lab = np.array([0, 1] * (n // 2))
        other = np.array([0, 0, 1, 1] * (n // 4))  # balanced within each class
        for which, (a, b, yy) in {"biased": (lab, lab, lab), "a": (lab, other, lab), "b": (other, lab, lab)}.items():
            acts = TextActs.from_token_lists(token_lists(make(a, b), 3, 0.1, rng))
            x[which, side] = acts.pooled.double().numpy()
            f[which, side] = sae_pooled_codes(sae, acts).double().numpy()
            y[which, side] = yy
    return x, f, y, sae.W_dec.detach().double().numpy()


def test_scr_removes_a_planted_spurious_latent():
    x, f, y, w_dec = scr_case(np.random.default_rng(2))
    metrics, extra = scr_mod.scr_pair(x, f, y, w_dec, (1, 2, 5))
    clean = extra["clean_accuracies"]
    assert clean["acc_a_probe_on_a"] > clean["acc_biased_probe_on_a"] + 0.1  # the biased probe leans on B
    assert extra["metric_direction"] == 1
    assert extra["top_latents"]["dir1"][0] in (1, 7) and set(extra["top_latents"]["dir1"][:2]) == {1, 7}
    assert extra["top_latents"]["dir2"][0] in (0, 6)
    assert metrics["scr_metric_threshold_2"] == metrics["scr_dir1_threshold_2"] > 0.6
    assert metrics["scr_dir1_threshold_5"] > 0.3
    assert set(metrics) == {f"scr_{m}_threshold_{n}" for m in ("dir1", "metric", "dir2") for n in (1, 2, 5)}


def test_tpp_planted_latents_hit_their_own_class():
    rng = np.random.default_rng(3)
    d, classes, n = 6, ("a", "b", "c"), 60
    sae = identity_sae(d)
    w_dec = sae.W_dec.detach().double().numpy()

    def texts(cls: int, m: int) -> np.ndarray:
        out = 0.3 * rng.standard_normal((m, d))
        out[:, cls] += 3.0
        return out

    sets = {}
    for ci, c in enumerate(classes):
        sets[c] = {}
        for side, m in (("train", n), ("test", n // 2)):
            others = [k for k in range(3) if k != ci]
            means = np.concatenate([texts(ci, m)] + [texts(k, m // 2) for k in others])
            acts = TextActs.from_token_lists(token_lists(means, 2, 0.1, rng))
            sets[c][side] = (acts.pooled.double().numpy(), sae_pooled_codes(sae, acts).double().numpy(),
                             np.array([1] * m + [0] * m))
    means, extra = tpp_mod.tpp_scores(sets, w_dec, (1, 2, 20))
    assert all(extra["clean_accuracies"][c] > 0.95 for c in classes)
    assert [extra["top_latents"][c][0] for c in classes] == [0, 1, 2]
    assert means["tpp_threshold_1_intended_diff_only"] > means["tpp_threshold_1_unintended_diff_only"] + 0.3
    assert means["tpp_threshold_1_total_metric"] == pytest.approx(
        means["tpp_threshold_1_intended_diff_only"] - means["tpp_threshold_1_unintended_diff_only"])
    for c in classes:
        pc = extra["per_class"][c]
        assert pc["tpp_threshold_1_intended_diff_only"] > 0.3
    assert set(means) == {f"tpp_threshold_{n}_{m}" for n in (1, 2, 20)
                          for m in ("total_metric", "intended_diff_only", "unintended_diff_only")}
    ci = tpp_mod.tpp_bootstrap_ci(extra["_hits"], classes, (1, 2, 20), 1000, 0)  # resampled test examples
    lo, hi = ci["tpp_threshold_1_total_metric_ci_low"], ci["tpp_threshold_1_total_metric_ci_high"]
    assert lo < means["tpp_threshold_1_total_metric"] < hi and hi - lo < 0.3


def test_available_reasons():
    ctx = None  # the embedded corpus check does not look at the context
    assert sp_mod.available(ctx) is None and scr_mod.available(ctx) is None and tpp_mod.available(ctx) is None
    reason = sp_mod.available(ctx, sp_mod.Config(hf_datasets=("hf:LabHC/bias_in_bios_class_set1",)))
    assert reason and "bias_in_bios" in reason
    assert tpp_mod.available(ctx, tpp_mod.Config(hf_dataset="hf:someone/unknown")) is not None


# -- end to end -------------------------------------------------------------------------------------
def small_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    common = {"seed": 0, "llm_batch_size": 16}
    monkeypatch.setattr(sp_mod, "Config", functools.partial(
        sp_mod.Config, tasks=("genre_comedies", "package_email"), n_train=12, n_test=6, k_values=(1, 2, 5),
        **common))
    monkeypatch.setattr(scr_mod, "Config", functools.partial(
        scr_mod.Config, pairs=SCR_PAIRS[:1], train_set_size=24, test_set_size=12, n_values=(2, 5, 500),
        **common))
    monkeypatch.setattr(tpp_mod, "Config", functools.partial(
        tpp_mod.Config, classes=("asyncio", "email", "xml"), n_train=10, n_test=6, n_values=(2, 5, 500),
        **common))


def test_evaluate_runs_end_to_end(tmp_path: Path, tiny_model_dir, tiny_lm, monkeypatch):
    import sae.evaluate.probing as probing

    small_configs(monkeypatch)
    forwarded = []
    real = probing.capture_resid_post

    def counting(model, ids, layers, attention_mask=None):
        forwarded.append(int(ids.shape[0]))
        assert ids.shape[1] <= CTX
        return real(model, ids, layers, attention_mask)

    monkeypatch.setattr(probing, "capture_resid_post", counting)
    runs = []
    for i, seed in enumerate((0, 1)):  # a TopK and a JumpReLU SAE (the saved form of BatchTopK/Matryoshka)
        sae = SAE(64, 128, activation="topk", k=8) if i == 0 else SAE(64, 128, activation="jumprelu")
        sae.init_weights(torch.Generator().manual_seed(seed))
        if i == 1:
            sae.threshold.fill_(0.05)
        run = tmp_path / f"run{i}"
        sae.save(run, {"model_name": str(tiny_model_dir), "hook_name": HOOK, "hook_layer": 1,
                       "dataset_path": "embedded", "context_size": CTX, "d_in": 64})
        runs.append(run)
    evals = ["sparse_probing", "scr", "tpp"]
    one = evaluate_runs(runs[:1], evals=evals, n_tokens=256, device="cpu", quiet=True, use_cache=False)
    n_one = sum(forwarded)
    forwarded.clear()
    both = evaluate_runs(runs, evals=evals, n_tokens=256, device="cpu", quiet=True, use_cache=False)
    assert sum(forwarded) == n_one > 0  # the second SAE reuses every cached LLM activation
    forwarded.clear()
    evaluate_runs(runs[:1], evals=evals, n_tokens=256, device="cpu", quiet=True)  # fills the disk cache
    assert sum(forwarded) == n_one
    forwarded.clear()
    again = evaluate_runs(runs[:1], evals=evals, n_tokens=256, device="cpu", quiet=True)  # a later call
    assert sum(forwarded) == 0 and [r["eval_result_metrics"] for r in again] == [
        r["eval_result_metrics"] for r in one]
    assert len(one) == 3 and len(both) == 6
    for run in runs:
        res = {e: read_result(run, e) for e in evals}
        for r in res.values():
            validate_result(r)
        sp = res["sparse_probing"]["eval_result_metrics"]
        assert set(sp) == {"llm", "sae", "confidence_intervals"}
        for k, v in {**sp["llm"], **sp["sae"]}.items():  # 95 % Wilson intervals around every mean accuracy
            assert sp["confidence_intervals"][f"{k}_ci_low"] <= v <= sp["confidence_intervals"][f"{k}_ci_high"], k
        assert set(sp["llm"]) == {"llm_test_accuracy"} | {f"llm_top_{k}_test_accuracy" for k in (1, 2, 5)}
        assert set(sp["sae"]) == {"sae_test_accuracy"} | {f"sae_top_{k}_test_accuracy" for k in (1, 2, 5)}
        assert all(0.0 <= v <= 1.0 for v in sp["llm"].values())
        assert [d["dataset_name"] for d in res["sparse_probing"]["eval_result_details"]] == \
            ["genre_comedies", "package_email"]
        scr = res["scr"]["eval_result_metrics"]["scr_metrics"]
        assert {f"scr_metric_threshold_{n}" for n in (2, 5, 500)} <= set(scr)
        assert res["scr"]["eval_config"]["n_values_effective"] == [2, 5, 128]
        ci = res["scr"]["eval_result_metrics"]["confidence_intervals"]
        for n in (2, 5, 500):  # paired bootstrap intervals over test examples (checked in the test below)
            if f"scr_metric_threshold_{n}_ci_low" in ci:
                assert ci[f"scr_metric_threshold_{n}_ci_low"] <= ci[f"scr_metric_threshold_{n}_ci_high"]
        tpp = res["tpp"]["eval_result_metrics"]["tpp_metrics"]
        assert {f"tpp_threshold_{n}_total_metric" for n in (2, 5, 500)} <= set(tpp)
        assert all(v is None or math.isfinite(v) for v in tpp.values())
        assert res["tpp"]["eval_result_unstructured"]["classes"] == ["asyncio", "email", "xml"]
    # the LLM half of sparse probing does not depend on the SAE
    a, b = (read_result(r, "sparse_probing")["eval_result_metrics"]["llm"] for r in runs)
    assert a == b


def test_scr_bootstrap_interval_from_per_example_hits() -> None:
    """The interval of (changed − original)/(oracle − original), resampling test examples in pairs: it brackets
    the full-sample value and is degenerate when every example agrees."""
    from sae.evaluate.scr import scr_bootstrap_ci

    rng = np.random.default_rng(0)
    n = 200
    orig = (rng.random(n) < 0.6).astype(float)
    oracle = np.maximum(orig, (rng.random(n) < 0.9).astype(float))
    changed = np.where(rng.random(n) < 0.5, oracle, orig)
    hits = {"dir1_original": orig, "dir1_oracle": oracle, "dir1_2": changed}
    ci = scr_bootstrap_ci([(1, hits)], [2], 2000, 0)
    full = (changed.mean() - orig.mean()) / (oracle.mean() - orig.mean())
    assert ci["scr_metric_threshold_2_ci_low"] < full < ci["scr_metric_threshold_2_ci_high"]
    assert 0.05 < ci["scr_metric_threshold_2_ci_high"] - ci["scr_metric_threshold_2_ci_low"] < 0.6
    same = {"dir1_original": np.zeros(n), "dir1_oracle": np.ones(n), "dir1_2": np.ones(n)}
    ci = scr_bootstrap_ci([(1, same)], [2], 500, 0)
    assert ci["scr_metric_threshold_2_ci_low"] == ci["scr_metric_threshold_2_ci_high"] == 1.0
