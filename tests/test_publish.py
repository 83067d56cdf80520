"""``sae push``: the SAELens download layout, read back by SAELens (from a folder, and by
``SAE.from_pretrained`` from a Hugging Face cache, offline), the model card, refusals, and the upload
call (recorded: the upload itself cannot run here)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sae.cli import app
from sae.interop import publish
from sae.rundir.results import write_result
from sae.rundir.sae import SAE
from sae.store import ActivationStore
from sae.train.config import TrainConfig
from sae.train.run import train
from tests.helpers import tree_hash

sae_lens = pytest.importorskip("sae_lens")


@pytest.fixture(scope="module")
def store(planted_store_factory):
    return planted_store_factory(8192, d_in=16, n_features=32, active=2, seed=7)


@pytest.fixture(scope="module")
def runs(store, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    out = []
    for arch, variant in (("topk", "none"), ("batchtopk", "ortsae")):
        out.append(train(TrainConfig(store=str(store), arch=arch, variant=variant, d_sae=48, k=3, batch_size=256,
                                     tokens=256 * 8, device="cpu", out=str(root / f"{arch}-{variant}")), quiet=True))
    write_result(out[0], "core", {"n": 1}, {"reconstruction_quality": {"explained_variance": 0.8125},
                                            "model_performance_preservation": {"ce_loss_score": 0.9375},
                                            "sparsity": {"l0": 3.0}})
    return out


def _x(store: Path) -> torch.Tensor:
    s = ActivationStore(store)
    return s.read_rows(s.default_hook(None), 0, 256).float()


def test_to_dir_layout_loads_in_saelens_with_the_same_codes(store, runs, tmp_path) -> None:
    r = CliRunner().invoke(app, ["push", *map(str, runs), "--to-dir", str(tmp_path / "pub"),
                                 "--sae-id", "layer_3/topk", "--sae-id", "layer_3/batchtopk_ortsae"])
    assert r.exit_code == 0, r.output
    pub = tmp_path / "pub"
    assert sorted(str(p.relative_to(pub)) for p in pub.rglob("*") if p.is_file()) == sorted([
        ".sae_publish", "README.md", "layer_3/topk/cfg.json", "layer_3/topk/sae_weights.safetensors",
        "layer_3/topk/eval_results/core.json", "layer_3/batchtopk_ortsae/cfg.json",
        "layer_3/batchtopk_ortsae/sae_weights.safetensors"])
    x = _x(store)
    for sae_id, run in (("layer_3/topk", runs[0]), ("layer_3/batchtopk_ortsae", runs[1])):
        theirs = sae_lens.SAE.load_from_disk(str(pub / sae_id), device="cpu")
        ours = SAE.load(run)
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-5, atol=1e-5)
    card = (pub / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: saelens\n") and "- ortsae" in card
    assert "| `layer_3/topk` | 0.8125 | 0.9375 | 3.0000 |" in card  # expl. var., CE loss score, L0 of core.json
    cfg = json.loads((runs[0] / "cfg.json").read_text())
    assert cfg["content_digest"] in card and "`blocks." in card


def test_from_pretrained_reads_the_layout_from_a_hub_cache_offline(store, runs, tmp_path, monkeypatch) -> None:
    """The folder as the Hub would serve it, placed in a Hugging Face cache (models--USER--NAME/snapshots/REV,
    refs/main): SAELens' own ``SAE.from_pretrained(repo_id, sae_id)`` loads it with the network off."""
    import huggingface_hub.constants as hc

    saes = publish.plan(runs, ["topk", "batchtopk_ortsae"])
    rev = "0" * 40
    repo = tmp_path / "hub" / "models--someone--ortho-saes"
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    publish.write_layout(saes, snap, "someone/ortho-saes")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    theirs = sae_lens.SAE.from_pretrained("someone/ortho-saes", "batchtopk_ortsae", device="cpu")
    x = _x(store)
    torch.testing.assert_close(theirs.encode(x), SAE.load(runs[1]).encode(x), rtol=1e-5, atol=1e-5)
    assert 'SAE.from_pretrained("someone/ortho-saes", "topk")' in (snap / "README.md").read_text()


def test_push_uploads_one_commit_of_the_layout(runs) -> None:
    seen: dict = {}

    class FakeApi:  # records what huggingface_hub would receive
        def create_repo(self, repo_id, private, exist_ok, repo_type):
            seen["create"] = (repo_id, private, exist_ok, repo_type)
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, folder_path, repo_id, revision, repo_type, commit_message):
            root = Path(folder_path)
            seen["files"] = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            seen["upload"] = (repo_id, revision, repo_type)

    url = publish.push(publish.plan(runs), "someone/ortho-saes", api=FakeApi())
    assert url == "https://huggingface.co/someone/ortho-saes"
    assert seen["create"] == ("someone/ortho-saes", False, True, "model")
    assert seen["upload"] == ("someone/ortho-saes", "main", "model")
    assert f"{runs[0].name}/sae_weights.safetensors" in seen["files"] and "README.md" in seen["files"]
    assert ".sae_publish" not in seen["files"]

    class Refusing(FakeApi):
        def create_repo(self, *a, **k):
            raise PermissionError("401 Unauthorized\nmore")

    with pytest.raises(publish.SaeError, match="to someone/x failed .PermissionError: 401 Unauthorized.; log in"):
        publish.push(publish.plan(runs), "someone/x", api=Refusing())


def test_refusals_leave_everything_as_it_was(runs, tmp_path) -> None:
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("a teammate's")
    before = tree_hash(tmp_path)
    runner = CliRunner()
    cases = [
        (["push", str(runs[0])], "exactly one of --repo-id"),
        (["push", str(runs[0]), "--to-dir", str(tmp_path / "theirs")], "already exists"),
        (["push", str(runs[0]), "--to-dir", str(tmp_path / "theirs"), "--overwrite"],
         "not a folder written by sae push"),
        (["push", str(runs[0]), str(runs[0]), "--to-dir", str(tmp_path / "x")], "two runs would be published as"),
        (["push", str(runs[0]), "--to-dir", str(tmp_path / "x"), "--sae-id", "../up"], "sae id '../up'"),
        (["push", str(tmp_path / "theirs"), "--to-dir", str(tmp_path / "x")], "no sae_weights.safetensors"),
        (["push", str(runs[0]), "--repo-id", "not a repo"], "give USER/NAME"),
    ]
    for args, why in cases:
        r = runner.invoke(app, args)
        errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
        assert r.exit_code == 2 and len(errors) == 1 and why in errors[0], (args, r.output)
    assert tree_hash(tmp_path) == before
    # ours is replaced atomically with --overwrite
    assert runner.invoke(app, ["push", str(runs[0]), "--to-dir", str(tmp_path / "pub")]).exit_code == 0
    r = runner.invoke(app, ["push", str(runs[1]), "--to-dir", str(tmp_path / "pub"), "--overwrite"])
    assert r.exit_code == 0, r.output
    assert [p.name for p in (tmp_path / "pub").iterdir() if p.is_dir()] == [runs[1].name]
