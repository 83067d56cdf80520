"""Stores ⇄ SAELens activation caches, checked with SAELens 6.54 itself: its CacheActivationsRunner
writes a cache we import, and its ActivationsStore reads (and a SAELens SAE trains from) our export."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from sae.errors import ConfigError
from sae.interop.hf_datasets import export_store, import_cache
from sae.store import ActivationStore

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is in the dev extra")
datasets = pytest.importorskip("datasets")
warnings.filterwarnings("ignore", module="sae_lens")
HOOK = "blocks.1.hook_resid_post"


def _saelens_store(path, hook: str, ctx: int, d: int, n_tokens: int, batch: int = 8):
    """SAELens' ActivationsStore on a cached path (no model, no dataset: what cached training uses)."""
    from sae_lens.training.activations_store import ActivationsStore

    return ActivationsStore(model=None, dataset=None, streaming=False, hook_name=hook, hook_head_index=None,
                            context_size=ctx, d_in=d, n_batches_in_buffer=2, total_training_tokens=n_tokens,
                            store_batch_size_prompts=batch, train_batch_size_tokens=128, prepend_bos=True,
                            normalize_activations="none", device=torch.device("cpu"), dtype="float32",
                            cached_activations_path=str(path))


def test_our_export_is_read_by_saelens_exactly_and_a_saelens_sae_trains_from_it(tiny_store, tmp_path) -> None:
    out = export_store(str(tiny_store), tmp_path / "cache", quiet=True)
    ours = ActivationStore(tiny_store)
    ctx, d, n = ours.context_size, ours.d_model, ours.n_tokens
    meta = json.loads((out / "sae_export.json").read_text())
    assert meta["hook_names"] == ours.hook_names and meta["content_digest"] == ours.content_digest
    store = _saelens_store(out, HOOK, ctx, d, n)
    acts, toks = [], []
    with pytest.raises(StopIteration):
        while True:
            a, t = store._load_raw_llm_batch_from_cached(raise_on_epoch_end=True)
            acts.append(a)
            toks.append(t)
    assert torch.equal(torch.cat(acts), ours.read_rows(HOOK, 0, n))  # float32 export: bit-exact
    assert np.array_equal(torch.cat(toks).numpy(), ours.tokens.astype(np.int64))
    # and a SAELens TopK SAE trains on SAELens' own batches from it
    sae = sae_lens.saes.sae.TrainingSAE.from_dict(
        sae_lens.TopKTrainingSAEConfig(d_in=d, d_sae=128, k=8).to_dict())
    opt = torch.optim.Adam(sae.parameters(), lr=3e-3)
    coeffs = {k: getattr(v, "value", v) for k, v in sae.get_coefficients().items()}
    store = _saelens_store(out, HOOK, ctx, d, n)
    losses = []
    from sae_lens.saes.sae import TrainStepInput

    for i in range(40):
        x = store.next_batch()
        step = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coeffs, dead_neuron_mask=None,
                                                        n_training_steps=i, is_logging_step=False))
        opt.zero_grad()
        step.loss.backward()
        opt.step()
        losses.append(float(step.losses["mse_loss"].detach()))
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5])  # it learns (235 → 120 here)


def test_a_cache_saelens_writes_imports_as_a_store_with_identical_rows(tmp_path, monkeypatch) -> None:
    import sae_lens.cache_activations_runner as car
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    torch.manual_seed(0)
    model = HookedTransformer(HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=32, d_head=4, n_heads=4,
                                                      d_vocab=50, act_fn="gelu", d_mlp=32))
    monkeypatch.setattr(car, "load_model", lambda **kw: model)  # a random model: nothing is downloaded
    tokens = torch.randint(1, 50, (40, 32), generator=torch.Generator().manual_seed(1))
    tokens[:, 0] = 0  # every sequence starts with the same (BOS-like) token
    cfg = sae_lens.CacheActivationsRunnerConfig(
        dataset_path="synthetic", model_name="tiny-random", model_batch_size=4, hook_name=HOOK, d_in=16,
        training_tokens=40 * 32, context_size=32, new_cached_activations_path=str(tmp_path / "cache"),
        shuffle=False, device="cpu", prepend_bos=False, buffer_size_gb=0.00003)
    ds = car.CacheActivationsRunner(cfg, override_dataset=datasets.Dataset.from_dict({"tokens": tokens.tolist()})).run()
    url = import_cache(tmp_path / "cache", str(tmp_path / "s.zarr"), model="tiny-random", chunk_tokens=256,
                       quiet=True)
    s = ActivationStore(url)
    assert s.hook_names == [HOOK] and s.context_size == 32 and s.d_model == 16 and s.n_tokens == len(ds) * 32
    ref = torch.from_numpy(np.asarray(ds.with_format("numpy")[HOOK], dtype=np.float32).reshape(-1, 16))
    assert torch.equal(s.read_rows(HOOK, 0, s.n_tokens), ref)
    assert np.array_equal(s.tokens, np.asarray(ds.with_format("numpy")["token_ids"]).reshape(-1))
    assert s.attrs["model_id"] == "tiny-random" and s.attrs["special_token_ids"] == [0]
    assert not s.valid_mask(s.tokens)[::32].any()  # the shared first token is excluded from statistics
    # export → import round trip keeps rows and identity
    back = import_cache(export_store(url, tmp_path / "again", quiet=True), str(tmp_path / "t.zarr"), quiet=True)
    t = ActivationStore(back)
    assert torch.equal(t.read_rows(HOOK, 0, t.n_tokens), ref) and t.attrs["model_id"] == "tiny-random"


def test_export_refuses_to_replace_what_is_not_ours(tiny_store, tmp_path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    with pytest.raises(ConfigError, match="already exists"):
        export_store(str(tiny_store), mine, quiet=True)
    with pytest.raises(ConfigError, match="not an HF-datasets export of ours"):
        export_store(str(tiny_store), mine, overwrite=True, quiet=True)
    assert (mine / "notes.txt").read_text() == "precious"
    out = export_store(str(tiny_store), tmp_path / "c", hook_name=HOOK, dtype="float16", n_tokens=200, quiet=True)
    again = export_store(str(tiny_store), out, hook_name=HOOK, n_tokens=128, overwrite=True, quiet=True)
    ds = datasets.load_from_disk(str(again))
    assert len(ds) == 2 and ds.features[HOOK].dtype == "float32" and "blocks.2.hook_resid_post" not in ds.features
    with pytest.raises(ConfigError, match="--dtype"):
        export_store(str(tiny_store), tmp_path / "x", dtype="bfloat16", quiet=True)
    assert not (tmp_path / "x").exists()


def test_the_cli_exports_and_imports(tiny_store, tmp_path) -> None:
    from typer.testing import CliRunner

    from sae.cli import app

    r = CliRunner().invoke(app, ["store", "export", str(tiny_store), "--out", str(tmp_path / "c"), "--hook-name",
                                 HOOK, "--tokens", "512", "--quiet"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(app, ["store", "import", str(tmp_path / "c"), "--out", str(tmp_path / "s.zarr"),
                                 "--quiet"])
    assert r.exit_code == 0, r.output
    a, b = ActivationStore(tiny_store), ActivationStore(tmp_path / "s.zarr")
    assert torch.equal(b.read_rows(HOOK, 0, 512), a.read_rows(HOOK, 0, 512))
    assert b.attrs["model_fingerprint"] == a.attrs["model_fingerprint"]
    r = CliRunner().invoke(app, ["store", "export", str(tiny_store), "--out", str(tmp_path / "d"), "--format", "npz"])
    assert r.exit_code == 2 and "only export format is hf-datasets" in r.output
