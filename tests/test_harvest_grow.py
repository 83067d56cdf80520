"""Growing a store: ``--into`` (another layer over the store's own tokens) and ``--extend`` (more tokens of
the same corpus stream), checked against harvests from scratch with the tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from sae.cli import app
from sae.errors import ConfigError
from sae.harvest.harvest import HarvestConfig, harvest
from sae.store import ActivationStore
from sae.store.verify import verify_store
from tests.conftest import build_tiny_model_dir


def _cfg(model_dir: Path, out: Path, **kw) -> HarvestConfig:
    return HarvestConfig(**{**dict(layers=[1], model=str(model_dir), tokens=3072, context_size=64, batch_size=8,
                                   dtype="bfloat16", chunk_tokens=512, device="cpu", out=str(out)), **kw})


def _raw(path: Path, name: str) -> np.ndarray:
    return np.asarray(zarr.open_group(str(path), mode="r")[name][:])


@pytest.mark.parametrize("workers", [None, 2])
def test_into_adds_a_layer_equal_to_a_fresh_two_layer_harvest(tiny_model_dir, tiny_lm, tmp_path, workers) -> None:
    fresh = Path(harvest(_cfg(tiny_model_dir, tmp_path / "fresh.zarr", layers=[1, 2]), loaded=tiny_lm, quiet=True))
    grown = Path(harvest(_cfg(tiny_model_dir, tmp_path / "grown.zarr"), loaded=tiny_lm, quiet=True))
    before = ActivationStore(grown)
    old_digest, old_l1 = before.content_digest, _raw(grown, "blocks.1.hook_resid_post")
    harvest(_cfg(tiny_model_dir, tmp_path / "ignored", layers=[2], into=str(grown), workers=workers),
            loaded=None if workers else tiny_lm, quiet=True)
    a, b = ActivationStore(fresh), ActivationStore(grown)
    assert b.hook_names == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"] and b.attrs["layers"] == [1, 2]
    assert np.array_equal(a.tokens, b.tokens)
    for h in a.hook_names:
        assert np.array_equal(_raw(fresh, h), _raw(grown, h)), h
    assert a.content_digest == b.content_digest and a.attrs["stats"] == b.attrs["stats"]
    assert np.array_equal(_raw(grown, "blocks.1.hook_resid_post"), old_l1)  # the other hook untouched
    # the reader opened before the growth still reads (same store_id); old runs' digest stays accepted
    assert torch.equal(before.read_rows("blocks.1.hook_resid_post", 0, 512), b.read_rows("blocks.1.hook_resid_post",
                                                                                          0, 512))
    assert before.attrs["store_id"] == b.attrs["store_id"]
    assert b.accepts_digest(old_digest, "blocks.1.hook_resid_post") and old_digest != b.content_digest
    assert b.hook_digest("blocks.1.hook_resid_post") == a.hook_digest("blocks.1.hook_resid_post")
    assert "pending_hooks" not in b.attrs and verify_store(b).ok


def test_into_with_another_model_or_an_existing_layer_is_one_line(tiny_model_dir, tiny_lm, tmp_path) -> None:
    store = harvest(_cfg(tiny_model_dir, tmp_path / "s.zarr"), loaded=tiny_lm, quiet=True)
    other = build_tiny_model_dir(tmp_path / "other_model", seed=1)
    r = CliRunner().invoke(app, ["harvest", "--layer", "2", "--into", store, "--model", str(other), "--device", "cpu"])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "fingerprint" in errors[0] and "Traceback" not in r.output
    with pytest.raises(ConfigError, match="already has blocks.1"):
        harvest(_cfg(tiny_model_dir, tmp_path / "x", into=store), loaded=tiny_lm, quiet=True)
    assert ActivationStore(store).hook_names == ["blocks.1.hook_resid_post"]
    assert "blocks.2.hook_resid_post" not in zarr.open_group(store, mode="r").array_keys()


@pytest.mark.parametrize(("n1", "workers"), [(1536, None), (1024, None), (1536, 2)])
def test_extend_keeps_the_prefix_and_equals_a_harvest_from_scratch(tiny_model_dir, tiny_lm, tmp_path, n1,
                                                                   workers) -> None:
    """n1 = 1536 ends mid-chunk (512-row chunks: the boundary chunk is recomputed keeping its old bytes);
    1024 ends on a chunk boundary."""
    fresh = Path(harvest(_cfg(tiny_model_dir, tmp_path / "fresh.zarr", layers=[1, 2], tokens=3072),
                         loaded=tiny_lm, quiet=True))
    grown = Path(harvest(_cfg(tiny_model_dir, tmp_path / "grown.zarr", layers=[1, 2], tokens=n1),
                         loaded=tiny_lm, quiet=True))
    old = ActivationStore(grown)
    old_digest, old_stats = old.content_digest, old.attrs["stats"]
    old_rows = {h: _raw(grown, h)[:n1] for h in old.hook_names}
    harvest(_cfg(tiny_model_dir, grown, layers=[1, 2], tokens=3072, extend=True, workers=workers),
            loaded=tiny_lm, quiet=True)
    a, b = ActivationStore(fresh), ActivationStore(grown)
    assert b.n_tokens == 3072 and np.array_equal(a.tokens, b.tokens)
    for h in a.hook_names:
        assert np.array_equal(_raw(grown, h)[:n1], old_rows[h]), h  # the prefix, byte for byte
        assert np.array_equal(_raw(fresh, h), _raw(grown, h)), h  # and all of it equals a harvest from scratch
    assert a.content_digest == b.content_digest and a.attrs["stats"] == b.attrs["stats"]
    assert b.attrs["stats"] != old_stats and b.accepts_digest(old_digest)
    rep = verify_store(b)
    assert rep.ok and any(name.startswith("prefix digest") and ok for name, ok, _ in rep.checks), rep.checks


def test_extend_refuses_what_it_cannot_do_in_one_line(tiny_model_dir, tiny_lm, tmp_path) -> None:
    store = harvest(_cfg(tiny_model_dir, tmp_path / "s.zarr", dataset="embedded:prose", tokens=1024),
                    loaded=tiny_lm, quiet=True)
    before = _raw(Path(store), "blocks.1.hook_resid_post")
    with pytest.raises(ConfigError, match="corpus runs out at (\\d+) tokens"):
        harvest(_cfg(tiny_model_dir, store, dataset="embedded:prose", tokens=10**8, extend=True), loaded=tiny_lm,
                quiet=True)
    with pytest.raises(ConfigError, match="already holds 1024"):
        harvest(_cfg(tiny_model_dir, store, tokens=512, extend=True), loaded=tiny_lm, quiet=True)
    with pytest.raises(ConfigError, match="keeps the store's layers"):
        harvest(_cfg(tiny_model_dir, store, layers=[1, 2], tokens=2048, extend=True), loaded=tiny_lm, quiet=True)
    s = ActivationStore(store)
    assert s.n_tokens == 1024 and s.attrs["status"] == "complete"
    assert np.array_equal(_raw(Path(store), "blocks.1.hook_resid_post"), before)
