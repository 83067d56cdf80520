"""Refusals have no side effects: every refusal path of ``harvest`` (growth, leases, read-only targets),
``store`` (convert, import, ls) and ``import`` is one ``error:`` line, exit 2, and leaves every byte of
the workspace as it was (a tree hash before and after)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sae.cli import app
from sae.harvest.harvest import HarvestConfig, harvest
from sae.train.config import TrainConfig
from sae.train.run import train
from tests.helpers import REPO, tree_hash


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, tiny_lm) -> dict[str, str]:
    """A harvested store, a copy of it leased by a live writer on another host, an HF-datasets export and a
    truncated copy of it, a trained run, and a folder of someone else's files."""
    from sae.interop.hf_datasets import export_store

    root = tmp_path_factory.mktemp("refusals")
    store = Path(harvest(HarvestConfig(layers=[1], model=str(tiny_model_dir), tokens=1536, context_size=64,
                                       batch_size=8, dtype="bfloat16", chunk_tokens=512, device="cpu",
                                       out=str(root / "acts.zarr")), loaded=tiny_lm, quiet=True))
    shutil.copytree(store, root / "leased.zarr")
    cache = Path(export_store(str(store), root / "cache", quiet=True))
    shutil.copytree(cache, root / "cut_cache")
    arrow = max((root / "cut_cache").rglob("*.arrow"), key=lambda p: p.stat().st_size)
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    run = root / "run"
    train(TrainConfig(store=str(store), d_sae=64, k=4, batch_size=256, tokens=512, out=str(run), device="cpu",
                      log_every=1), quiet=True)
    thesis = root / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\chapter{Years of work}\n")
    (root / "notes.txt").write_text("not a directory\n")
    return dict(root=str(root), store=str(store), leased=str(root / "leased.zarr"), cache=str(cache),
                cut_cache=str(root / "cut_cache"), run=str(run), thesis=str(thesis), file=str(root / "notes.txt"),
                model=str(tiny_model_dir))


H = "harvest --model {model} --device cpu --layer 1 --batch-size 8"
CASES = {
    # growth: a given option that differs from the store's, checked before anything loads
    "extend_other_context": (H + " --out {store} --extend --tokens 3072 --context-size 32", "context"),
    "extend_other_seed": (H + " --out {store} --extend --tokens 3072 --seed 3", "seed"),
    "extend_other_dataset": (H + " --out {store} --extend --tokens 3072 --dataset embedded:prose", "dataset"),
    "extend_fewer_tokens": (H + " --out {store} --extend --tokens 1024", "tokens"),
    "into_other_dtype": (H.replace("--layer 1", "--layer 2") + " --out {root}/x --into {store} --dtype float32",
                         "dtype"),
    "into_other_tokens": (H.replace("--layer 1", "--layer 2") + " --out {root}/x --into {store} --tokens 999",
                          "tokens"),
    "into_present_layer": (H + " --out {root}/x --into {store}", "already"),
    "into_foreign": (H.replace("--layer 1", "--layer 2") + " --out {root}/x --into {thesis}",
                     "is not a Zarr activation store"),
    "resume_complete_other_context": (H + " --out {store} --resume --context-size 128", "context"),
    # leases: a live writer on another host
    "overwrite_leased": (H + " --out {leased} --overwrite --tokens 1536 --context-size 64", "being written by"),
    "extend_leased": (H + " --out {leased} --extend --tokens 3072", "being written by"),
    "into_leased": (H.replace("--layer 1", "--layer 2") + " --out {root}/x --into {leased}", "being written by"),
    "resume_leased": (H + " --out {leased} --resume", "being written by"),
    "convert_onto_leased": ("store convert {store} {leased} --overwrite", "being written by"),
    "import_onto_leased": ("store import {cache} --out {leased} --overwrite", "being written by"),
    # read-only and unusable targets
    "into_http": (H.replace("--layer 1", "--layer 2") + " --out {root}/x --into http://127.0.0.1:9/s.zarr",
                  "read-only"),
    "harvest_http": (H + " --out http://127.0.0.1:9/s.zarr --tokens 1024", "read-only"),
    "convert_to_http": ("store convert {store} http://127.0.0.1:9/c.zarr", "read-only"),
    "import_to_http": ("store import {cache} --out http://127.0.0.1:9/c.zarr", "read-only"),
    # store import / convert / ls
    "import_truncated": ("store import {cut_cache} --out {root}/i.zarr", "truncated or corrupt"),
    "import_not_a_cache": ("store import {thesis} --out {root}/i.zarr", "{thesis}"),
    "import_onto_foreign": ("store import {cache} --out {thesis} --overwrite", "is not an sae store"),
    "import_exists": ("store import {cache} --out {store}", "already exists"),
    "import_bad_codec": ("store import {cache} --out {root}/i.zarr --codec lz4", "codec"),
    "convert_exists": ("store convert {store} {leased}", "already exists"),
    "ls_missing": ("store ls {root}/nowhere", "no such folder"),
    "ls_file": ("store ls {file}", "is a file"),
    # sae import
    "sae_import_negative_scale": ("import {run} --from saelens --out {root}/imp --activation-scale -2",
                                  "--activation-scale"),
    "sae_import_unknown_format": ("import {run} --from gemmascope --out {root}/imp", "gemmascope"),
    "sae_import_onto_foreign": ("import {run} --from saelens --out {thesis} --overwrite",
                                "is not a run directory of ours"),
    "sae_import_missing": ("import {root}/nope --from saelens --out {root}/imp", "{root}/nope"),
}


