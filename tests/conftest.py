"""Shared fixtures: a tiny randomly initialised Gemma-3-style model with a BPE tokenizer trained
on the embedded corpus (seconds, offline), and small stores harvested from it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
