"""Write a synthetic model's samples into an ordinary activation store, with its ground truth.

Layout: a format-2 store (:mod:`sae.store.writer`) with one hook, ``blocks.0.hook_resid_post``
(``hook_point: synthetic``), whose rows are i.i.d. samples ``x = Σ_f a_f · d_f + b`` of SAELens'
``SyntheticModel``; ``tokens`` are all 0 and no id is special (every row trains). Rows are grouped
into nominal "sequences" of ``context_size`` rows only because the format has them: neighbouring
rows are independent, so the ``temporal`` penalty sees unrelated neighbours here.

Chunk ``i`` is drawn with torch's generator seeded from ``SeedSequence([seed, 0, i])``: the same
chunk always holds the same rows (a killed ``sae store synth`` resumes exactly; more chunks are more
of the same stream), and evaluation draws its held-out samples from the disjoint stream
``SeedSequence([seed, 1, j])`` (:func:`sample_heldout`), rows no SAE trained on.

The ground truth lives in the store: the zarr group ``synthetic/`` holds ``feature_vectors``
``[n_features, d_model]``, ``bias`` ``[d_model]``, ``firing_probabilities`` ``[n_features]`` and,
with correlations, ``correlation_factor`` ``[n_features, rank]`` and ``correlation_diag``
``[n_features]`` (float32, each chunk with crc32c), and the group attribute ``synthetic`` records
SAELens' configuration (``SyntheticModelConfig.to_dict()``), the hierarchy (``Hierarchy.to_dict()``),
the sample seed and the sha256 of the arrays (``ground_truth_sha256``). :func:`load_synthetic_model`
rebuilds the generator from these alone, as SAELens' ``SyntheticModel.load_from_disk`` does.

Why materialised rather than generated on read: SAELens' generator makes ~5 000 rows/s on this
2-core machine at 4 096 features (the dense ``[batch, n_features]`` hierarchy pass dominates), ten
times slower than training reads a store; written once, every seed and variant of a sweep shares it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ..model import hook_name_for
from ..outputs import check_output_location, check_writable_dir, is_empty_dir, is_sae_store
from ..progress import progress_bar
from ..store import CodecSpec, StoreError, StoreWriter
from ..store.lease import building, check_not_leased
from ..store.location import as_location
from .config import SynthConfig
from .presets import load_config

HOOK = hook_name_for(0)
GROUP = "synthetic"
TRAIN_STREAM, EVAL_STREAM = 0, 1
ARRAYS = ("feature_vectors", "bias", "firing_probabilities", "correlation_factor", "correlation_diag")
SAMPLE_BATCH = 4096
"""Rows per call of the generator (its dense ``[batch, n_features]`` pass bounds memory)."""


def stream_seed(seed: int, stream: int, index: int) -> int:
    """The torch seed of block ``index`` of ``stream`` (0 = the store's chunks, 1 = held-out samples)."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, np.uint64)[0] >> 1)


@torch.no_grad()
def sample_block(model: Any, rows: int, seed: int, stream: int, index: int,
                 with_features: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows of block ``index`` of ``stream``: ``(x [rows, d_model] float32, a [rows, n_features] or None)``.

    Deterministic in ``(seed, stream, index, rows)`` (torch's global generator is forked, so the
    caller's random state is untouched). ``a``: the true feature activations (``with_features``).
    """
    xs, fs = [], []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(stream_seed(seed, stream, index))
        for start in range(0, rows, SAMPLE_BATCH):
            n = min(SAMPLE_BATCH, rows - start)
            a = model.activation_generator.sample(n)
            xs.append(model.feature_dict(a).float().cpu())
            if with_features:
                fs.append(a.to_dense().float().cpu() if a.is_sparse else a.float().cpu())
    return torch.cat(xs), (torch.cat(fs) if with_features else None)


def sample_heldout(model: Any, rows: int, seed: int, block: int = SAMPLE_BATCH
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``rows`` held-out samples (stream 1, never in the store), in blocks of ``block`` rows:
    ``[(x [b, d_model], a [b, n_features] sparse COO)]`` (sparse: 100 000 dense rows of 16 384
    features would take 6.5 GB)."""
    out = []
    for j, start in enumerate(range(0, rows, block)):
        x, a = sample_block(model, min(block, rows - start), seed, EVAL_STREAM, j, with_features=True)
        assert a is not None
        out.append((x, a.to_sparse()))
    return out


def _ground_truth(model: Any) -> dict[str, np.ndarray]:
    arrays = {
        "feature_vectors": model.feature_dict.feature_vectors.detach(),
        "bias": model.feature_dict.bias.detach(),
        "firing_probabilities": model.activation_generator.firing_probabilities,
    }
    if model.correlation_matrix is not None:
        arrays["correlation_factor"] = model.correlation_matrix.correlation_factor
        arrays["correlation_diag"] = model.correlation_matrix.correlation_diag
    return {k: np.ascontiguousarray(v.float().cpu().numpy()) for k, v in arrays.items()}


def _sha256(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for k in sorted(arrays):
        h.update(k.encode())
        h.update(np.ascontiguousarray(arrays[k], dtype="<f4").tobytes())
    return h.hexdigest()


def _write_ground_truth(group: Any, arrays: dict[str, np.ndarray]) -> None:
    checked = CodecSpec("none", "float32").zarr_kwargs()
    sub = group.require_group(GROUP)
    for name, value in arrays.items():
        arr = sub.create_array(name, shape=value.shape, chunks=value.shape, dtype="float32", overwrite=True,
                               **checked)
        arr[...] = value


def build_model(cfg_obj: Any, device: str = "cpu") -> Any:
    """SAELens' ``SyntheticModel`` of a ``SyntheticModelConfig`` (orthogonalisation shows its own bar)."""
    from sae_lens.synthetic import SyntheticModel

    return SyntheticModel(cfg_obj, device=device)


def load_synthetic_model(store: Any, device: str = "cpu") -> Any:
    """Rebuild the generator of a synthetic store from what it records (no retraining, no download).

    ``store``: an opened :class:`sae.store.ActivationStore`. Mirrors SAELens'
    ``SyntheticModel.load_from_disk``: the config, the stored dictionary (not re-orthogonalised), the
    hierarchy, the correlation factors and the firing probabilities.

    Raises:
        StoreError: not a synthetic store, or its ground-truth arrays do not match their recorded sha256.
    """
    from sae_lens.synthetic import FeatureDictionary, Hierarchy, SyntheticModel, SyntheticModelConfig
    from sae_lens.synthetic.correlation import LowRankCorrelationMatrix

    meta = store.attrs.get(GROUP)
    if not isinstance(meta, dict):
        raise StoreError(f"{store.path} is not a synthetic store (no ground truth): write one with `sae store synth`")
    sub = store.group[GROUP]
    arrays = {name: np.asarray(sub[name][...]) for name in ARRAYS if name in sub}
    if _sha256(arrays) != meta.get("ground_truth_sha256"):
        raise StoreError(f"{store.path}: the ground-truth arrays do not match their recorded sha256; the store was "
                         "modified: write it again with `sae store synth --overwrite`")
    cfg = SyntheticModelConfig.from_dict(meta["config"])
    t = {k: torch.from_numpy(v).to(device) for k, v in arrays.items()}
    fd = FeatureDictionary(num_features=cfg.num_features, hidden_dim=cfg.hidden_dim, bias=cfg.bias,
                           initializer=None, device=device)
    fd.feature_vectors.data = t["feature_vectors"]
    fd.bias.data = t["bias"]
    corr = (LowRankCorrelationMatrix(correlation_factor=t["correlation_factor"],
                                     correlation_diag=t["correlation_diag"]) if "correlation_factor" in t else None)
    hierarchy = Hierarchy.from_dict(meta["hierarchy"]) if meta.get("hierarchy") else None
    model = SyntheticModel(cfg, feature_dict=fd, hierarchy=hierarchy, correlation_matrix=corr, device=device)
    model.activation_generator.firing_probabilities = t["firing_probabilities"]
    return model


def is_synthetic(attrs: dict) -> bool:
    """True for the attributes of a store written by ``sae store synth``."""
    return isinstance(attrs.get(GROUP), dict)


def _fingerprint(cfg_obj: Any, gt: dict[str, np.ndarray]) -> str:
    return hashlib.sha256((json.dumps(cfg_obj.to_dict(), sort_keys=True) + _sha256(gt)).encode()).hexdigest()[:16]


def write_synthetic_store(cfg: SynthConfig, quiet: bool = False) -> str:
    """Write the store ``cfg`` describes and return its path or URL.

    Validates everything and checks the output location before the (slow) dictionary is built;
    chunks are drawn, written and committed one at a time, so a killed run continues with
    ``resume`` (drawing only the missing chunks: the result is bit-identical). ``overwrite``
    replaces only a local store of ours, built beside it and swapped in at the end.

    Raises:
        ConfigError: bad option or config. StoreError: existing output without resume/overwrite, a
        resume with another config or seed, not a store of ours, remote overwrite.
        LeaseHeldError: another writer holds the store.
    """
    cfg.validate()
    name, model_cfg = load_config(cfg.config)
    loc = as_location(cfg.out, cfg.storage_options)
    if loc.local:
        check_output_location(loc.path, "--out")
        exists = loc.path.exists() and not is_empty_dir(loc.path)
        ours = exists and is_sae_store(loc.path)
    else:
        exists = ours = loc.exists("zarr.json")
    if exists:
        if not ours:
            raise StoreError(f"{cfg.out} exists and is not an sae store; refusing to touch it (pick another --out)")
        if not (cfg.resume or cfg.overwrite):
            raise StoreError(f"{cfg.out} already exists: pass --resume to continue it or --overwrite to replace it")
        if cfg.overwrite and not loc.local:
            raise StoreError(f"--overwrite of a remote store is not supported: write to a new URL, or delete "
                             f"{cfg.out} with your storage tools")
        check_not_leased(loc, "--overwrite" if cfg.overwrite else "--resume")
        if cfg.resume:
            if loc.local:
                check_writable_dir(loc.path, "--resume")
            _check_resumable(loc, name, model_cfg, cfg)
    elif cfg.resume:
        raise StoreError(f"--resume {cfg.out}: there is no store to continue; drop --resume")
    if not quiet:
        print(f"building the synthetic model {name} ({model_cfg.num_features} features, d_model "
              f"{model_cfg.hidden_dim}) with SAELens…", flush=True)
    t0 = time.perf_counter()
    model = build_model(model_cfg, cfg.device)
    gt = _ground_truth(model)
    if not quiet:
        print(f"  built in {time.perf_counter() - t0:.0f} s", flush=True)
    meta = _meta(name, model, gt, cfg)
    codec = CodecSpec.parse(cfg.codec, cfg.dtype)
    args = (meta, [HOOK], model_cfg.hidden_dim, cfg.context_size, cfg.tokens, codec, cfg.chunk_tokens)
    writers: list[StoreWriter] = []

    def write(target: Any, mode: str) -> None:
        writers.append(StoreWriter(target, *args, mode=mode, storage_options=cfg.storage_options))
        try:
            _fill(writers[-1], model, gt, cfg.seed, quiet)
        finally:
            writers[-1].close()

    if cfg.resume:
        write(loc, "resume")
    else:
        with building(loc, overwrite=cfg.overwrite,
                      keep_partial=lambda: bool(writers) and writers[-1].n_written > 0) as target:
            write(target, "create")
    if not quiet:
        print(f"→ {cfg.out}")
    return cfg.out


def _meta(name: str, model: Any, gt: dict[str, np.ndarray], cfg: SynthConfig) -> dict:
    import sae_lens

    record = {k: v for k, v in asdict(cfg).items() if k not in ("storage_options", "resume", "overwrite")}
    return {
        "model_id": f"synthetic:{name}", "model_fingerprint": _fingerprint(model.cfg, gt),
        "tokenizer": "", "vocab_size": 1, "layers": [0], "hook_point": "synthetic",
        "dataset": f"synthetic:{name}", "split": "train", "text_column": None, "seed": cfg.seed,
        "special_token_ids": [], "bos_token_id": None, "harvest_config": record,
        GROUP: {"name": name, "config": model.cfg.to_dict(),
                "hierarchy": model.hierarchy.to_dict() if model.hierarchy is not None else None,
                "sample_seed": cfg.seed, "streams": {"store": TRAIN_STREAM, "heldout": EVAL_STREAM},
                "generator": f"sae_lens {sae_lens.__version__}", "ground_truth_sha256": _sha256(gt)},
    }


def _check_resumable(loc: Any, name: str, model_cfg: Any, cfg: SynthConfig) -> None:
    attrs = (loc.read_json("zarr.json", fresh=True).get("attributes") or {})
    meta = attrs.get(GROUP)
    if not isinstance(meta, dict):
        raise StoreError(f"--resume {cfg.out}: it is not a synthetic store; pick another --out")
    if meta.get("config") != json.loads(json.dumps(model_cfg.to_dict())):
        raise StoreError(f"--resume {cfg.out}: the store was written with another synthetic config "
                         f"({meta.get('name')}); resume with the same CONFIG, or --overwrite")
    if attrs.get("seed") != cfg.seed:
        raise StoreError(f"--resume {cfg.out}: the store has --seed {attrs.get('seed')}, not {cfg.seed}")


def _fill(writer: StoreWriter, model: Any, gt: dict[str, np.ndarray], seed: int, quiet: bool) -> None:
    sub = writer.group.get(GROUP)
    if sub is None or "feature_vectors" not in sub:  # type: ignore[operator]
        _write_ground_truth(writer.group, gt)
    if not writer.tokens_committed():
        writer.write_tokens(np.zeros(writer.n_target, dtype=np.int32))
    todo = writer.missing_chunks()
    with progress_bar(quiet, unit="row") as bar:
        task = bar.add_task("sampling", total=writer.n_tokens, completed=writer.n_tokens - sum(
            min(writer.chunk_tokens, writer.n_tokens - i * writer.chunk_tokens) for i in todo))
        for i in todo:
            start = i * writer.chunk_tokens
            rows = min(writer.chunk_tokens, writer.n_tokens - start)
            x, _ = sample_block(model, rows, seed, TRAIN_STREAM, i)
            writer.write_chunk(i, {HOOK: x}, np.ones(rows, dtype=bool))
            bar.advance(task, rows)
    writer.finalize()


def print_config(spec: str) -> str:
    """The TOML of a preset or file (``--print-config``)."""
    from .presets import to_toml

    return to_toml(load_config(spec)[1])


__all__ = ["HOOK", "SynthConfig", "build_model", "is_synthetic", "load_synthetic_model", "print_config",
           "sample_block", "sample_heldout", "stream_seed", "write_synthetic_store"]
