"""Absorption evaluation: planted absorption and feature splitting on synthetic activations with a
hand-built SAE, word/prompt construction, and the model-facing path on the tiny Gemma-3 model."""

from __future__ import annotations

import math

import pytest
import torch

from sae.evaluate.absorption import (
    LETTERS,
    Config,
    alphabetic_words,
    build_prompt,
    compute_absorption,
    encode_dense,
    k_sparse_probe,
    sample_words,
    word_absorption,
)
from sae.rundir.sae import SAE

pytestmark = pytest.mark.usefixtures("one_thread")


def planted_case(absorb_rates: dict[int, float], split_letter: int | None = None, n_train: int = 20,
                 n_test: int = 20, seed: int = 0):
    """Synthetic "model activations" with planted absorption and a hand-built ReLU SAE.

    Each word ``w`` of letter ``L`` has ``x_w = p_L + c_w`` (orthonormal parent/child directions, randomly
    rotated). SAE latents: one parent per letter (decoder ``p_L``) and one child per word. For an
    absorbing word the child's decoder is ``p_L + c_w`` and the parent's encoder ``p_L − Σ_absorbing c_w``
    (minus a small bias) keeps the parent silent on it; otherwise the child's decoder is ``c_w``.
    ``absorb_rates[letter]`` is the (exact) fraction of absorbing words in train and test. For
    ``split_letter`` the parent is replaced by two latents, each firing on half of the words
    (feature splitting, no absorption).

    Returns ``(x_train, y_train, x_test, y_test, sae)``.
    """
    g = torch.Generator().manual_seed(seed)
    letters = sorted(absorb_rates)
    n_words = len(letters) * (n_train + n_test)
    d = len(letters) + n_words + 1
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    basis = q.T.float()                                         # rows orthonormal
    parents = {lt: basis[i] for i, lt in enumerate(letters)}
    d_sae = len(letters) + 1 + n_words                          # + a spare latent for the split letter
    w_enc = torch.zeros(d, d_sae)
    w_dec = torch.zeros(d_sae, d)
    b_enc = torch.zeros(d_sae)
    xs, ys, train_mask = [], [], []
    w = 0
    for i, lt in enumerate(letters):
        w_enc[:, i] = parents[lt] * (1 + 1e-3)                 # pre = 1 when the parent fires, −1e-3 if not
        w_dec[i] = parents[lt]
        b_enc[i] = -1e-3
        for part, n in ((True, n_train), (False, n_test)):
            n_abs = round(absorb_rates[lt] * n)
            for j in range(n):
                c = basis[len(letters) + w]
                latent = len(letters) + 1 + w
                xs.append(parents[lt] + c)
                ys.append(lt)
                train_mask.append(part)
                w_enc[:, latent] = c
                if j < n_abs:                                   # absorbing child
                    w_dec[latent] = parents[lt] + c
                    w_enc[:, i] -= c * (1 + 1e-3)
                else:
                    w_dec[latent] = c
                if lt == split_letter and j % 2 == 1:            # second split latent takes odd words
                    w_enc[:, i] -= c * (1 + 1e-3)
                    w_enc[:, len(letters)] += c
                w += 1
        if lt == split_letter:
            w_dec[len(letters)] = parents[lt]                    # the parent keeps the even words
    sae = SAE(d, d_sae, activation="relu")
    with torch.no_grad():
        sae.W_enc.copy_(w_enc)
        sae.W_dec.copy_(w_dec)
        sae.b_enc.copy_(b_enc)
        sae.b_dec.zero_()
    x = torch.stack(xs)
    y = torch.tensor(ys)
    tm = torch.tensor(train_mask)
    return x[tm], y[tm], x[~tm], y[~tm], sae


