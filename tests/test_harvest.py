"""Harvest: hook correctness, packing, corpus splits, resume and failure modes (tiny model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae.errors import ConfigError
from sae.harvest import harvest as harvest_mod
from sae.harvest.corpus import iter_documents
from sae.harvest.harvest import HarvestConfig, harvest
from sae.harvest.tokens import pack_sequences
from sae.model import capture_resid_post, capture_resid_post_shared_prefix, splice
from sae.store import ActivationStore, StoreError


def test_pack_sequences_start_with_bos_and_keep_order() -> None:
    class Tok:
        def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
            return {"input_ids": [int(t) for t in text.split()]}

    docs = [" ".join(str(i) for i in range(10, 17)), "20 21 22", "30 31 32 33 34 35"]
    seqs = list(pack_sequences(docs, Tok(), context_size=5, bos_token_id=2))
    assert all(s[0] == 2 and len(s) == 5 for s in seqs)
    body = [t for s in seqs for t in s[1:]]
    stream = [*range(10, 17), 2, 20, 21, 22, 2, *range(30, 36)]
    assert body == stream[: len(body)] and len(seqs) == 4
    assert seqs[0].tolist() == [2, 10, 11, 12, 13] and seqs[1].tolist() == [2, 14, 15, 16, 2]


def test_embedded_corpus_splits_are_disjoint_and_mixed() -> None:
    train_ids = {d.doc_id for _, d in zip(range(400), iter_documents("embedded", "train"), strict=False)}
    test_docs = list(iter_documents("embedded:prose", "test")) + list(iter_documents("embedded:shakespeare", "test"))
    assert test_docs and not train_ids & {d.doc_id for d in test_docs}
    first = [d.source for _, d in zip(range(60), iter_documents("embedded", "train"), strict=False)]
    assert {"shakespeare", "prose", "code"} <= set(first)
    play = next(iter_documents("embedded:shakespeare", "all"))
    assert play.meta["genre"] in {"comedies", "histories", "problems", "roman", "romances", "tragedies"}
    assert "**" not in play.text
    with pytest.raises(ValueError, match="unknown dataset"):
        next(iter_documents("no/such/path.txt"))


def test_capture_equals_hidden_states_and_stops_early(tiny_lm) -> None:
    ids = torch.randint(4, 400, (2, 20))
    ids[:, 0] = tiny_lm.bos_token_id
    full = tiny_lm.model(ids, output_hidden_states=True).hidden_states
    got = capture_resid_post(tiny_lm.model, ids, [0, 2])
    for L in (0, 2):
        torch.testing.assert_close(got[L], full[L + 1])
    calls = []
    h = tiny_lm.model.model.layers[3].register_forward_hook(lambda *a: calls.append(1))
    try:
        capture_resid_post(tiny_lm.model, ids, [1])
    finally:
        h.remove()
    assert not calls  # layers after the deepest requested one never run
    with pytest.raises(ValueError, match="layer 7 does not exist"):
        capture_resid_post(tiny_lm.model, ids, [7])
    # splicing the identity leaves logits unchanged; zeros change them
    clean = tiny_lm.model(ids).logits
    with splice(tiny_lm.model, 1, lambda h: h):
        torch.testing.assert_close(tiny_lm.model(ids).logits, clean)
    with splice(tiny_lm.model, 1, torch.zeros_like):
        assert not torch.allclose(tiny_lm.model(ids).logits, clean)


@pytest.mark.parametrize("prefix_len", [1, 12, 45])  # 45 > the tiny model's sliding window (32)
def test_shared_prefix_capture_equals_the_full_forward_of_each_sequence(tiny_lm, prefix_len) -> None:
    g = torch.Generator().manual_seed(prefix_len)
    prefix = [tiny_lm.bos_token_id] + torch.randint(4, 400, (prefix_len - 1,), generator=g).tolist()
    suffix = torch.randint(4, 400, (5, 2), generator=g)
    got = capture_resid_post_shared_prefix(tiny_lm.model, prefix, suffix, 2)
    assert got.shape == (5, 2, tiny_lm.d_model)
    full = torch.cat([torch.tensor([prefix]).expand(5, -1), suffix], dim=1)
    want = tiny_lm.model(full, output_hidden_states=True).hidden_states[3][:, prefix_len:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        capture_resid_post_shared_prefix(tiny_lm.model, prefix, suffix, 9)


def test_harvested_rows_match_a_direct_forward(tiny_lm, tiny_store) -> None:
    s = ActivationStore(tiny_store)
    assert s.hook_names == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert s.n_tokens == 8192 and s.attrs["model_fingerprint"] == tiny_lm.fingerprint
    tokens = s.tokens.reshape(-1, s.context_size)
    assert (tokens[:, 0] == tiny_lm.bos_token_id).all()
    ids = torch.from_numpy(tokens[40:43]).long()
    hs = tiny_lm.model(ids, output_hidden_states=True).hidden_states
    for L, hook in ((1, s.hook_names[0]), (2, s.hook_names[1])):
        rows = s.read_rows(hook, 40 * 64, 43 * 64)
        torch.testing.assert_close(rows, hs[L + 1].reshape(-1, s.d_model), atol=1e-5, rtol=1e-5)
    assert s.attrs["status"] == "complete" and s.attrs["layers"] == [1, 2]


@pytest.mark.parametrize("background_writes", [False, True])
def test_resume_after_kill_gives_identical_store(tiny_lm, tmp_path, monkeypatch, background_writes) -> None:
    base = dict(layers=[1], model=tiny_lm.model_id, tokens=6144, context_size=64, batch_size=8,
                dtype="bfloat16", chunk_tokens=1024, device="cpu", background_writes=background_writes)
    ref = harvest(HarvestConfig(**base, out=str(tmp_path / "ref.zarr")), loaded=tiny_lm, quiet=True)
    calls = {"n": 0}
    real = harvest_mod.StoreWriter.write_chunk

    def dying_write(self, *a, **k):
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(harvest_mod.StoreWriter, "write_chunk", dying_write)
    out = tmp_path / "cut.zarr"
    with pytest.raises(KeyboardInterrupt):
        harvest(HarvestConfig(**base, out=str(out)), loaded=tiny_lm, quiet=True)
    monkeypatch.setattr(harvest_mod.StoreWriter, "write_chunk", real)
    assert ActivationStore(out, require_complete=False).n_tokens == 3072
    with pytest.raises(StoreError, match="already exists"):
        harvest(HarvestConfig(**base, out=str(out)), loaded=tiny_lm, quiet=True)
    with pytest.raises(ConfigError, match="--context-size 32 differs from the store's context_size 64"):
        harvest(HarvestConfig(**{**base, "context_size": 32}, out=str(out), resume=True), loaded=tiny_lm, quiet=True)
    harvest(HarvestConfig(**base, out=str(out), resume=True), loaded=tiny_lm, quiet=True)
    a, b = ActivationStore(ref), ActivationStore(out)
    assert a.n_tokens == b.n_tokens == 6144
    assert np.array_equal(a.tokens, b.tokens)
    h = a.hook_names[0]
    assert np.array_equal(np.asarray(a.group[h][:]), np.asarray(b.group[h][:]))
    assert a.attrs["stats"] == b.attrs["stats"]


def test_harvest_rejects_bad_layer_and_codec(tiny_lm, tmp_path) -> None:
    with pytest.raises(ValueError, match="layer 9 does not exist"):
        harvest(HarvestConfig(layers=[9], out=str(tmp_path / "x.zarr"), device="cpu"), loaded=tiny_lm, quiet=True)
    with pytest.raises(ValueError, match="unknown codec"):
        harvest(HarvestConfig(layers=[1], codec="lz77", out=str(tmp_path / "x.zarr")), loaded=tiny_lm, quiet=True)
    assert not (tmp_path / "x.zarr").exists()
