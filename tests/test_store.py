"""Store format: codecs, metadata/statistics, shuffled loader, failure modes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sae.store import ActivationStore, CodecSpec, ShuffledBatches, StoreError, StoreWriter
from tests.helpers import BOS, write_store


def test_codec_round_trips() -> None:
    x = torch.randn(50, 16) * 30
    bf = CodecSpec.parse("zstd", "bfloat16")
    stored, scale = bf.encode(x)
    assert stored.dtype == np.uint16 and scale is None
    assert torch.equal(bf.decode(stored), x.to(torch.bfloat16).float())
    f32 = CodecSpec.parse("none", "float32")
    assert torch.equal(f32.decode(*f32.encode(x)), x)
    for name, tol in [("int8", 0.5 / 127), ("fp8", 0.07)]:
        c = CodecSpec.parse(name)
        y = c.decode(*c.encode(x))
        rel = ((y - x).abs().amax(1) / x.abs().amax(1)).max().item()
        assert rel <= tol + 1e-6, (name, rel)
    br = CodecSpec.parse("bitround:7")
    y = br.decode(*br.encode(x))
    assert torch.equal(y, x)  # BitRound is applied by zarr on write, not by encode
    with pytest.raises(ValueError, match="unknown codec"):
        CodecSpec.parse("gzip")
    with pytest.raises(ValueError, match="unknown dtype"):
        CodecSpec.parse("zstd", "int4")


@pytest.mark.parametrize("codec,dtype,tol", [("zstd", "float32", 0), ("none", "bfloat16", 1e-2),
                                             ("bitround:10", "float32", 2e-3), ("int8", "bfloat16", 1e-2),
                                             ("fp8", "bfloat16", 7e-2)])
def test_store_round_trip_and_statistics(tmp_path, codec: str, dtype: str, tol: float) -> None:
    x = torch.randn(3000, 8) * 5 + 1
    path = write_store(tmp_path / "s.zarr", x, context_size=50, chunk_tokens=500, codec=codec, dtype=dtype)
    s = ActivationStore(path)
    assert s.n_tokens == 3000 and s.n_chunks == 6 and s.d_model == 8 and s.attrs["status"] == "complete"
    hook = s.hook_names[0]
    got = torch.cat([s.read_chunk(hook, i) for i in range(s.n_chunks)])
    valid = torch.from_numpy(s.valid_mask(s.tokens))
    assert valid.sum() == 3000 - 60 and not valid[::50].any()
    err = ((got - x)[valid].abs() / x[valid].abs().amax(1, keepdim=True)).max().item()
    assert err <= tol + 1e-7
    xv = got[valid].double()
    np.testing.assert_allclose(s.mean(hook).numpy(), xv.mean(0).numpy(), rtol=1e-5, atol=1e-5)
    assert s.mean_sq_norm(hook) == pytest.approx(xv.pow(2).sum(1).mean().item(), rel=1e-6)
    assert s.norm_scale(hook) == pytest.approx((8 / xv.pow(2).sum(1).mean().item()) ** 0.5, rel=1e-6)


def test_lossy_codecs_are_smaller(tmp_path) -> None:
    x = torch.randn(4096, 64)
    sizes = {c: ActivationStore(write_store(tmp_path / f"{c.replace(':', '_')}.zarr", x, chunk_tokens=1024, codec=c,
                                            dtype="bfloat16" if c != "bitround:4" else "float32")).nbytes_stored()
             for c in ("none", "zstd", "int8", "fp8", "bitround:4")}
    assert sizes["int8"] < 0.6 * sizes["none"] and sizes["fp8"] < 0.6 * sizes["none"]
    assert sizes["bitround:4"] < 4096 * 64 * 4 * 0.5


def test_loader_is_a_shuffled_permutation_excluding_bos(tmp_path) -> None:
    n, d = 4096, 4
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, d)  # row id encoded in the value
    s = ActivationStore(write_store(tmp_path / "s.zarr", x, context_size=64, chunk_tokens=512))
    loader = ShuffledBatches(s, s.hook_names[0], batch_size=300, seed=3, mix_chunks=2)
    per_epoch = loader.rows_per_epoch
    assert per_epoch == n - n // 64
    rows = []
    for b in loader:
        rows.append(b[:, 0].long())
        if sum(len(r) for r in rows) >= per_epoch:
            break
    seen = torch.cat(rows)[:per_epoch]
    expect = torch.tensor([i for i in range(n) if i % 64])
    assert torch.equal(seen.sort().values, expect)  # every non-BOS row exactly once per epoch
    first_batch = rows[0]
    assert len(set((first_batch // 512).tolist())) == 2  # mixed from two chunks
    assert not torch.equal(first_batch, first_batch.sort().values)  # shuffled


def test_loader_resume_continues_the_same_stream(tmp_path) -> None:
    x = torch.randn(3000, 4)
    s = ActivationStore(write_store(tmp_path / "s.zarr", x, context_size=50, chunk_tokens=500))
    hook = s.hook_names[0]
    ref = ShuffledBatches(s, hook, batch_size=128, seed=1, scale=2.0)
    it = iter(ref)
    batches = [next(it) for _ in range(40)]  # crosses an epoch boundary
    cut = ShuffledBatches(s, hook, batch_size=128, seed=1, scale=2.0, start_row=128 * 17)
    it2 = iter(cut)
    for b in batches[17:]:
        assert torch.equal(next(it2), b)


def test_store_failure_modes(tmp_path) -> None:
    with pytest.raises(StoreError, match="no store at"):
        ActivationStore(tmp_path / "missing.zarr")
    path = write_store(tmp_path / "s.zarr", torch.randn(256, 4), context_size=64, chunk_tokens=128)
    s = ActivationStore(path)
    with pytest.raises(StoreError, match="hook 'blocks.9.hook_resid_post' is not in"):
        s.check_hook("blocks.9.hook_resid_post")
    meta = {"model_id": "m", "model_fingerprint": "0", "dataset": "d", "split": "train", "seed": 0,
            "special_token_ids": [BOS]}
    with pytest.raises(StoreError, match="already exists"):
        StoreWriter(path, meta, ["h"], 4, 64, 256, CodecSpec.parse("zstd"), 128)
    with pytest.raises(StoreError, match="multiple of context_size"):
        StoreWriter(tmp_path / "t.zarr", meta, ["h"], 4, 64, 256, CodecSpec.parse("zstd"), 100)
    w = StoreWriter(tmp_path / "p.zarr", meta, ["h"], 4, 64, 256, CodecSpec.parse("zstd"), 128)
    w.append(np.full(128, 5, dtype=np.int32), {"h": torch.randn(128, 4)}, np.ones(128, bool))
    with pytest.raises(StoreError, match="incomplete"):
        ActivationStore(tmp_path / "p.zarr")
    assert ActivationStore(tmp_path / "p.zarr", require_complete=False).n_tokens == 128
    with pytest.raises(StoreError, match="is being written by .* pid"):  # w holds the lease
        StoreWriter(tmp_path / "p.zarr", meta, ["h"], 4, 64, 256, CodecSpec.parse("zstd"), 128, mode="resume")
    w.close()
    with pytest.raises(StoreError, match="cannot resume .*context_size"):
        StoreWriter(tmp_path / "p.zarr", meta, ["h"], 4, 32, 256, CodecSpec.parse("zstd"), 128, mode="resume")
    # corrupt a chunk file: reading it is a clear error naming the rows
    chunk = next(p for p in (tmp_path / "s.zarr" / s.hook_names[0]).rglob("*") if p.is_file() and p.name == "0")
    chunk.write_bytes(b"garbage")
    with pytest.raises(StoreError, match="corrupt chunk"):
        ActivationStore(path).read_chunk(s.hook_names[0], 0)


def test_convert_store_reencodes_and_keeps_identity(tmp_path) -> None:
    from sae.store.convert import convert_store

    x = torch.randn(2048, 16) * 3
    src = write_store(tmp_path / "s.zarr", x, context_size=64, chunk_tokens=512, dtype="float32")
    dst = convert_store(src, tmp_path / "i8.zarr", "int8", "bfloat16", n_tokens=1500)
    a, b = ActivationStore(src), ActivationStore(dst)
    assert b.n_tokens == 1472 and b.attrs["codec"] == "int8" and b.attrs["model_id"] == a.attrs["model_id"]
    assert b.attrs["converted_from"]["store_id"] == a.attrs["store_id"]
    h = a.hook_names[0]
    diff = (b.read_rows(h, 0, 1472) - a.read_rows(h, 0, 1472))[torch.from_numpy(b.valid_mask(b.tokens))]
    assert diff.abs().max() < 0.05 * x.abs().max()
    assert np.array_equal(a.tokens[:1472], b.tokens)
    with pytest.raises(StoreError, match="already exists"):
        convert_store(src, dst, "fp8")
