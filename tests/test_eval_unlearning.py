"""Unlearning evaluation: the offline MCQ sets and the WMDP-format loader, latent selection on a planted
case, the clamping intervention on the tiny Gemma-3 model, the score, and both new evaluations end to
end through ``evaluate_runs``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from sae.evaluate import evaluate_runs
from sae.evaluate.datasets.mcq import (
    BLANK,
    MCQ,
    _build_cached,
    build_mcq_set,
    format_prompt,
    load_mcq_jsonl,
    save_mcq_jsonl,
)
from sae.evaluate.unlearning import (
    binomial_p_above_chance,
    build_prompts,
    clamp_patch,
    cloze_texts,
    feature_frequencies,
    firing_latents,
    mcq_baseline,
    mcq_scores,
    select_latents,
    token_logprobs,
    unlearning_score,
)
from sae.rundir.results import validate_result
from sae.rundir.sae import SAE

HOOK = "blocks.1.hook_resid_post"


pytestmark = pytest.mark.usefixtures("one_thread")


# -- MCQ sets -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["python", "shakespeare"])
def test_mcq_builder_is_deterministic_and_well_formed(name):
    qs = build_mcq_set(name, 40, seed=3)
    _build_cached.cache_clear()
    again = build_mcq_set(name, 40, seed=3)
    assert qs == again and len(qs) == 40
    assert build_mcq_set(name, 40, seed=4) != qs
    for q in qs:
        assert len(q.choices) == 4 and 0 <= q.answer < 4
        lowered = [c.lower() for c in q.choices]
        assert len(set(lowered)) == 4                                # the true answer appears exactly once
        assert BLANK in q.question
        key = q.choices[q.answer]
        if "keyword" not in q.question:                              # cloze: the blank was the key's only occurrence
            assert key.lower() not in {w.strip('".,;:!?\'').lower() for w in q.question.split()}
    assert len({q.answer for q in qs}) > 1                            # answer positions are shuffled
    if name == "python":
        assert any("Python documentation" in q.question for q in qs)
        assert any("keyword" in q.question for q in qs)


def test_format_prompt():
    q = MCQ("What is 2+2?", ("3", "4", "5", "22"), 1)
    p = format_prompt(q, "arithmetic")
    assert p.startswith("The following are multiple choice questions (with answers) about arithmetic.")
    assert p.endswith("\nA. 3\nB. 4\nC. 5\nD. 22\nAnswer:")


def test_wmdp_jsonl_loader(tmp_path):
    rows = [{"question": "Which organism?", "choices": ["a", "b", "c", "d"], "answer": 2, "id": 7},
            {"question": "Second?", "choices": ["w", "x", "y", "z"], "answer": 0}]
    path = tmp_path / "wmdp.jsonl"
    path.write_text(json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1]) + "\n")
    qs = load_mcq_jsonl(path)
    assert [(q.question, q.choices, q.answer) for q in qs] == [
        ("Which organism?", ("a", "b", "c", "d"), 2), ("Second?", ("w", "x", "y", "z"), 0)]
    assert len(load_mcq_jsonl(path, max_questions=1)) == 1
    assert load_mcq_jsonl(save_mcq_jsonl(qs, tmp_path / "copy.jsonl")) == qs
    for bad in ({"question": "q", "choices": ["a", "b", "c"], "answer": 0},
                {"question": "q", "choices": ["a", "b", "c", "d"], "answer": 4},
                {"question": "q", "choices": ["a", "b", "c", "d"], "answer": True},
                {"question": "", "choices": ["a", "b", "c", "d"], "answer": 1}):
        (tmp_path / "bad.jsonl").write_text(json.dumps(bad) + "\n")
        with pytest.raises(ValueError, match="bad.jsonl:1"):
            load_mcq_jsonl(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError):
        load_mcq_jsonl(tmp_path / "missing.jsonl")


# -- latent selection -----------------------------------------------------------------------------
def test_select_latents_on_planted_frequencies():
    forget = torch.tensor([0.5, 0.9, 0.2, 0.0, 0.5])
    retain = torch.tensor([0.0, 0.3, 0.0005, 0.0, 0.0002])
    assert select_latents(forget, retain, 0.001, 10) == [0, 4, 2]    # ties on forget: lower retain first
    assert select_latents(forget, retain, 0.001, 2) == [0, 4]
    assert select_latents(forget, retain, 0.0001, 10) == [0]
    assert select_latents(forget, retain, 0.5, 10) == [1, 0, 4, 2]
    assert select_latents(forget, retain, 0.001, 10, min_forget_freq=0.3) == [0, 4]


def test_selection_from_sae_codes():
    """A latent reading a direction present only in forget text is chosen; one present in both is not."""
    d = 8
    sae = SAE(d, 4, activation="relu")
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(eye[:, :4])                 # latent i reads direction e_i
        sae.W_dec.copy_(eye[:4])
        sae.b_enc.fill_(-0.5)
        sae.b_dec.zero_()
    g = torch.Generator().manual_seed(0)
    noise = 0.1 * torch.randn(200, d, generator=g)
    forget = noise.clone()
    forget[:100, 0] += 1.0                          # e0: forget only (half the tokens)
    forget[:, 1] += 1.0                             # e1: everywhere
    retain = noise.clone()
    retain[:, 1] += 1.0
    ff, rf = feature_frequencies(sae, forget), feature_frequencies(sae, retain)
    assert ff[0] == pytest.approx(0.5) and rf[0] == 0.0 and rf[1] == 1.0
    assert select_latents(ff, rf, 0.01, 10) == [0]


# -- the intervention -----------------------------------------------------------------------------
def random_sae(seed: int = 0) -> SAE:
    sae = SAE(64, 128, activation="topk", k=8)
    sae.init_weights(torch.Generator().manual_seed(seed))
    return sae


def test_clamp_patch_formula():
    sae = random_sae()
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 5, dtype=torch.bool)
    keep[:, 0] = False                                               # BOS-like position untouched
    f = sae.encode(h.reshape(-1, 64)).reshape(2, 5, -1)
    i = int((f[:, 1:] > 0).sum((0, 1)).argmax())                     # a latent that fires somewhere
    out = clamp_patch(sae, [i], 50.0, keep)(h)
    fire = (f[..., i] > 0) & keep
    expected = h + torch.where(fire, -50.0 - f[..., i], torch.zeros_like(f[..., i]))[..., None] * sae.W_dec[i]
    assert torch.allclose(out, expected, atol=1e-5)
    assert torch.equal(out[~fire], h[~fire])                          # untouched where it does not fire
    assert torch.equal(clamp_patch(sae, [], 50.0, keep)(h), h)        # no latents: identity
    zero = clamp_patch(sae, [i], 0.0, keep)(h)                        # m = 0: zero-ablation where it fires
    assert torch.allclose(zero, h - torch.where(fire, f[..., i], torch.zeros_like(f[..., i]))[..., None]
                          * sae.W_dec[i], atol=1e-5)


@pytest.fixture(scope="module", params=["cloze", "letter"])
def mcq_case(tiny_lm, request):
    qs = build_mcq_set("python", 12, seed=0) + build_mcq_set("shakespeare", 12, seed=0)
    base = mcq_baseline(tiny_lm, 1, qs, "mixed topics", batch_size=8, scoring=request.param)
    return qs, base


def test_clamping_changes_scores_only_where_latents_fire(tiny_lm, mcq_case):
    _, base = mcq_case
    sae = random_sae()
    clean, _ = mcq_scores(tiny_lm, 1, base.prompts, batch_size=8)
    assert torch.equal(clean, base.scores)
    fires = firing_latents(sae, base)                                 # [n_questions, d_sae]
    assert fires.shape == (24, 128)
    counts = fires.sum(0)
    partial = torch.nonzero((counts > 0) & (counts < fires.shape[0])).flatten()
    assert len(partial), "no latent fires on only some questions"
    latent = int(partial[counts[partial].argmin()])
    hit = fires[:, latent]

    def run(latents, m):
        return mcq_scores(tiny_lm, 1, base.prompts, batch_size=8,
                          patch=lambda keep: clamp_patch(sae, latents, m, keep))[0]

    assert torch.equal(run([], 200.0), clean)                          # no selected latents: unchanged
    clamped = run([latent], 200.0)
    assert torch.equal(clamped[~hit], clean[~hit])                     # questions where it never fires: unchanged
    assert not torch.allclose(clamped[hit], clean[hit])                # where it fires: changed
    ablated = run([latent], 0.0)                                       # m = 0 only zero-ablates it
    assert torch.equal(ablated[~hit], clean[~hit])
    some = torch.nonzero(hit).flatten()[:3].tolist()                   # a subset is scored in the given order
    assert torch.allclose(mcq_scores(tiny_lm, 1, base.prompts, some, batch_size=8,
                                     patch=lambda keep: clamp_patch(sae, [latent], 200.0, keep))[0],
                          clamped[some], atol=1e-4)


# -- cloze scoring --------------------------------------------------------------------------------
def test_cloze_texts():
    q = MCQ('Which word fills the blank?\n"The cat sat on the _____ today."', ("mat", "dog", "sky", "tree"), 0)
    prefix, conts = cloze_texts(q)
    assert prefix == 'Which word fills the blank?\n"The cat sat on the'
    assert conts[0] == ' mat today."' and conts[3] == ' tree today."'
    assert all(prefix + c == q.question.replace(BLANK, ch) for c, ch in zip(conts, q.choices, strict=True))
    code = MCQ("Which keyword fills the blank in this line?\n_____ x in range(3):", ("for", "if", "def", "as"), 0)
    prefix, conts = cloze_texts(code)
    assert prefix == "Which keyword fills the blank in this line?\n" and conts[1] == "if x in range(3):"
    wmdp = MCQ("Which organism?", ("a cat", "b", "c", "d"), 2)
    assert cloze_texts(wmdp) == ("Question: Which organism?\nAnswer:", [" a cat", " b", " c", " d"])


def _reference_logprob(lm, prefix: str, cont: str) -> float:
    """Σ log p(continuation | prefix) from one unpadded full forward (float64 log-softmax)."""
    tok = lm.tokenizer
    head = [lm.bos_token_id, *tok(prefix, add_special_tokens=False)["input_ids"]]
    ids = head + tok(cont, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        lp = lm.model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    return float(sum(lp[t - 1, ids[t]] for t in range(len(head), len(ids))))


def test_cloze_scores_match_a_full_forward_reference(tiny_lm):
    qs = build_mcq_set("python", 6, seed=1) + build_mcq_set("shakespeare", 4, seed=1)
    qs.append(MCQ("Which organism?", ("a cat", "bee", "cow", "dog"), 2))
    prompts = build_prompts(tiny_lm, qs, "x", "cloze")
    assert len(prompts.seqs) == 4 * len(qs)
    scores, _ = mcq_scores(tiny_lm, 1, prompts, batch_size=5)
    for i, q in enumerate(qs):
        prefix, conts = cloze_texts(q)
        for c, cont in enumerate(conts):
            assert scores[i, c].item() == pytest.approx(_reference_logprob(tiny_lm, prefix, cont), abs=2e-3)
    swapped = MCQ(qs[0].question, tuple(reversed(qs[0].choices)), 3 - qs[0].answer)  # order-invariant scoring
    again, _ = mcq_scores(tiny_lm, 1, build_prompts(tiny_lm, [swapped], "x", "cloze"))
    assert torch.allclose(again[0], scores[0].flip(0), atol=1e-4)


def test_token_logprobs_equal_the_full_logits(tiny_lm):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 200, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    rows = torch.tensor([0, 0, 1, 2, 2, 2])
    tgt = torch.tensor([1, 8, 5, 2, 3, 8])
    got = token_logprobs(tiny_lm, ids, mask, rows, tgt)
    with torch.no_grad():
        full = tiny_lm.model(input_ids=ids, attention_mask=mask).logits.double().log_softmax(-1)
    want = full[rows, tgt - 1].gather(1, ids[rows, tgt][:, None]).squeeze(1)
    assert torch.allclose(got.double(), want, atol=1e-4)


def test_unknown_scoring_is_a_config_error():
    from sae.errors import ConfigError
    from sae.evaluate.runner import eval_settings

    assert eval_settings("unlearning", {"scoring": "letter"}).scoring == "letter"
    with pytest.raises(ConfigError, match=r"scoring='logit' \(unlearning\) is out of range: it must be one of cloze"):
        eval_settings("unlearning", {"scoring": "logit"})


def test_clamp_is_in_unit_decoder_units_and_invariant_to_decoder_scale():
    """Scaling the decoder rows by c and the encoder by 1/c reconstructs identically; the clamp must
    then act identically too (SAEBench's unit-decoder convention), moving h by m along u_i."""
    a = random_sae()
    b = random_sae()
    c = 7.0
    with torch.no_grad():
        b.W_dec.copy_(a.W_dec * c)
        b.W_enc.copy_(a.W_enc / c)
        b.b_enc.copy_(a.b_enc / c)
        b.b_dec.copy_(a.b_dec)
    h = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 5, dtype=torch.bool)
    f = a.encode(h.reshape(-1, 64)).reshape(2, 5, -1)
    i = int((f > 0).sum((0, 1)).argmax())
    assert torch.allclose(a(h.reshape(-1, 64)), b(h.reshape(-1, 64)), atol=1e-4)
    pa, pb = clamp_patch(a, [i], 50.0, keep)(h), clamp_patch(b, [i], 50.0, keep)(h)
    assert torch.allclose(pa, pb, atol=1e-4)
    u = a.W_dec[i] / a.W_dec[i].norm()
    fire = f[..., i] > 0
    g = f[..., i] * a.W_dec[i].norm()
    assert torch.allclose(pa[fire], (h + (-50.0 - g)[..., None] * u)[fire], atol=1e-4)


