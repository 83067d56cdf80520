"""Shared fixtures: a tiny randomly initialised Gemma-3-style model with a BPE tokenizer trained
on the embedded corpus (seconds, offline), and small stores harvested from it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _shared_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache folder for the whole session, whose ``models/`` (the embedded GGUF dequantised to an HF
    directory, ~40 s on 2 cores) every test shares: the session dequantises once, never into ``~/.cache``.
    Module-scoped fixtures, set up before any test's own cache folder, load through it."""
    root = tmp_path_factory.mktemp("sae-cache-session")
    (root / "models").mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("SAE_CACHE_DIR", str(root))
    yield root
    mp.undo()


@pytest.fixture(autouse=True)
def _private_cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
                       _shared_model_cache: Path) -> None:
    """``sae evaluate`` keeps timings and model-only work in a cache folder: each test gets an empty one
    (so no test reuses another's work), except ``models/``, the dequantised embedded model, shared."""
    private = tmp_path_factory.mktemp("sae-cache")
    (private / "models").symlink_to(_shared_model_cache / "models", target_is_directory=True)
    monkeypatch.setenv("SAE_CACHE_DIR", str(private))

TINY_LAYERS = 4
TINY_D_MODEL = 64


def build_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """Write a tiny Gemma3 causal LM + fast BPE tokenizer to ``path`` (loadable by ``load_model``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    from sae.harvest.corpus import iter_documents

    docs = [d.text for _, d in zip(range(60), iter_documents("embedded", "all", seed=1), strict=False)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer)
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                     pad_token="<pad>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = Gemma3TextConfig(vocab_size=len(hf_tok), hidden_size=TINY_D_MODEL, intermediate_size=128,
                           num_hidden_layers=TINY_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=16, max_position_embeddings=512, sliding_window=32,
                           bos_token_id=hf_tok.bos_token_id, eos_token_id=hf_tok.eos_token_id,
                           pad_token_id=hf_tok.pad_token_id)
    model = Gemma3ForCausalLM(cfg).eval()
    model.save_pretrained(path)
    hf_tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("tiny_model"))


@pytest.fixture(scope="session")
def tiny_lm(tiny_model_dir: Path):
    from sae.model import load_model

    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, tiny_lm) -> Path:
    """A complete store: layers 1 and 2 of the tiny model, 8192 tokens, float32, 2048-row chunks."""
    from sae.harvest.harvest import HarvestConfig, harvest

    out = tmp_path_factory.mktemp("stores") / "tiny.zarr"
    cfg = HarvestConfig(layers=[1, 2], model=str(tiny_lm.model_id), tokens=8192, context_size=64, batch_size=8,
                        dtype="float32", chunk_tokens=2048, device="cpu", out=str(out))
    return harvest(cfg, loaded=tiny_lm, quiet=True)


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny ops: with 2 OpenMP threads on the shared 2-core
    machine they run up to ~40x slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def planted_store_factory(tmp_path_factory: pytest.TempPathFactory):
    """``make(n_tokens, d_in, n_features, active, seed, chunk_tokens, context_size)`` → path of a complete
    store of planted sparse features (:func:`tests.helpers.planted_features`), built once per
    argument set for the whole session. Read-only: a test that damages a store builds its own."""
    from tests.helpers import planted_features, write_store

    made: dict[tuple, Path] = {}

    def make(n_tokens: int = 4096, d_in: int = 16, n_features: int = 32, active: int = 2, seed: int = 0,
             chunk_tokens: int = 1024, context_size: int = 64) -> Path:
        key = (n_tokens, d_in, n_features, active, seed, chunk_tokens, context_size)
        if key not in made:
            x, _ = planted_features(n_tokens, d_in=d_in, n_features=n_features, active=active, seed=seed)
            path = tmp_path_factory.mktemp("planted") / "s.zarr"
            made[key] = write_store(path, x, context_size=context_size, chunk_tokens=chunk_tokens)
        return made[key]

    return make