def test_planted_absorption_is_recovered():
    rates = {0: 0.0, 1: 0.25, 2: 0.5, 3: 0.75}
    x_tr, y_tr, x_te, y_te, sae = planted_case(rates)
    assert torch.allclose(sae(x_te), x_te, atol=1e-4)            # the planted SAE reconstructs exactly
    cfg = Config()
    res = compute_absorption(x_tr, y_tr, x_te, y_te, encode_dense(sae, x_tr), encode_dense(sae, x_te),
                             sae.W_dec.detach(), cfg)
    by_letter = {r["first_letter"]: r for r in res.letters}
    assert res.metrics["n_letters_evaluated"] == 4
    for L, rate in rates.items():
        row = by_letter[LETTERS[L]]
        assert row["gt_probe_f1"] == pytest.approx(1.0)
        assert row["num_probe_true_positives"] == 20
        assert row["num_split_features"] == 1
        assert row["split_feats"] == [L]                         # the parent latent is the main latent
        assert row["mean_absorption_fraction"] == pytest.approx(rate, abs=1e-6)
        assert row["full_absorption_rate"] == pytest.approx(rate, abs=1e-6)
    assert res.metrics["mean_absorption_fraction_score"] == pytest.approx(sum(rates.values()) / 4, abs=1e-6)
    assert res.metrics["mean_full_absorption_score"] == pytest.approx(sum(rates.values()) / 4, abs=1e-6)
    assert res.metrics["mean_num_split_features"] == pytest.approx(1.0)
    assert res.metrics["mean_num_split_features_saebench"] == pytest.approx(0.0)  # SAEBench counts k - 1
    # 95 % word-bootstrap interval around the letter mean; letter a (rate 0) cannot vary, the others can
    m = res.metrics
    assert m["mean_absorption_fraction_score_ci_low"] < m["mean_absorption_fraction_score"] < \
        m["mean_absorption_fraction_score_ci_high"]
    assert m["mean_absorption_fraction_score_ci_high"] - m["mean_absorption_fraction_score_ci_low"] < 0.4
    # SAEBench's L1-probe ranking finds the same main latents on this planted case
    res_l1 = compute_absorption(x_tr, y_tr, x_te, y_te, encode_dense(sae, x_tr), encode_dense(sae, x_te),
                                sae.W_dec.detach(), Config(ranking="l1_probe"))
    assert [r["split_feats"] for r in res_l1.letters] == [r["split_feats"] for r in res.letters]
    assert res_l1.metrics["mean_absorption_fraction_score"] == pytest.approx(m["mean_absorption_fraction_score"])


def test_l1_probe_ranking_puts_the_predictive_latent_first_and_rejects_unknown_rankings():
    from sae.evaluate.absorption import rank_latents

    g = torch.Generator().manual_seed(0)
    y = torch.rand(400, generator=g) < 0.3
    f = torch.rand(400, 12, generator=g).relu() * 0.3
    f[:, 7] += y.float() * 2.0  # latent 7 fires on the letter
    f[:, 2] += (~y).float() * 2.0  # latent 2 fires on everything else: large |weight|, but negative
    assert rank_latents(f, y, 3, "l1_probe")[0] == 7 and 2 not in rank_latents(f, y, 1, "l1_probe")
    assert rank_latents(f, y, 3, "mean_diff")[0] == 7
    with pytest.raises(ValueError, match="ranking"):
        rank_latents(f, y, 3, "magic")


def test_feature_splitting_counts_split_latents():
    x_tr, y_tr, x_te, y_te, sae = planted_case({0: 0.0, 1: 0.0, 2: 0.0}, split_letter=1)
    f_tr, f_te = encode_dense(sae, x_tr), encode_dense(sae, x_te)
    ks = k_sparse_probe(f_tr, y_tr == 1, f_te, y_te == 1, max_k=10, f1_jump_threshold=0.03)
    assert sorted(ks.main_latents) == [1, 3]                      # parent (even words) + split latent (odd)
    assert ks.k == 2 and ks.f1_by_k[1] == pytest.approx(1.0)
    res = compute_absorption(x_tr, y_tr, x_te, y_te, f_tr, f_te, sae.W_dec.detach(), Config())
    row = {r["first_letter"]: r for r in res.letters}["b"]
    assert row["num_split_features"] == 2 and row["mean_absorption_fraction"] == 0.0
    assert res.metrics["mean_num_split_features"] == pytest.approx(4 / 3)


