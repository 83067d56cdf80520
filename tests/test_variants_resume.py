"""Resume equivalence for every stateful variant inside the real training loop."""

from __future__ import annotations

import pytest
import torch

from sae.rundir.sae import SAE
from sae.train import run as run_mod
from sae.train.config import TrainConfig
from sae.train.run import train

# small settings so every variant's state (windows, groups, EMAs) changes within a few steps
PARAMS = {
    "topk_pairs": {"tau_mode": "adaptive", "rho": "0.05"},
    "adaptive": {"refresh_every": "3", "chunk_size": "16", "cofire_samples": "0"},
    "progressive": {},
    "temporal": {"window_tokens": "300", "sample_pairs": "0"},
    "static_ortho": {"chunk_size": "16"},
    "ortsae": {"chunk_size": "16"},
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: avoid OpenMP oversubscription


@pytest.fixture(scope="module")
def store(planted_store_factory):
    return planted_store_factory(4096, d_in=16, n_features=32, active=2, seed=3)


@pytest.mark.parametrize("variant", sorted(PARAMS))
def test_resumed_variant_run_is_bit_identical(variant: str, store, tmp_path, monkeypatch) -> None:
    base = dict(store=str(store), variant=variant, variant_params=PARAMS[variant], d_sae=48, k=3,
                batch_size=128, tokens=128 * 14, log_every=2, checkpoint_every=5)
    ref = train(TrainConfig(**base, out=str(tmp_path / "ref")), quiet=True)
    real_step = run_mod.Trainer.step
    count = {"n": 0}

    def dying_step(self, x, sync=True):
        if count["n"] == 8:
            raise KeyboardInterrupt("killed")
        count["n"] += 1
        return real_step(self, x, sync)

    monkeypatch.setattr(run_mod.Trainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig(**base, out=str(tmp_path / "cut")), quiet=True)
    monkeypatch.setattr(run_mod.Trainer, "step", real_step)
    train(TrainConfig(**base, out=str(tmp_path / "cut"), resume=True), quiet=True)
    a, b = SAE.load(ref), SAE.load(tmp_path / "cut")
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(a, n), getattr(b, n)), (variant, n)
    assert (tmp_path / "ref" / "metrics.jsonl").read_text().count("penalty/") > 0
