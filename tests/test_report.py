"""Feature browser on a synthetic store with known firing rows, and the HTML report end to end on tiny
trained runs (fake tokenizer: ``decode`` is passed in)."""

from __future__ import annotations

import csv
import json
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from sae.errors import SaeError
from sae.evaluate.geometry import compute_geometry
from sae.latents import sample_ranges, scan_store, select_latents
from sae.report import build_report, flatten_metrics, resolve_run_dirs
from sae.report.browser import browse
from sae.rundir.results import write_result
from sae.rundir.sae import SAE
from sae.store import ActivationStore
from sae.train.config import TrainConfig
from sae.train.run import train
from tests.helpers import BOS, planted_features, tree_hash, write_store

CS = 64


pytestmark = pytest.mark.usefixtures("one_thread")


def fake_decode(ids: Sequence[int]) -> str:
    """A 'tokenizer' whose pieces need HTML escaping: id 42 → ``<t42&>``."""
    return "".join(f"<t{i}&>" for i in ids)


# -- browser --------------------------------------------------------------------------------------
FIRES = {70: 5.0, 130: 4.0, 300: 3.0, 383: 2.0, 200: 1.5, 201: 0.5}  # row → activation of latent 0


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """512 rows of width 8, 8 sequences of 64; dimension 0 is −1 except on the rows of FIRES.
    BOS rows (every 64th) get activation 1000 from write_store and must never be picked."""
    x = -torch.ones(512, 8)
    for r, v in FIRES.items():
        x[r, 0] = v
    return write_store(tmp_path_factory.mktemp("browse") / "s.zarr", x, context_size=CS, chunk_tokens=128)


def probe_sae() -> SAE:
    """ReLU SAE whose latent j reads input dimension j: f_0(x) = relu(x_0)."""
    sae = SAE(8, 4, "relu")
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(8)[:, :4])
        sae.W_dec.copy_(torch.eye(8)[:4])
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    sae.cfg = {"hook_name": "blocks.0.hook_resid_post"}
    return sae


def test_sample_ranges_spread_over_chunks(planted_store: Path) -> None:
    st = ActivationStore(planted_store)
    assert sample_ranges(st, 10**6) == [(0, 128), (128, 256), (256, 384), (384, 512)]
    r = sample_ranges(st, 200)
    assert sum(b - a for a, b in r) == 200 and all(a % 128 == 0 for a, _ in r) and r[0][0] == 0 and r[-1][0] == 384


def test_scan_finds_top_rows_and_excludes_bos(planted_store: Path) -> None:
    scan = scan_store(probe_sae(), planted_store, n_tokens=10**6, top_n=8)
    assert scan.n_rows == 512 - 8
    order = sorted(FIRES, key=lambda r: -FIRES[r])
    assert scan.top_rows[0, :6].tolist() == order and scan.top_rows[0, 6:].tolist() == [-1, -1]
    assert scan.top_vals[0, :6].tolist() == pytest.approx([FIRES[r] for r in order])
    assert scan.density[0].item() == pytest.approx(6 / 504)
    assert scan.density[1:].tolist() == [0.0, 0.0, 0.0]     # BOS rows would fire every latent


def test_browse_contexts_windows_and_escaped_html(planted_store: Path) -> None:
    st = ActivationStore(planted_store)
    res = browse(probe_sae(), st, latents=[0], top_n=4, window=3, n_tokens=10**6, decode=fake_decode)
    (lc,) = res.latents
    assert [c.row for c in lc.contexts] == [70, 130, 300, 383]
    assert [c.activation for c in lc.contexts] == pytest.approx([5.0, 4.0, 3.0, 2.0])
    tokens = st.tokens
    for c in lc.contexts:
        seq, pos = divmod(c.row, CS)
        a, b = max(seq * CS, c.row - 3), min((seq + 1) * CS, c.row + 4)
        assert (c.seq, c.pos) == (seq, pos) and c.token_ids == tokens[a:b].tolist()
        assert c.token == fake_decode([int(tokens[c.row])]) and c.center == c.row - a
        assert c.acts[c.center] == pytest.approx(c.activation)
        assert sum(c.acts) == pytest.approx(c.activation)          # no other window row fires
    ctx130 = lc.contexts[1]                                        # window clipped at its sequence's BOS
    assert ctx130.token_ids[0] == BOS and ctx130.center == 2
    assert lc.contexts[3].center == len(lc.contexts[3].token_ids) - 1   # last position of sequence 5
    hit = f"&lt;t{int(tokens[70])}&amp;&gt;"
    assert re.search(r'<mark class="hit"[^>]*>' + re.escape(hit) + "</mark>", res.html)
    assert "<t" not in res.html.replace("<td", "").replace("<title", "")
    assert "Latent 0" in res.html


