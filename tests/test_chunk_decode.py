"""The direct chunk decoder (store/chunk_decode.py) against plain Zarr, and the loader's stream
against its written definition (store/loader.py module doc), computed here from plain Zarr reads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from sae.store import ActivationStore, ShuffledBatches, StoreError
from sae.store.chunk_decode import ChunkScratch, DirectChunks
from sae.store.format import SCALE_SUFFIX

from .helpers import write_store

CODECS = [("none", "float32"), ("none", "bfloat16"), ("zstd", "float32"), ("zstd", "bfloat16"), ("zstd", "float16"),
          ("int8", "float32"), ("fp8", "float32"), ("bitround:6", "float32")]
N, D, CHUNK = 2500, 24, 512  # the last chunk is partial (452 rows)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Path]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g) * 3
    root = tmp_path_factory.mktemp("direct")
    return {f"{c}-{d}": write_store(root / f"{c.replace(':', '_')}-{d}.zarr", x, chunk_tokens=CHUNK, codec=c, dtype=d)
            for c, d in CODECS}


@pytest.mark.parametrize("name", [f"{c}-{d}" for c, d in CODECS])
def test_direct_chunks_are_zarrs_bytes_for_every_array_and_codec(stores, name: str) -> None:
    path = stores[name]
    group = zarr.open_group(str(path), mode="r")
    arrays = [k for k in group.array_keys()]
    assert len(arrays) >= 2  # tokens and the hook (+ the scale array for int8/fp8)
    scratch = ChunkScratch()
    s = ActivationStore(path)
    for a in arrays:
        arr = group[a]
        dc = DirectChunks.for_array(a, arr)
        if name.startswith("bitround") and a == s.hook_names[0]:
            assert dc is None  # a numcodecs filter in the chain: read through Zarr
            continue
        assert dc is not None, a
        for i in range(-(-N // CHUNK)):
            want = np.asarray(arr[i * CHUNK:(i + 1) * CHUNK])
            for got in (dc.read(s.loc, i), dc.read(s.loc, i, scratch)):
                assert got.dtype == want.dtype and got.shape == want.shape, (a, i)
                assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (a, i)
        with pytest.raises(IndexError):
            dc.read(s.loc, -(-N // CHUNK))


def test_a_scratch_buffer_is_reused_not_reallocated(stores) -> None:
    s = ActivationStore(stores["zstd-bfloat16"])
    hook = s.hook_names[0]
    dc = DirectChunks.for_array(hook, s.array(hook))
    scratch = ChunkScratch()
    a = dc.read(s.loc, 0, scratch)
    first = a.copy()
    b = dc.read(s.loc, 1, scratch)
    assert np.shares_memory(a, b) and not np.array_equal(a, first)  # chunk 1 overwrote chunk 0's buffer


def test_reader_matches_zarr_whole_chunks_and_slices(stores) -> None:
    for name in ("zstd-bfloat16", "int8-float32", "bitround:6-float32"):
        s = ActivationStore(stores[name])
        hook = s.hook_names[0]
        for start, stop in ((0, CHUNK), (4 * CHUNK, N), (100, 900)):  # whole, partial last, unaligned (Zarr)
            raw, sc = s.read_rows_stored(hook, start, stop, scratch=ChunkScratch())
            want = np.asarray(zarr.open_array(str(stores[name] / hook), mode="r")[start:stop])
            got = raw.view(torch.int16) if raw.dtype == torch.bfloat16 else raw
            assert np.array_equal(got.numpy().view(np.uint8).reshape(want.shape[0], -1),
                                  want.view(np.uint8).reshape(want.shape[0], -1)), (name, start)
            if sc is not None:
                want_sc = np.asarray(zarr.open_array(str(stores[name] / f"{hook}{SCALE_SUFFIX}"), mode="r")[start:stop])
                assert np.array_equal(sc.numpy(), want_sc)


def test_missing_chunk_object_is_an_error_where_zarr_returns_zeros(tmp_path) -> None:
    path = write_store(tmp_path / "s.zarr", torch.randn(2048, 8), chunk_tokens=512)
    hook = "blocks.0.hook_resid_post"
    (path / hook / "c" / "2" / "0").unlink()
    assert not np.asarray(zarr.open_array(str(path / hook), mode="r")[1024:1536]).any()  # zarr: silent zeros
    with pytest.raises(StoreError, match="corrupt chunk 2 .*FileNotFoundError.*sae store verify"):
        ActivationStore(path).read_rows_stored(hook, 1024, 1536)


def test_truncated_and_flipped_chunks_are_corrupt(tmp_path) -> None:
    path = write_store(tmp_path / "s.zarr", torch.randn(2048, 8), chunk_tokens=512)
    hook = "blocks.0.hook_resid_post"
    chunk = path / hook / "c" / "1" / "0"
    good = chunk.read_bytes()
    for bad in (good[:-9] + good[-4:], good[:3], bytes([good[0] ^ 1]) + good[1:]):
        chunk.write_bytes(bad)
        with pytest.raises(StoreError, match="corrupt chunk 1"):
            ActivationStore(path).read_rows_stored(hook, 512, 1024)
    chunk.write_bytes(good)
    assert ActivationStore(path).read_rows(hook, 512, 1024).shape == (512, 8)


def test_remote_direct_reads_equal_local(stores) -> None:
    """Through an fsspec filesystem (memory://): the chunk objects are fetched with ``cat_file``."""
    import fsspec

    fs = fsspec.filesystem("memory")
    src = stores["int8-float32"]
    for f in src.rglob("*"):
        if f.is_file():
            fs.pipe_file(f"/direct-int8/{f.relative_to(src).as_posix()}", f.read_bytes())
    local, remote = ActivationStore(src), ActivationStore("memory://direct-int8")
    hook = local.hook_names[0]
    for i in range(local.n_chunks):
        a, b = local.chunk_bounds(i)
        ra, sa = local.read_rows_stored(hook, a, b)
        rb, sb = remote.read_rows_stored(hook, a, b, scratch=ChunkScratch())
        assert torch.equal(ra, rb) and torch.equal(sa, sb)


def _reference_stream(path: Path, seed: int, mix: int, scale: float, n_rows: int) -> torch.Tensor:
    """The loader's definition, from plain Zarr: epoch e visits chunks in default_rng([seed, e])
    .permutation(n_chunks); groups of ``mix`` chunks form windows; a window's non-BOS rows are
    permuted by default_rng([seed, e, w]); rows are dequantised (q·scale for int8, the bf16 bits as
    float, …) and multiplied by ``scale``."""
    g = zarr.open_group(str(path), mode="r")
    attrs = dict(g.attrs)
    hook = attrs["hook_names"][0]
    tokens = np.asarray(g["tokens"][:])
    special = set(attrs["special_token_ids"])
    codec, dtype = attrs["codec"], attrs["dtype"]
    n_chunks = -(-len(tokens) // CHUNK)

    def rows(c: int) -> np.ndarray:
        a, b = c * CHUNK, min((c + 1) * CHUNK, len(tokens))
        v = np.asarray(g[hook][a:b])
        if codec == "int8":
            x = v.astype(np.float64) * np.asarray(g[f"{hook}{SCALE_SUFFIX}"][a:b], dtype=np.float64)[:, None]
        elif codec == "fp8":
            f8 = torch.from_numpy(v).view(torch.float8_e4m3fn).double().numpy()
            x = f8 * np.asarray(g[f"{hook}{SCALE_SUFFIX}"][a:b], dtype=np.float64)[:, None]
        elif dtype == "bfloat16":
            x = (v.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
        else:
            x = v.astype(np.float64)
        keep = np.array([t not in special for t in tokens[a:b]])
        return x[keep]

    out, e = [], 0
    while sum(len(o) for o in out) < n_rows:
        order = np.random.default_rng([seed, e]).permutation(n_chunks)
        for w, i in enumerate(range(0, n_chunks, mix)):
            win = np.concatenate([rows(int(c)) for c in order[i:i + mix]])
            out.append(win[np.random.default_rng([seed, e, w]).permutation(len(win))])
        e += 1
    return torch.from_numpy(np.concatenate(out)[:n_rows] * scale)


@pytest.mark.parametrize("name", ["zstd-float32", "zstd-bfloat16", "int8-float32", "fp8-float32", "none-float32"])
def test_loader_stream_is_its_definition(stores, name: str) -> None:
    s = ActivationStore(stores[name])
    batch, n_batches = 300, 12  # crosses windows and an epoch (2 461 non-BOS rows per epoch)
    it = iter(ShuffledBatches(s, s.hook_names[0], batch, seed=3, mix_chunks=2, scale=0.5, read_workers=2))
    got = torch.cat([next(it).clone() for _ in range(n_batches)])
    it.close()
    want = _reference_stream(stores[name], seed=3, mix=2, scale=0.5, n_rows=batch * n_batches)
    # float32 products of the same operands: equal to float64's value rounded to float32, within 1 ulp
    torch.testing.assert_close(got.double(), want, rtol=2 ** -23, atol=0)


def test_loader_refuses_a_chunk_whose_decoded_form_disagrees_with_the_codec(stores) -> None:
    """The loader copies each chunk's rows as bytes, so a chunk that decodes to another dtype than
    the store's codec declares (a damaged store) must stop it with one line, not be misread."""
    s = ActivationStore(stores["zstd-bfloat16"])
    real = s.read_rows_stored
    s.read_rows_stored = lambda *a, **kw: (real(*a, **kw)[0].view(torch.float16), None)  # same size, other dtype
    with pytest.raises(StoreError, match=r"decodes to torch.float16 .* say torch.bfloat16 × 24.*sae store verify") as e:
        next(iter(ShuffledBatches(s, s.hook_names[0], 64)))
    assert "\n" not in str(e.value)
