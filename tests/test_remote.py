"""Stores a team can share: S3 (moto server) and HTTP (http.server) on loopback, checksums,
verify/ls, racing writers, a store replaced under a reader, format-1 compatibility."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file
from typer.testing import CliRunner

from sae.cli import app
from sae.errors import SaeError
from sae.harvest.harvest import HarvestConfig, harvest
from sae.outputs import swap_into_place
from sae.store import ActivationStore, ShuffledBatches, StoreError
from sae.store.convert import convert_store
from sae.store.lease import Lease, LeaseHeldError
from sae.store.location import StoreLocation
from sae.store.verify import verify_store
from sae.train.config import TrainConfig
from sae.train.run import train
from tests.helpers import planted_features, write_store
from tests.remote_servers import http_server, s3_server

REPO = Path(__file__).resolve().parents[1]
logging.getLogger("werkzeug").setLevel(logging.ERROR)


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("s3fs")
    with s3_server("team") as opts:
        yield opts


def _hcfg(model_dir: Path, out: str, **kw) -> HarvestConfig:
    return HarvestConfig(**{**dict(layers=[1], model=str(model_dir), tokens=4096, context_size=64, batch_size=8,
                                   dtype="bfloat16", chunk_tokens=1024, device="cpu", out=out), **kw})


def _tcfg(store: str, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{**dict(store=store, d_sae=128, k=8, batch_size=512, tokens=512 * 12, log_every=1,
                                 device="cpu", out=str(out)), **kw})


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "sae_weights.safetensors"))


def _same(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return all(torch.equal(wa[n], wb[n]) for n in wa)


def test_harvest_into_s3_and_train_from_s3_http_and_cache_bit_identical(s3, tiny_lm, tiny_model_dir, tmp_path):
    local = harvest(_hcfg(tiny_model_dir, str(tmp_path / "local.zarr")), loaded=tiny_lm, quiet=True)
    url = "s3://team/shared/acts.zarr"
    harvest(_hcfg(tiny_model_dir, url, storage_options=s3), loaded=tiny_lm, quiet=True)
    a, b = ActivationStore(local), ActivationStore(url, storage_options=s3)
    assert b.content_digest == a.content_digest and b.attrs["stats"] == a.attrs["stats"]
    assert np.array_equal(a.tokens, b.tokens)
    h = a.hook_names[0]
    assert torch.equal(a.read_rows(h, 0, a.n_tokens), b.read_rows(h, 0, b.n_tokens))
    assert "endpoint_url" not in json.dumps(b.attrs)  # storage options never land in the store
    # a teammate mirrors the bucket to a static web server
    mirror = tmp_path / "www"
    StoreLocation(url, s3).fs.get("team/shared/acts.zarr", str(mirror / "acts.zarr"), recursive=True)
    train(_tcfg(str(local), tmp_path / "r_local"), quiet=True)
    r = CliRunner().invoke(app, ["train", "--store", url, "--storage-option", f"endpoint_url={s3['endpoint_url']}",
                                 "--d-sae", "128", "--k", "8", "--batch-size", "512", "--tokens", str(512 * 12),
                                 "--log-every", "1", "--device", "cpu", "--out", str(tmp_path / "r_s3"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert _same(tmp_path / "r_local", tmp_path / "r_s3")
    cache = tmp_path / "cache"
    train(_tcfg(url, tmp_path / "r_cached", storage_options=s3, cache=str(cache)), quiet=True)
    assert _same(tmp_path / "r_local", tmp_path / "r_cached") and any(cache.iterdir())
    with http_server(mirror) as base:
        train(_tcfg(f"{base}/acts.zarr", tmp_path / "r_http"), quiet=True)
        assert _same(tmp_path / "r_local", tmp_path / "r_http")
        rep = verify_store(ActivationStore(f"{base}/acts.zarr"))
        assert rep.ok, rep.checks
    cfg = json.loads((tmp_path / "r_s3" / "cfg.json").read_text())
    assert (cfg["store_url"], cfg["content_digest"], cfg["store_rows"]) == (url, a.content_digest, a.n_tokens)
    assert cfg["store_id"] == b.attrs["store_id"] and cfg["hook_name"] == h and cfg["trained_rows"] == 512 * 12
    assert "storage_options" not in cfg["train_config"]


def test_evaluate_refuses_a_store_with_another_digest(tmp_path):
    x, _ = planted_features(4096, d_in=16, n_features=32, seed=0)
    s1 = write_store(tmp_path / "a.zarr", x)
    s2 = write_store(tmp_path / "b.zarr", x * 2)
    train(_tcfg(str(s1), tmp_path / "run", d_sae=32, k=4, batch_size=256, tokens=1024), quiet=True)
    import sae.evaluate as ev

    with pytest.raises(SaeError, match="trained on a store with content digest .*--allow-other-store"):
        ev.evaluate_runs([tmp_path / "run"], store=s2, evals=["geometry"], device="cpu", quiet=True)
    assert ev.evaluate_runs([tmp_path / "run"], store=s2, evals=["geometry"], device="cpu", quiet=True,
                            allow_other_store=True)
    assert ev.evaluate_runs([tmp_path / "run"], store=s1, evals=["geometry"], device="cpu", quiet=True)


def test_store_ls_lists_the_stores_under_a_prefix(s3, tmp_path):
    x, _ = planted_features(2048, d_in=16, n_features=32)
    for name in ("one.zarr", "two.zarr"):
        write_store(tmp_path / name, x)
    (tmp_path / "notes").mkdir()
    StoreLocation("s3://team/ls", s3).fs.put(str(tmp_path / "one.zarr"), "team/ls/one.zarr", recursive=True)
    StoreLocation("s3://team/ls", s3).fs.put(str(tmp_path / "two.zarr"), "team/ls/two.zarr", recursive=True)
    for prefix, extra in ((str(tmp_path), []), ("s3://team/ls", ["--storage-option",
                                                                 f"endpoint_url={s3['endpoint_url']}"])):
        r = CliRunner().invoke(app, ["store", "ls", prefix, *extra])
        assert r.exit_code == 0, r.output
        assert "one.zarr" in r.output and "two.zarr" in r.output and "notes" not in r.output
        assert r.output.count("complete") == 2 and r.output.count("synthetic") == 2


def test_flipped_byte_is_named_by_verify_and_stops_training(tmp_path, monkeypatch):
    x, _ = planted_features(4096, d_in=16, n_features=32)
    store = write_store(tmp_path / "s.zarr", x)
    r = CliRunner().invoke(app, ["store", "verify", str(store), "--workers", "2"])
    assert r.exit_code == 0 and "clean" in r.output, r.output
    chunk = store / "blocks.0.hook_resid_post" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the compressed data
    chunk.write_bytes(bytes(data))
    r = CliRunner().invoke(app, ["store", "verify", str(store)])
    assert r.exit_code == 1, r.output
    assert "blocks.0.hook_resid_post" in r.output and "2048:3072" in r.output and "CORRUPT" in r.output
    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["train", "--store", str(store), "--d-sae", "32", "--k", "4", "--batch-size", "256",
                                 "--tokens", "8192", "--device", "cpu", "--out", "run", "--quiet"])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "corrupt chunk 2" in lines[0] and "sae store verify" in lines[0], r.output
    assert not (tmp_path / "run").exists()  # no checkpoint yet: nothing half-made is left


def test_two_racing_harvests_one_clear_error_no_corruption(tiny_model_dir, tmp_path):
    out = tmp_path / "race.zarr"
    cmd = [sys.executable, "-m", "sae", "harvest", "--model", str(tiny_model_dir), "--layer", "1", "--tokens",
           "8192", "--context-size", "64", "--chunk-tokens", "1024", "--device", "cpu", "--out", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=180), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and ("is being written by" in lines[0] or "already exists" in lines[0]), err
    s = ActivationStore(out)
    assert s.n_tokens == 8192 and verify_store(s).ok
    assert not (out / "lease.json").exists()


def test_s3_lease_is_exclusive(s3):
    loc = StoreLocation("s3://team/leased.zarr", s3)
    first = Lease(loc).acquire()
    with pytest.raises(LeaseHeldError, match="is being written by"):
        Lease(loc).acquire()
    first.release()
    Lease(loc).acquire().release()


def test_overwrite_under_a_reader_stops_it_with_one_line(tmp_path):
    x, _ = planted_features(8192, d_in=16, n_features=32, seed=0)
    path = write_store(tmp_path / "s.zarr", x, chunk_tokens=1024)
    loader = ShuffledBatches(ActivationStore(path), "blocks.0.hook_resid_post", 256, mix_chunks=1, prefetch=1)
    batches = iter(loader)
    first = next(batches)
    new = write_store(tmp_path / ".new.zarr", x * 3, chunk_tokens=1024)
    swap_into_place(new, path)  # a teammate's `--overwrite` lands
    with pytest.raises(StoreError, match="was replaced or removed while being read") as e:
        for _ in range(64):  # 8 windows of 4 batches: the next window load must notice
            b = next(batches)
            assert b.abs().max() < 3 * first.abs().max() * 1.5  # never the new store's (3x larger) rows
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("where", ["local", "s3", "memory"])
def test_identity_check_parses_zarr_json_only_when_its_version_tag_changes(where, request, tmp_path, monkeypatch):
    """The loader checks the store's identity twice per window. With a version tag (a local ``stat``,
    S3's ETag) an unchanged zarr.json is not re-read; any rewrite is re-read and judged by its
    store_id; a backend without tags (memory://) reads every time. A replaced store is always caught."""
    x, _ = planted_features(2048, d_in=8, n_features=16, seed=0)
    local = write_store(tmp_path / "s.zarr", x, chunk_tokens=1024)
    url, opts = str(local), {}
    if where != "local":
        import fsspec

        opts = request.getfixturevalue("s3") if where == "s3" else {}
        url = f"s3://team/{tmp_path.name}.zarr" if where == "s3" else f"memory://{tmp_path.name}.zarr"
        fs, root = fsspec.core.url_to_fs(url, **opts)
        fs.put(str(local), root, recursive=True)
    store = ActivationStore(url, storage_options=opts)
    reads = []
    real = StoreLocation.read_json
    monkeypatch.setattr(StoreLocation, "read_json", lambda self, *p, **kw: reads.append(p) or real(self, *p, **kw))
    for _ in range(5):
        store.check_unchanged()
    tagged = where != "memory"
    assert len(reads) == (1 if tagged else 5)

    meta = real(store.loc, "zarr.json", fresh=True)
    meta["attributes"]["note"] = "attributes updated, same store"  # e.g. `harvest --into` adding a hook
    store.loc.write_json(meta, "zarr.json")
    before = len(reads)
    store.check_unchanged()
    store.check_unchanged()
    assert len(reads) - before == (1 if tagged else 2)  # the rewrite is read once, then trusted again

    old = meta["attributes"]["store_id"]
    meta["attributes"]["store_id"] = old[::-1] if old[::-1] != old else old + "x"  # same length: same size
    if where == "local":  # rewritten in place (same inode): the mtime still changes the tag
        (local / "zarr.json").write_text(json.dumps(meta, sort_keys=True))
    else:
        store.loc.write_json(meta, "zarr.json")
    with pytest.raises(StoreError, match="was replaced or removed while being read"):
        store.check_unchanged()


def test_missing_backend_names_the_extra():
    r = CliRunner().invoke(app, ["store", "info", "gs://bucket/acts.zarr"])
    assert r.exit_code == 2
    lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "pip install 'sae[gcs]'" in lines[0], r.output


def _write_v1(path: Path, x: torch.Tensor, chunk: int = 1024, ctx: int = 64) -> Path:
    """A format-1 store as older versions wrote it (no checksums, no commits, cursor attribute)."""
    n, d = x.shape
    tokens = (np.arange(n) % 97 + 10).astype(np.int32)
    tokens[::ctx] = 2
    g = zarr.open_group(str(path), mode="w")
    g.create_array("tokens", shape=(n,), chunks=(chunk,), dtype="int32")[:] = tokens
    g.create_array("blocks.0.hook_resid_post", shape=(n, d), chunks=(chunk, d), dtype="float32")[:] = x.numpy()
    valid = tokens != 2
    xs = x.double()[torch.from_numpy(valid)]
    stats = {"blocks.0.hook_resid_post": {"sum": xs.sum(0).tolist(), "sum_sq_norm": float(xs.pow(2).sum()),
                                          "mean": (xs.sum(0) / len(xs)).tolist(),
                                          "mean_sq_norm": float(xs.pow(2).sum()) / len(xs)}}
    g.update_attributes({"format_version": 1, "model_id": "synthetic", "model_fingerprint": "0", "dataset": "synthetic",
                         "split": "train", "seed": 0, "special_token_ids": [2], "bos_token_id": 2,
                         "hook_names": ["blocks.0.hook_resid_post"], "d_model": d, "context_size": ctx,
                         "n_tokens_target": n, "n_tokens_written": n, "dtype": "float32", "storage_dtype": "float32",
                         "codec": "none", "chunk_tokens": chunk, "stats": stats, "stats_count": int(valid.sum()),
                         "status": "complete", "store_id": "v1store", "created": "2026-11-01T00:00:00Z"})
    return path


def test_format_1_stores_read_only_and_convert_upgrades(tmp_path, tiny_lm, tiny_model_dir):
    x, _ = planted_features(4096, d_in=16, n_features=32)
    v1 = _write_v1(tmp_path / "old.zarr", x)
    s = ActivationStore(v1)
    assert s.format_version == 1 and s.content_digest is None
    rep = verify_store(s)
    assert rep.ok and any("format 1" in d for _, _, d in rep.checks)
    train(_tcfg(str(v1), tmp_path / "r1", d_sae=32, k=4, batch_size=256, tokens=2048), quiet=True)
    v2 = convert_store(v1, tmp_path / "new.zarr", "none", "float32")
    t = ActivationStore(v2)
    assert t.format_version == 2 and t.content_digest and verify_store(t).ok
    assert torch.equal(s.read_rows(s.hook_names[0], 0, 4096), t.read_rows(t.hook_names[0], 0, 4096))
    h = s.hook_names[0]  # recomputed chunk by chunk (the helper summed all rows at once): equal to rounding
    np.testing.assert_allclose(t.attrs["stats"][h]["mean"], s.attrs["stats"][h]["mean"], rtol=1e-12)
    assert abs(t.mean_sq_norm(h) / s.mean_sq_norm(h) - 1) < 1e-12
    train(_tcfg(str(v2), tmp_path / "r2", d_sae=32, k=4, batch_size=256, tokens=2048), quiet=True)
    assert _same(tmp_path / "r1", tmp_path / "r2")
    with pytest.raises(StoreError, match="format-1 store"):
        harvest(HarvestConfig(layers=[0], model=str(tiny_model_dir), tokens=4096, context_size=64, chunk_tokens=1024,
                              device="cpu", out=str(v1), resume=True), loaded=tiny_lm, quiet=True)


def test_a_store_reads_with_plain_zarr_and_dask(tmp_path):
    """What docs/sharing-and-safety.md shows a teammate without sae: zarr.open_group and dask.array.from_zarr."""
    import dask.array as da

    x, _ = planted_features(2048, d_in=16, n_features=32)
    store = write_store(tmp_path / "s.zarr", x, dtype="bfloat16")
    g = zarr.open_group(str(store), mode="r")
    raw = np.asarray(g["blocks.0.hook_resid_post"][:100])
    assert raw.dtype == np.uint16 and g.attrs["dtype"] == "bfloat16"
    as_f32 = (raw.astype(np.uint32) << 16).view(np.float32)  # bf16 bits → float32, exact
    ours = ActivationStore(store).read_rows("blocks.0.hook_resid_post", 0, 100).numpy()
    assert np.array_equal(as_f32, ours)
    arr = da.from_zarr(str(store), component="blocks.0.hook_resid_post")
    assert arr.shape == (2048, 16) and arr.chunks[0][0] == 1024
    assert np.array_equal(np.asarray(arr[:100].compute()), raw)
    assert np.array_equal(np.asarray(g["tokens"][:]), ActivationStore(store).tokens)
    xr = pytest.importorskip("xarray", reason="xarray is in the dev extra")
    ds = xr.open_zarr(str(store), consolidated=False)  # needs the arrays' dimension_names (Zarr v3)
    v = ds["blocks.0.hook_resid_post"]
    assert v.dims == ("token", "d_model") and v.dtype == np.uint16 and ds["tokens"].dims == ("token",)
    assert np.array_equal(v[:100].values, raw)


def test_stale_lease_of_another_host_is_taken_over_only_by_resume(tmp_path):
    import time as _time

    loc = StoreLocation(str(tmp_path / "s.zarr"))
    loc.write_json({"owner": "ana", "host": "node-7", "pid": 1, "purpose": "harvest", "token": "x",
                    "heartbeat": _time.time() - 11 * 60}, "lease.json")
    with pytest.raises(LeaseHeldError, match=r"ana@node-7 pid 1 .*its holder is gone: continue with --resume"):
        Lease(loc).acquire()
    mine = Lease(loc).acquire(takeover_stale=True)
    assert loc.read_json("lease.json")["token"] == mine.token
    mine.release()
    assert not loc.exists("lease.json")
    loc.write_json({"owner": "bo", "host": "node-8", "pid": 1, "heartbeat": _time.time() - 60}, "lease.json")
    with pytest.raises(LeaseHeldError, match="wait for it to finish"):  # fresh heartbeat: never taken over
        Lease(loc).acquire(takeover_stale=True)


def test_harvest_into_s3_killed_and_resumed_is_identical(s3, tiny_lm, tiny_model_dir, tmp_path):
    """SIGKILL a harvest writing to S3 right after a commit object, twice, then --resume: the same
    digest, statistics and bytes as an uninterrupted local harvest (the dead writer's lease is taken over)."""
    from tests.test_safety import _killed_harvest

    cfg = dict(layers=[1, 2], tokens=5120, context_size=64, batch_size=8, dtype="bfloat16", chunk_tokens=1024,
               device="cpu")
    local = harvest(HarvestConfig(model=str(tiny_model_dir), out=str(tmp_path / "ref.zarr"), **cfg),
                    loaded=tiny_lm, quiet=True)
    url = "s3://team/killed.zarr"
    _killed_harvest("after_commit", 3, tiny_model_dir, url, storage_options=s3)
    _killed_harvest("before_commit", 2, tiny_model_dir, url, storage_options=s3)
    assert StoreLocation(url, s3).exists("lease.json")
    harvest(HarvestConfig(model=str(tiny_model_dir), out=url, resume=True, storage_options=s3, **cfg),
            loaded=tiny_lm, quiet=True)
    a, b = ActivationStore(local), ActivationStore(url, storage_options=s3)
    assert a.content_digest == b.content_digest and a.attrs["stats"] == b.attrs["stats"]
    for h in a.hook_names:
        assert torch.equal(a.read_rows(h, 0, a.n_tokens), b.read_rows(h, 0, b.n_tokens))
    assert not StoreLocation(url, s3).exists("lease.json") and verify_store(b).ok


def test_verify_two_hooks_with_scales_is_clean_and_names_a_bad_scale_chunk(tmp_path):
    """int8 stores carry a scale array per hook: the digest covers tokens, then per hook its
    activations and scales; a damaged scale chunk is named."""
    from sae.store import CodecSpec, StoreWriter

    x, _ = planted_features(2048, d_in=16, n_features=32)
    meta = {"model_id": "m", "model_fingerprint": "0", "dataset": "d", "split": "train", "seed": 0,
            "special_token_ids": [2]}
    hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    w = StoreWriter(tmp_path / "s.zarr", meta, hooks, 16, 64, 2048, CodecSpec.parse("int8"), 1024)
    for s in (0, 1024):
        w.append(np.arange(s, s + 1024, dtype=np.int32) % 50 + 3, {h: x[s:s + 1024] * (1 + k) for k, h in
                                                                   enumerate(hooks)}, np.ones(1024, bool))
    w.finalize()
    rep = verify_store(ActivationStore(tmp_path / "s.zarr"))
    assert rep.ok, rep.checks
    chunk = tmp_path / "s.zarr" / "blocks.1.hook_resid_post.scale" / "c" / "1"
    data = bytearray(chunk.read_bytes())
    data[0] ^= 0xFF
    chunk.write_bytes(bytes(data))
    rep = verify_store(ActivationStore(tmp_path / "s.zarr"))
    bad = {(a, i) for a, i, _, _ in rep.bad_chunks}  # the scale chunk, and the rows that need it to decode
    assert not rep.ok and bad == {("blocks.1.hook_resid_post.scale", 1), ("blocks.1.hook_resid_post", 1)}


def _bucket_snapshot(loc: StoreLocation, prefix: str) -> dict[str, object]:
    loc.fs.invalidate_cache()
    return {k: v.get("ETag") for k, v in loc.fs.find(prefix, detail=True).items()}


def test_s3_growth_under_a_live_lease_is_refused_and_changes_nothing(s3, tiny_lm, tiny_model_dir, tmp_path):
    import socket
    import time

    local = Path(harvest(_hcfg(tiny_model_dir, str(tmp_path / "s.zarr"), tokens=2048), loaded=tiny_lm, quiet=True))
    loc = StoreLocation("s3://team/leased-grow.zarr", s3)
    loc.fs.put(str(local), "team/leased-grow.zarr", recursive=True)
    loc.fs.pipe("team/leased-grow.zarr/lease.json", json.dumps({
        "owner": "ada", "host": f"not-{socket.gethostname()}", "pid": 4242, "purpose": "harvest", "lease_id": "x",
        "created": time.time(), "heartbeat": time.time()}).encode())
    before = _bucket_snapshot(loc, "team/leased-grow.zarr")
    opt = ["--storage-option", f"endpoint_url={s3['endpoint_url']}"]
    base = ["harvest", "--model", str(tiny_model_dir), "--device", "cpu", "--batch-size", "8", *opt]
    for args, option in ((["--out", loc.url, "--layer", "1", "--extend", "--tokens", "4096"], "--extend"),
                         (["--out", str(tmp_path / "x"), "--layer", "2", "--into", loc.url], "--into"),
                         (["--out", loc.url, "--layer", "1", "--resume"], "--resume")):
        r = CliRunner().invoke(app, base + args)
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1, r.output
        assert f"{option} s3://team/leased-grow.zarr" in errors[0] and "ada@not-" in errors[0], errors[0]
        assert _bucket_snapshot(loc, "team/leased-grow.zarr") == before


def test_store_ls_of_a_missing_bucket_or_prefix_is_one_error_line(s3):
    opt = ["--storage-option", f"endpoint_url={s3['endpoint_url']}"]
    for url in ("s3://no-such-bucket-7/stores", "s3://team/no/such/prefix"):
        r = CliRunner().invoke(app, ["store", "ls", url, *opt])
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1 and url in errors[0], r.output