def test_word_absorption_formula_cases():
    """Hand cases of the SAEBench absorption-fraction rules (d = 3, probe direction e0)."""
    w_dec = torch.tensor([[1.0, 0, 0],      # 0: main latent, on the probe
                          [0.6, 0.8, 0],    # 1: absorber (cos 0.6)
                          [0.02, 0, 1.0]])  # 2: nearly orthogonal (cos 0.02 < 0.025)
    u = torch.tensor([1.0, 0, 0])
    cfg = Config()
    f = torch.tensor([[1.0, 0, 0],          # main explains everything → 0
                      [0.0, 2.0, 0],        # main silent, absorber carries a → 1, full
                      [0.5, 1.0, 0],        # partial: m = 0.5, S = 0.6, a = 1.1 → 0.6/1.1
                      [0.0, 0.0, 4.0]])     # only a near-orthogonal latent → neither
    x = f @ w_dec
    out = word_absorption(x, f, w_dec, u * 3.0, [0], cfg)
    assert out.fraction.tolist() == pytest.approx([0.0, 1.0, 0.6 / 1.1, 0.0], abs=1e-6)
    assert out.full.tolist() == [False, True, False, False]
    # the same latent with cos 0.05 (≥ 0.025 but < 0.1) counts for full absorption only
    w_dec2 = w_dec.clone()
    w_dec2[2] = torch.tensor([0.05, 0, 1.0])
    out2 = word_absorption(f[3:] @ w_dec2, f[3:], w_dec2, u, [0], cfg)
    assert out2.fraction.item() == 0.0 and out2.full.item()
    # negative probe projection: never absorption
    neg = word_absorption(-x[1:2], f[1:2], w_dec, u, [0], cfg)
    assert neg.fraction.item() == 0.0 and not neg.full.item()


def test_alphabetic_words_and_prompt(tiny_lm):
    tok = tiny_lm.tokenizer
    words = alphabetic_words(tok, min_len=2)
    assert words and all(w.strip().isalpha() and len(w.strip()) >= 2 for _, w in words)
    assert all(tok.convert_ids_to_tokens(i) not in tok.all_special_tokens for i, _ in words)
    chosen, is_train = sample_words(words, 260, 0.8, seed=0)
    assert len(chosen) == len(is_train) and len(chosen) <= 260
    assert chosen == sample_words(words, 260, 0.8, seed=0)[0]      # deterministic
    cfg = Config()
    ids, text = build_prompt(tok, tiny_lm.bos_token_id, chosen[0], chosen[1:3], cfg)
    assert ids[0] == tiny_lm.bos_token_id and ids[-1] == chosen[0][0]
    assert text.endswith(cfg.prompt_template.format(word=chosen[0][1]))
    assert text.count("has the first letter:") == 3


def test_run_on_tiny_model(tiny_lm, tiny_model_dir, tmp_path):
    from sae.evaluate.absorption import run
    from sae.evaluate.registry import EvalContext

    sae = SAE(64, 128, activation="topk", k=8)
    sae.init_weights(torch.Generator().manual_seed(0))
    ctx = EvalContext(lm=tiny_lm, hook_name="blocks.1.hook_resid_post", layer=1, dataset="embedded",
                      context_size=64, run_dir=tmp_path)
    out = run(sae, ctx, Config(max_words=260, max_k_value=3))
    m = out.metrics["mean"]
    for name in ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
                 "n_letters_evaluated"):
        assert name in m
    n = m["n_letters_evaluated"]
    assert 0 <= n <= 26
    if n:
        assert 0.0 <= m["mean_absorption_fraction_score"] <= 1.0
        assert 1.0 <= m["mean_num_split_features"] <= 3.0
    else:
        assert math.isnan(m["mean_absorption_fraction_score"])
    assert len(ctx.cache) == 2                                     # word activations + probes, SAE-independent
    run(sae, ctx, Config(max_words=260, max_k_value=3))
    assert len(ctx.cache) == 2