def _refresh_lease(ws: dict[str, str]) -> None:
    Path(ws["leased"], "lease.json").write_text(json.dumps({
        "owner": "ada", "host": f"not-{socket.gethostname()}", "pid": 4242, "purpose": "harvest",
        "lease_id": "x", "created": time.time(), "heartbeat": time.time()}))


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_refusal_is_one_line_and_changes_nothing(case: str, ws: dict[str, str], monkeypatch) -> None:
    args, expect = CASES[case]
    monkeypatch.chdir(ws["root"])
    _refresh_lease(ws)
    before = tree_hash(Path(ws["root"]))
    result = CliRunner().invoke(app, args.format(**ws).split())
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert result.exit_code == 2 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert expect.format(**ws) in errors[0], errors[0]
    assert tree_hash(Path(ws["root"])) == before, "a refusal changed the workspace"


def test_the_battery_covers_harvest_store_and_import() -> None:
    assert len(CASES) >= 30
    assert {a.split()[0] for a, _ in CASES.values()} == {"harvest", "store", "import"}


def _read_only_mount_runner() -> str | None:
    """A shell prefix that runs a command with ``$RO`` bind-mounted read-only (a user+mount namespace),
    or None where this machine cannot make one."""
    if not shutil.which("unshare"):
        return None
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount --bind /tmp /tmp && mount -o remount,bind,ro /tmp "
                            "&& ! touch /tmp/.sae-ro-probe 2>/dev/null"], capture_output=True)
    return "ok" if probe.returncode == 0 else None


@pytest.mark.parametrize("mode", ["extend", "into", "resume"])
def test_growing_a_store_on_a_read_only_mount_is_refused_up_front(ws: dict[str, str], tmp_path: Path, mode: str
                                                                   ) -> None:
    if _read_only_mount_runner() is None:
        pytest.skip("this machine cannot make a read-only bind mount (unshare -rm)")
    ro = tmp_path / "ro.zarr"
    shutil.copytree(ws["store"], ro)
    before = tree_hash(ro)
    args = {"extend": f"harvest --out {ro} --extend --tokens 3072 --layer 1 --device cpu",
            "into": f"harvest --out {tmp_path}/x --into {ro} --layer 2 --device cpu",
            "resume": f"harvest --out {ro} --resume --layer 1 --device cpu"}[mode]
    script = (f"mount --bind {ro} {ro} && mount -o remount,bind,ro {ro} && exec {sys.executable} -c "
              f"'from sae.cli import app; app()' {args}")
    t0 = time.perf_counter()
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=120,
                       cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", "TERM": "dumb"})
    out = r.stdout + r.stderr
    errors = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "Traceback" not in out, out
    assert str(ro) in errors[0] and ("is read-only here" in errors[0] or "is not writable" in errors[0]), errors[0]
    assert time.perf_counter() - t0 < 30  # before any model loads
    assert tree_hash(ro) == before