def test_browse_distinct_skips_rows_inside_shown_windows(planted_store: Path) -> None:
    kw = {"latents": [0], "top_n": 8, "window": 3, "n_tokens": 10**6, "decode": fake_decode}
    rows = [c.row for c in browse(probe_sae(), planted_store, **kw).latents[0].contexts]
    assert rows == [70, 130, 300, 383, 200]                       # 201 is inside 200's window
    rows = [c.row for c in browse(probe_sae(), planted_store, distinct=False, **kw).latents[0].contexts]
    assert rows == [70, 130, 300, 383, 200, 201]


def test_browse_default_selection_skips_dead_latents(planted_store: Path) -> None:
    res = browse(probe_sae(), planted_store, n_latents=3, top_n=2, window=1, n_tokens=10**6, decode=fake_decode)
    assert [lc.latent for lc in res.latents] == [0]                # the only alive latent
    assert [c.row for c in res.latents[0].contexts] == [70, 130]


def test_select_latents_mixes_density_and_cosine() -> None:
    density = torch.tensor([0.0, 0.5, 0.4, 0.01, 0.011, 0.0001, 0.00011, 0.3])
    max_cos = torch.tensor([0.99, 0.1, 0.1, 0.1, 0.1, 0.9, 0.2, 0.95])
    picks = select_latents(density, max_cos, n=6)
    assert picks[:2] == [(1, "high density"), (2, "high density")]
    assert {i for i, r in picks if r == "mid density"} <= {3, 4, 5, 6, 7} and len(picks) == 6
    assert (7, "max cos") in picks or (7, "high density") in picks
    assert 0 not in [i for i, _ in picks]                          # dead


# -- report ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A planted-feature store and two tiny trained runs (topk, relu), a few seconds each."""
    root = tmp_path_factory.mktemp("report")
    x, _ = planted_features(2048, d_in=16, n_features=32, active=2)
    store = write_store(root / "s.zarr", x, context_size=CS, chunk_tokens=512)
    runs = []
    for variant in ("topk", "relu"):
        cfg = TrainConfig(store=str(store), variant=variant, d_sae=32, k=4, tokens=2048, batch_size=128,
                          lr_warmup_steps=2, log_every=2, device="cpu", out=str(root / "runs" / variant))
        runs.append(train(cfg, quiet=True))
    return store, runs


def _evaluate_fake(run: Path, sae: SAE, with_core: bool) -> None:
    """Real geometry result; hand-made core / probing / absorption results (shapes of those evals)."""
    geo = compute_geometry(sae, run_dir=run)
    write_result(run, "geometry", geo.eval_config, geo.metrics, geo.details, sae.cfg, geo.unstructured)
    if not with_core:
        return
    dens = [0.0, *[10.0 ** (-(i % 5) - 1) for i in range(sae.d_sae - 1)]]
    write_result(run, "core", {}, {"reconstruction_quality": {"explained_variance": 0.8, "mse": 0.1},
                                   "sparsity": {"l0": 4.0, "l1": 7.0},
                                   "model_performance_preservation": {"ce_loss_score": 0.9}},
                 [{"index": i, "feature_density": d} for i, d in enumerate(dens)], sae.cfg, {"run_dir": str(run)})
    write_result(run, "sparse_probing", {}, {
        "llm": {f"llm_top_{k}_test_accuracy": 0.6 + 0.05 * j for j, k in enumerate((1, 2, 5))},
        "sae": {f"sae_top_{k}_test_accuracy": 0.55 + 0.06 * j for j, k in enumerate((1, 2, 5))}}, [], sae.cfg)
    write_result(run, "absorption", {}, {"mean": {"mean_absorption_fraction_score": 0.12,
                                                  "mean_num_split_features": 1.3}}, [], sae.cfg)