def test_binomial_measurability_threshold():
    assert binomial_p_above_chance(9, 50) > 0.5        # Gemma 3 270M's forget set: chance level
    assert binomial_p_above_chance(13, 50) > 0.4
    assert binomial_p_above_chance(25, 50) < 1e-3      # clearly above chance
    assert binomial_p_above_chance(0, 0) == 1.0
    assert binomial_p_above_chance(3, 4) == pytest.approx(4 * 0.25**3 * 0.75 + 0.25**4)  # direct tail


def test_unlearning_score_rules():
    s = [{"forget_accuracy": 0.4, "retain_accuracy": 0.995},          # allowed: effect 0.4
         {"forget_accuracy": 0.1, "retain_accuracy": 0.9},            # retain broken: effect 1
         {"forget_accuracy": 0.7, "retain_accuracy": 1.0}]
    assert unlearning_score(s) == pytest.approx(0.6)
    assert unlearning_score(s, retain_acc_threshold=0.8) == pytest.approx(0.9)
    assert unlearning_score(s[1:2]) == 0.0
    assert unlearning_score([]) == 0.0
    assert math.isnan(unlearning_score([{"forget_accuracy": math.nan, "retain_accuracy": 1.0}]))
    for row in s:
        assert 0.0 <= unlearning_score([row]) <= 1.0


