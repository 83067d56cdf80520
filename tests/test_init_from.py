"""Fine-tuning (``sae train --init-from RUN``): step 0 reconstructs as the source does, provenance, refusals
before anything is created, resume."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sae.cli import app
from sae.errors import Interrupted
from sae.rundir.sae import SAE
from sae.store import ActivationStore
from sae.train.config import TrainConfig
from sae.train.run import RunDirError, train
from sae.train.trainer import Trainer
from tests.helpers import tree_hash


@pytest.fixture(scope="module")
def store(planted_store_factory):
    return planted_store_factory(8192, d_in=16, n_features=32, active=2, seed=5)


@pytest.fixture(scope="module")
def sources(store, tmp_path_factory) -> dict[str, Path]:
    """A finished TopK, ReLU and BatchTopK (saved as JumpReLU) SAE on the store, normalised training."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for arch in ("topk", "relu", "batchtopk"):
        out[arch] = train(TrainConfig(store=str(store), arch=arch, d_sae=48, k=3, batch_size=256, tokens=256 * 12,
                                      device="cpu", out=str(root / arch)), quiet=True)
    return out


def _rows(store: Path, n: int = 512) -> torch.Tensor:
    s = ActivationStore(store)
    return s.read_rows(s.default_hook(None), 0, n).float()


def _reconstruct_reference(run: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂ and the active mask computed from the saved tensors by the formulas (Gao et al. 2024 TopK;
    ReLU; JumpReLU θ), independently of :class:`SAE`."""
    from safetensors.torch import load_file

    w = {k: v.double() for k, v in load_file(str(run / "sae_weights.safetensors")).items()}
    cfg = json.loads((run / "cfg.json").read_text())
    pre = (x.double() - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "topk":
        k = cfg["activation_fn_kwargs"]["k"]
        idx = pre.topk(k, dim=-1).indices
        f = torch.zeros_like(pre).scatter_(-1, idx, pre.gather(-1, idx)).relu()
    elif cfg["architecture"] == "jumprelu":
        f = pre * (pre > w["threshold"])
    else:
        f = pre.relu()
    return f @ w["W_dec"] + w["b_dec"], f > 0


@pytest.mark.parametrize(("source", "arch"), [("topk", "topk"), ("relu", "relu"), ("batchtopk", "jumprelu")])
def test_step_zero_reconstructs_as_the_source(store, sources, tmp_path, source, arch) -> None:
    """One step at lr 1e-12 moves no weight measurably, so the saved SAE is the initialisation: its
    reconstructions and active latents equal the source's (float32 rounding of the unit-decoder and
    normalisation rescalings only)."""
    out = train(TrainConfig(store=str(store), arch=arch, d_sae=48, k=3, batch_size=256, tokens=256, lr=1e-12,
                            lr_warmup_steps=0, device="cpu", init_from=str(sources[source]),
                            out=str(tmp_path / "ft")), quiet=True)
    x = _rows(store)
    want, want_active = _reconstruct_reference(sources[source], x)
    got, got_active = _reconstruct_reference(out, x)
    assert torch.equal(want_active, got_active)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))
    cfg = json.loads((out / "cfg.json").read_text())
    digest = hashlib.sha256((sources[source] / "sae_weights.safetensors").read_bytes()).hexdigest()
    assert cfg["init_from"]["path"] == str(sources[source].resolve())
    assert cfg["init_from"]["weights_sha256"] == digest
    assert cfg["run_settings"]["init_from_sha256"] == digest


def test_fine_tuning_with_a_penalty_moves_away_from_the_source(store, sources, tmp_path) -> None:
    out = train(TrainConfig(store=str(store), arch="topk", variant="ortsae", d_sae=48, k=3, batch_size=256,
                            tokens=256 * 8, device="cpu", init_from=str(sources["topk"]), out=str(tmp_path / "ft")),
                quiet=True)
    a, b = SAE.load(sources["topk"]), SAE.load(out)
    cos = (a.W_dec * b.W_dec).sum(1) / (a.W_dec.norm(dim=1) * b.W_dec.norm(dim=1))
    assert not torch.equal(a.W_dec, b.W_dec) and float(cos.mean()) > 0.9  # changed, but from the source


def test_refusals_are_one_line_and_create_nothing(store, sources, tmp_path) -> None:
    bad_hook = tmp_path / "bad_hook"
    shutil.copytree(sources["topk"], bad_hook)
    cfg = json.loads((bad_hook / "cfg.json").read_text())
    cfg["hook_name"], cfg["hook_layer"] = "blocks.3.hook_resid_post", 3
    (bad_hook / "cfg.json").write_text(json.dumps(cfg))
    bad_model = tmp_path / "bad_model"
    shutil.copytree(sources["topk"], bad_model)
    cfg = json.loads((bad_model / "cfg.json").read_text())
    cfg["model_fingerprint"] = "0" * 16
    (bad_model / "cfg.json").write_text(json.dumps(cfg))
    before = tree_hash(tmp_path)
    common = ["train", "--store", str(store), "--d-sae", "48", "--k", "3", "--batch-size", "256", "--tokens", "512",
              "--device", "cpu", "--out", str(tmp_path / "run")]
    cases = [
        (["--init-from", str(tmp_path / "nothing")], "no sae_weights.safetensors + cfg.json there"),
        (["--init-from", str(sources["topk"]), "--d-sae", "64"], "has d_sae 48 but this run asks for 64"),
        (["--init-from", str(sources["topk"]), "--arch", "relu"], "is a topk SAE, which --arch relu does not continue"),
        (["--init-from", str(sources["batchtopk"]), "--arch", "batchtopk"], "fine-tune it with --arch jumprelu"),
        (["--init-from", str(bad_hook)], "reads blocks.3.hook_resid_post but the store"),
        (["--init-from", str(bad_model)], "other weights"),
    ]
    for extra, why in cases:
        r = CliRunner().invoke(app, common + extra)
        lines = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 2 and len(lines) == 1 and why in lines[0], (extra, r.output)
    assert tree_hash(tmp_path) == before


def test_killed_fine_tune_resumes_bit_identical_and_refuses_another_source(store, sources, tmp_path,
                                                                            monkeypatch) -> None:
    kw = dict(store=str(store), arch="topk", d_sae=48, k=3, batch_size=256, tokens=256 * 12, device="cpu",
              checkpoint_every=2, init_from=str(sources["topk"]))
    ref = train(TrainConfig(**kw, out=str(tmp_path / "ref")), quiet=True)
    real = Trainer.step

    def step_fn(self, x, sync=True):
        out = real(self, x, sync)
        if self.step_idx == 5:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "step", step_fn)
    with pytest.raises(Interrupted):
        train(TrainConfig(**kw, out=str(tmp_path / "cut")), quiet=True)
    monkeypatch.undo()
    other = {**kw, "init_from": str(sources["relu"]), "arch": "relu"}
    with pytest.raises(RunDirError, match="cannot resume"):
        train(TrainConfig(**other, out=str(tmp_path / "cut"), resume=True), quiet=True)
    moved = tmp_path / "moved_source"
    shutil.copytree(sources["topk"], moved)  # the same weights elsewhere: resumes (compared by digest)
    done = train(TrainConfig(**{**kw, "init_from": str(moved)}, out=str(tmp_path / "cut"), resume=True), quiet=True)
    a, b = SAE.load(ref), SAE.load(done)
    for n in ("W_enc", "W_dec", "b_enc", "b_dec"):
        assert torch.equal(getattr(a, n), getattr(b, n)), n