def test_report_end_to_end(tiny_runs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    store, runs = tiny_runs
    for i, run in enumerate(runs):
        _evaluate_fake(run, SAE.load(run), with_core=i == 0)
    out = tmp_path / "report"
    path = build_report(runs, out, store=store, n_browse_latents=4, decode=fake_decode, browse_tokens=1024)
    assert path == out / "index.html" and path.exists()
    page = path.read_text()
    imgs = re.findall(r'<img src="([^"]+)"', page)
    assert {"frontier.png", "absorption.png", "probing.png", "density.png", "max_cos.png", "training.png"} <= set(imgs)
    for name in imgs:
        assert (out / name).stat().st_size > 1000 and "/" not in name       # relative files next to the page
    assert page.count("<table") >= 5
    assert "mean_absorption_fraction_score" in page and "sae_top_5_test_accuracy" in page
    assert "not evaluated for: relu" in page                                 # core/probing/absorption of run 2
    assert page.count('class="browser"') == 2 and page.count('<mark class="hit"') >= 2
    assert "&lt;t" in page and "<t1" not in page
    assert "learned_groups" in page and "clustered" in page
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert [r["run"] for r in rows] == ["topk", "relu"]
    assert float(rows[0]["core.sparsity.l0"]) == 4.0 and rows[1]["core.sparsity.l0"] == ""
    assert rows[1]["geometry.decoder.mean_max_cos"] != ""


def test_report_without_evaluations_or_store(tiny_runs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, runs = tiny_runs
    run = tmp_path / "sweep" / "bare"
    shutil.copytree(runs[1], run, ignore=shutil.ignore_patterns("eval_results"))
    cfg = json.loads((run / "cfg.json").read_text())
    cfg["store_path"] = str(tmp_path / "gone.zarr")
    (run / "cfg.json").write_text(json.dumps(cfg))
    assert resolve_run_dirs([tmp_path / "sweep"]) == [run]
    page = build_report([tmp_path / "sweep"], tmp_path / "out", decode=fake_decode).read_text()
    assert "L0 / explained-variance frontier: not evaluated" in page
    assert "feature density: not evaluated" in page and "no activation store" in page
    imgs = re.findall(r'<img src="([^"]+)"', page)
    assert set(imgs) == {"max_cos.png", "training.png"}                     # both need only the run dir
    with pytest.raises(SaeError, match="no cfg.json"):
        build_report([tmp_path / "out"], tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_report_out_replaces_only_a_report_of_ours(tiny_runs: tuple[Path, list[Path]], tmp_path: Path) -> None:
    _, runs = tiny_runs
    mine = tmp_path / "site"
    mine.mkdir()
    (mine / "index.html").write_text("<h1>my home page</h1>")
    before = tree_hash(mine)
    with pytest.raises(SaeError, match="is not a report written by `sae report`; refusing"):
        build_report(runs, mine, n_browse_latents=0)
    assert tree_hash(mine) == before and sorted(p.name for p in tmp_path.iterdir()) == ["site"]
    out = tmp_path / "report"
    build_report(runs[:1], out, n_browse_latents=0)
    (out / "extra.txt").write_text("left by an older report")
    assert "1 run(s)" in (out / "index.html").read_text()
    build_report(runs, out, n_browse_latents=0)                            # ours: rebuilt beside, swapped in
    assert "2 run(s)" in (out / "index.html").read_text() and not (out / "extra.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "site"]  # no staging sibling left


def test_report_validates_every_run_before_writing(tiny_runs: tuple[Path, list[Path]], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    _, runs = tiny_runs
    bad = tmp_path / "bad"
    shutil.copytree(runs[1], bad)
    (bad / "cfg.json").write_text("{garbage")
    with pytest.raises(SaeError, match=re.escape(str(bad / "cfg.json")) + " is not valid JSON"):
        build_report([runs[0], bad], tmp_path / "new", n_browse_latents=0)
    assert not (tmp_path / "new").exists()                                 # nothing written
    out = tmp_path / "old"
    build_report(runs, out, n_browse_latents=0)
    before = tree_hash(out)
    (bad / "cfg.json").write_text("[1, 2]")
    with pytest.raises(SaeError, match="holds a list, not a JSON object"):
        build_report([bad], out, n_browse_latents=0)
    assert tree_hash(out) == before
    import sae.report.page as page

    def broken(*a: object, **k: object) -> None:
        raise RuntimeError("disk full")

    monkeypatch.setattr(page, "plot_training", broken)                    # a failure half-way through
    with pytest.raises(RuntimeError, match="disk full"):
        build_report(runs, out, n_browse_latents=0)
    assert tree_hash(out) == before                                        # the old report untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad", "old"]
    with pytest.raises(RuntimeError):
        build_report(runs, tmp_path / "fresh", n_browse_latents=0)
    assert not (tmp_path / "fresh").exists()                               # no partial report left


def test_flatten_metrics_keeps_scalars_only() -> None:
    r = {"eval_result_metrics": {"a": {"x": 1, "y": None, "z": [1, 2], "s": "txt"}, "b": {"x": 0.5}}}
    assert flatten_metrics(r) == {"a.x": 1, "a.y": None, "a.s": "txt", "b.x": 0.5}