# -- end to end -----------------------------------------------------------------------------------
def test_evaluate_runs_absorption_and_unlearning(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    cfg = {"model_name": str(tiny_model_dir), "hook_name": HOOK, "hook_layer": 1, "dataset_path": "embedded",
           "context_size": 64, "d_in": 64}
    random_sae(3).save(run_dir, cfg)
    results = evaluate_runs([run_dir], evals=["absorption", "unlearning"], n_tokens=128, device="cpu", quiet=True)
    assert [r["eval_type_id"] for r in results] == ["absorption", "unlearning"]
    for r in results:
        validate_result(r)
        path = Path(run_dir) / "eval_results" / f"{r['eval_type_id']}.json"
        assert json.loads(path.read_text())["eval_id"] == r["eval_id"]
    absorption, unlearning = results
    mean = absorption["eval_result_metrics"]["mean"]
    for name in ("mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
                 "n_letters_evaluated"):
        assert name in mean
    assert absorption["eval_config"]["prompt_template"] == "{word} has the first letter:"
    assert all("first_letter" in row for row in absorption["eval_result_details"])
    un = unlearning["eval_result_metrics"]["unlearning"]
    assert un["unlearning_score"] is None or 0.0 <= un["unlearning_score"] <= 1.0
    assert un["measurable"] in (0, 1) and (un["measurable"] == 1 or un["unlearning_score"] is None)
    if not un["measurable"]:  # a random tiny model is at chance: no score, and the result says why
        assert "not measurable on this model" in (unlearning["eval_result_unstructured"]["note"] or "") or \
            un["unlearning_score_unchecked"] is None
    assert un["n_forget_questions"] == 50 and un["n_retain_questions"] == 50
    ci = unlearning["eval_result_metrics"]["confidence_intervals"]
    from sae.evaluate.intervals import wilson

    assert (ci["forget_accuracy_clean_ci_low"], ci["forget_accuracy_clean_ci_high"]) == pytest.approx(
        wilson(un["n_forget_correct"], 50))
    assert un["n_settings"] == len(unlearning["eval_result_details"]) == 16
    assert unlearning["eval_config"]["scoring"] == "cloze"
    assert unlearning["eval_config"]["multipliers"] == [25.0, 50.0, 100.0, 200.0]