def test_evaluate_takes_eval_settings_from_the_command_line_and_validates_them(tmp_path) -> None:
    from typer.testing import CliRunner

    from sae.cli import app
    from sae.evaluate.runner import eval_settings

    cfg = eval_settings("absorption", {"ranking": "l1_probe", "max_words": "0", "max_icl_examples": "10"})
    assert (cfg.ranking, cfg.max_words, cfg.max_icl_examples) == ("l1_probe", 0, 10)
    with pytest.raises(ValueError, match="unknown setting"):
        eval_settings("absorption", {"rankng": "x"})
    with pytest.raises(ValueError, match="expected int"):
        eval_settings("absorption", {"max_words": "many"})
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--eval", "absorption", "-p", "absorption.rankng=x"])
    assert r.exit_code == 2 and "unknown setting" in r.output
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--eval", "absorption", "-p", "scr.n_values=1"])
    assert r.exit_code == 2 and "not one of the evaluations run here" in r.output
    r = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--eval", "absorption", "-p", "ranking"])
    assert r.exit_code == 2 and "EVAL.SETTING=VALUE" in r.output


def test_icl_groups_partition_each_split_and_draw_examples_from_it() -> None:
    import random

    from sae.evaluate.absorption import icl_groups

    words = [(100 + i, f"w{i}") for i in range(50)]
    is_train = [i % 5 != 0 for i in range(50)]                       # 40 train, 10 held-out
    groups = icl_groups(words, is_train, 4, 16, random.Random(0))
    members = [i for m, _ in groups for i in m]
    assert sorted(members) == list(range(50))                          # a partition of the words
    assert [len(m) for m, _ in groups] == [16, 16, 8, 6, 4]  # train first; held-out groups ≤ 10 − 4 words
    for m, examples in groups:
        split = {is_train[i] for i in m}
        assert len(split) == 1                                         # one split per group
        assert len(examples) == 4 and len(set(examples)) == 4
        assert all(is_train[e[0] - 100] == is_train[m[0]] for e in examples)  # examples from the same split
        assert not {e[0] for e in examples} & {words[i][0] for i in m}        # never a word of the group
    assert groups == icl_groups(words, is_train, 4, 16, random.Random(0))   # seeded
    assert groups != icl_groups(words, is_train, 4, 16, random.Random(1))


def test_shared_prefix_word_activations_equal_each_words_full_prompt(tiny_lm) -> None:
    """The grouped path (one KV-cached prefix per group) against a plain forward of each word's whole
    prompt, rebuilt from the same seeded groups."""
    import random

    from sae.evaluate.absorption import icl_groups, word_activations
    from sae.model import capture_resid_post

    cfg = Config(max_words=130, max_icl_examples=3, words_per_prefix=8, llm_batch_size=5)
    wa = word_activations(tiny_lm, 1, cfg)
    words, is_train = sample_words(alphabetic_words(tiny_lm.tokenizer, cfg.min_word_len), cfg.max_words,
                                   cfg.train_fraction, cfg.seed)
    assert wa.words == [w for _, w in words]
    groups = icl_groups(words, is_train, cfg.max_icl_examples, cfg.words_per_prefix, random.Random(cfg.seed + 1))
    checked = 0
    for members, examples in groups[::3]:
        for i in members:
            ids, _ = build_prompt(tiny_lm.tokenizer, tiny_lm.bos_token_id, words[i], examples, cfg)
            want = capture_resid_post(tiny_lm.model, torch.tensor([ids]), [1])[1][0, -1]
            torch.testing.assert_close(wa.acts[i], want.float(), atol=1e-5, rtol=1e-4)
            checked += 1
    assert checked >= 20
    assert wa.example_prompts[0].count("has the first letter:") == cfg.max_icl_examples + 1


def test_sparse_codes_and_config_checks() -> None:
    from sae.evaluate.absorption import sparse_codes

    f = torch.relu(torch.randn(30, 12)) * (torch.rand(30, 12) < 0.3)
    csr = sparse_codes(f)
    assert csr.nnz == int((f != 0).sum())
    assert torch.equal(torch.from_numpy(csr.toarray()), f.double())
    for bad in ({"ranking": "l2"}, {"words_per_prefix": 0}, {"max_icl_examples": -1}, {"train_fraction": 1.0}):
        with pytest.raises(ValueError):
            Config(**bad)
