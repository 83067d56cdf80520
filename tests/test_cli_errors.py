"""Bad input never hurts data and never shows a traceback.

Every case of the battery runs the real CLI (typer's ``CliRunner``, in a workspace holding a
complete store, a finished run, a user's folder and assorted broken inputs) and asserts: exit code 2,
exactly one ``error:`` line, no traceback, and the whole workspace byte-identical afterwards
(nothing deleted, nothing created). Signals and the console entry point are exercised with real
subprocesses at the end.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from sae.cli import app
from sae.store import CodecSpec, StoreWriter
from sae.train.config import TrainConfig
from sae.train.run import train
from tests.helpers import planted_features, tree_hash, write_store

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> dict[str, str]:
    """The workspace: paths by name (used as ``{name}`` in the cases)."""
    root = tmp_path_factory.mktemp("ws")
    x, _ = planted_features(4096, d_in=16, n_features=32, seed=0)
    store = write_store(root / "acts.zarr", x, context_size=64, chunk_tokens=1024)
    run = root / "runs" / "done"
    train(TrainConfig(store=str(store), d_sae=32, k=4, batch_size=256, tokens=1024, out=str(run), device="cpu",
                      log_every=1), quiet=True)
    thesis = root / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("\\chapter{Years of work}\n")
    (root / "notes.txt").write_text("not a directory\n")
    foreign = zarr.open_group(str(root / "foreign.zarr"), mode="w")
    foreign.attrs["owner"] = "someone else"
    meta = {"model_id": "synthetic", "model_fingerprint": "0", "tokenizer": "", "dataset": "synthetic",
            "split": "train", "seed": 0, "special_token_ids": [2], "bos_token_id": 2}
    w = StoreWriter(root / "empty.zarr", meta, ["blocks.0.hook_resid_post"], 16, 64, 64,
                    CodecSpec.parse("zstd", "float32"), 1024)
    w.finalize()  # a complete store with zero tokens
    (root / "empty.txt").write_text("")
    (root / "tiny.txt").write_text("hi")
    bad = {"garbage_cfg": lambda d: (d / "cfg.json").write_text("{not json"),
           "truncated_weights": lambda d: (d / "sae_weights.safetensors").write_bytes(
               (d / "sae_weights.safetensors").read_bytes()[:100]),
           "nan_weights": lambda d: save_file({**load_file(str(d / "sae_weights.safetensors")),
                                               "W_dec": torch.full((32, 16), float("nan"))},
                                              str(d / "sae_weights.safetensors"))}
    for name, spoil in bad.items():
        d = root / "runs" / name
        d.mkdir(parents=True)
        for f in ("cfg.json", "sae_weights.safetensors"):
            (d / f).write_bytes((run / f).read_bytes())
        spoil(d)
    tomls = {"missing_table.toml": 'variant = "topk_pairs"\ntokens = 8192\n\n[topk_pars]\nrho = 0.1\n',
             "syntax.toml": "tokens = [\n", "unknown_key.toml": "tokens = 2048\nlearning_rate = 3\n",
             "bad_param.toml": 'variant = "topk_pairs"\n[topk_pairs]\nrho = "abc"\n'}
    for name, text in tomls.items():
        (root / name).write_text(text)
    paths = {p.name.split(".")[0] if p.suffix != ".toml" else p.stem: str(p) for p in root.iterdir()}
    paths.update(root=str(root), store=str(store), run=str(run), model=str(tiny_model_dir),
                 garbage_cfg=str(root / "runs" / "garbage_cfg"), truncated=str(root / "runs" / "truncated_weights"),
                 nan_run=str(root / "runs" / "nan_weights"), thesis=str(thesis), file=str(root / "notes.txt"),
                 foreign=str(root / "foreign.zarr"), empty_store=str(root / "empty.zarr"),
                 empty_txt=str(root / "empty.txt"), tiny_txt=str(root / "tiny.txt"))
    return paths


H = "harvest --model {model} --device cpu --layer 1 --tokens 2048 --context-size 64 --chunk-tokens 1024"
T = "train --store {store} --device cpu --d-sae 32 --k 4 --batch-size 256 --tokens 1024"
CASES = {
    # --overwrite never destroys what is not ours, and never before validation
    "harvest_overwrite_foreign_dir": (H + " --out {thesis} --overwrite", "is not an sae store"),
    "harvest_overwrite_then_bad_batch": (H + " --out {store} --overwrite --batch-size 0", "--batch-size"),
    "harvest_resume_and_overwrite": (H + " --out {root}/new.zarr --resume --overwrite", "exclusive"),
    "harvest_exists": (H + " --out {store}", "already exists"),
    "harvest_resume_foreign": (H + " --out {thesis} --resume", "is not an sae store"),
    # sizes and ranges
    "harvest_tokens_0": (H + " --out {root}/new.zarr --tokens 0", "--tokens"),
    "harvest_tokens_negative": (H + " --out {root}/new.zarr --tokens -5", "--tokens"),
    "harvest_context_0": (H + " --out {root}/new.zarr --context-size 0", "--context-size"),
    "harvest_chunk_0": (H + " --out {root}/new.zarr --chunk-tokens 0", "--chunk-tokens"),
    "harvest_chunk_not_multiple": (H + " --out {root}/new.zarr --chunk-tokens 1000", "multiple"),
    "harvest_batch_0": (H + " --out {root}/new.zarr --batch-size 0", "--batch-size"),
    "harvest_codec": (H + " --out {root}/new.zarr --codec lz4", "codec"),
    "harvest_dtype": (H + " --out {root}/new.zarr --dtype float8", "dtype"),
    "harvest_split": (H + " --out {root}/new.zarr --split dev", "--split"),
    "harvest_layer_missing": (H + " --out {root}/new.zarr --layer 99", "layer 99 does not exist"),
    "harvest_cuda": (H + " --out {root}/new.zarr --device cuda", "CUDA is not available"),
    # unusable paths and inputs
    "harvest_out_file": (H + " --out {file}", "is a file"),
    "harvest_out_under_file": (H + " --out {file}/acts.zarr", "is a file"),
    "harvest_out_unwritable": (H + " --out /proc/sae-test.zarr", "not writable"),
    "harvest_dataset_missing": (H + " --out {root}/new.zarr --dataset {root}/nope.txt", "unknown dataset"),
    "harvest_dataset_empty": (H + " --out {root}/new.zarr --dataset {empty_txt}", "no documents"),
    "harvest_dataset_too_small": (H + " --out {root}/new.zarr --dataset {tiny_txt}", "too small"),
    "harvest_model_missing": (H.replace("{model}", "{root}/no-model") + " --out {root}/new.zarr", "cannot load model"),
    # store commands
    "store_info_foreign": ("store info {foreign}", "not an sae activation store"),
    "store_info_missing": ("store info {root}/nope.zarr", "no store at"),
    "store_info_file": ("store info {file}", "is a file"),
    "store_convert_onto_source": ("store convert {store} {store} --overwrite", "is the source"),
    "store_convert_codec": ("store convert {store} {root}/c.zarr --codec lz4", "codec"),
    "store_convert_overwrite_foreign": ("store convert {store} {thesis} --overwrite", "is not an sae store"),
    # train: options
    "train_batch_0": (T + " --out {root}/r --batch-size 0", "--batch-size"),
    "train_log_every_0": (T + " --out {root}/r --log-every 0", "--log-every"),
    "train_checkpoint_every_0": (T + " --out {root}/r --checkpoint-every 0", "--checkpoint-every"),
    "train_checkpoint_minutes_0": (T + " --out {root}/r --checkpoint-minutes 0", "--checkpoint-minutes"),
    "train_d_sae_0": (T + " --out {root}/r --d-sae 0", "--d-sae"),
    "train_k_0": (T + " --out {root}/r --k 0", "--k"),
    "train_k_above_d_sae": (T + " --out {root}/r --k 64", "--k 64"),
    "train_tokens_0": (T + " --out {root}/r --tokens 0", "--tokens"),
    "train_tokens_negative": (T + " --out {root}/r --tokens -5", "--tokens"),
    "train_tokens_below_batch": (T + " --out {root}/r --tokens 100", "less than one batch"),
    "train_lr_negative": (T + " --out {root}/r --lr -1", "--lr"),
    "train_expansion_0": (T.replace(" --d-sae 32", "") + " --out {root}/r --expansion 0", "--expansion"),
    "train_lambda_negative": (T + " --out {root}/r --variant topk_pairs -p lambda_=-5", "lambda_"),
    "train_param_not_number": (T + " --out {root}/r --variant topk_pairs -p rho=abc", "rho"),
    "train_chunk_size_0": (T + " --out {root}/r --variant ortsae -p chunk_size=0", "chunk_size"),
    "train_param_unknown": (T + " --out {root}/r --variant ortsae -p nosuch=1", "nosuch"),
    "train_param_malformed": (T + " --out {root}/r -p rho", "NAME=VALUE"),
    "train_variant_unknown": (T + " --out {root}/r --variant orthogonal", "unknown variant"),
    "train_arch_unknown": (T + " --out {root}/r --arch gated", "--arch"),
    "train_cuda": (T + " --out {root}/r --device cuda", "CUDA is not available"),
    # train: paths
    "train_out_file": (T + " --out {file}", "is a file"),
    "train_overwrite_foreign": (T + " --out {thesis} --overwrite", "is not an sae run"),
    "train_resume_foreign": (T + " --out {thesis} --resume", "is not an sae run"),
    "train_resume_and_overwrite": (T + " --out {run} --resume --overwrite", "exclusive"),
    "train_exists": (T + " --out {run}", "already exists"),
    "train_store_missing": (T.replace("{store}", "{root}/nope.zarr") + " --out {root}/r", "no store at"),
    "train_store_foreign": (T.replace("{store}", "{foreign}") + " --out {root}/r", "not an sae activation store"),
    "train_store_empty": (T.replace("{store}", "{empty_store}") + " --out {root}/r", "holds no tokens"),
    "train_hook_missing": (T + " --out {root}/r --hook blocks.9.hook_resid_post", "is not in"),
    # train: honest resume of a finished run
    "train_resume_other_lr": (T + " --out {run} --resume --lr 0.01", "lr was"),
    "train_resume_other_variant": (T + " --out {run} --resume --variant ortsae", "variant was"),
    "train_resume_other_seed": (T + " --out {run} --resume --seed 3", "seed was"),
    # train: --config
    "config_missing": (T + " --out {root}/r --config {root}/nope.toml", "cannot read"),
    "config_syntax": (T + " --out {root}/r --config {syntax}", "syntax.toml: TOML syntax error"),
    "config_unknown_table": (T + " --out {root}/r --config {missing_table}", "line 4: unknown table [topk_pars]"),
    "config_unknown_key": (T + " --out {root}/r --config {unknown_key}", "line 2: unknown training option"),
    "config_bad_param": (T + " --out {root}/r --config {bad_param}", "line 3: [topk_pairs]"),
    # evaluate: SAE files are validated before any model loads
    "evaluate_garbage_cfg": ("evaluate {garbage_cfg} --device cpu", "not valid JSON (line 1"),
    "evaluate_truncated_weights": ("evaluate {truncated} --device cpu", "not a readable safetensors"),
    "evaluate_nan_weights": ("evaluate {nan_run} --device cpu", "NaN or inf"),
    "evaluate_missing_run": ("evaluate {root}/runs/nope --device cpu", "has no sae_weights"),
    "evaluate_unknown_eval": ("evaluate {run} --eval coree --device cpu", "coree"),
    "evaluate_tokens_0": ("evaluate {run} --tokens 0 --device cpu", "--tokens"),
    "evaluate_cuda": ("evaluate {run} --device cuda", "CUDA is not available"),
    # sweep and report
    "sweep_variant_unknown": ("sweep --store {store} --variants topk,orthogonal --out {root}/sw --device cpu",
                              "unknown variant"),
    "sweep_grid_malformed": ("sweep --store {store} --variants topk --grid lr --out {root}/sw", "--grid"),
    "sweep_workers_negative": ("sweep --store {store} --variants topk --workers -1 --out {root}/sw", "--workers"),
    "sweep_batch_0": ("sweep --store {store} --variants topk --batch-size 0 --out {root}/sw", "--batch-size"),
    "report_out_file": ("report {run} --out {file}", "is a file"),
    "report_out_user_folder": ("report {run} --out {thesis} --latents 0", "is not a report written by `sae report`"),
    "report_garbage_cfg": ("report {garbage_cfg} --out {root}/rep --latents 0",
                           "garbage_cfg/cfg.json is not valid JSON"),
    "report_no_runs": ("report {thesis} --out {root}/rep --latents 0", "holds none"),
}


def _one_error_line(output: str) -> str:
    errors = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, output
    assert "Traceback" not in output, output
    return errors[0]


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_error_line_and_touches_nothing(case: str, ws: dict[str, str], monkeypatch) -> None:
    args, expect = CASES[case]
    monkeypatch.chdir(ws["root"])
    before = tree_hash(Path(ws["root"]))
    result = CliRunner().invoke(app, args.format(**ws).split())
    assert result.exit_code == 2, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit | None), result.exception
    line = _one_error_line(result.output)
    assert expect in line, line
    assert tree_hash(Path(ws["root"])) == before, "the workspace changed"


def test_battery_is_large_enough() -> None:
    assert len(CASES) >= 40


def test_unexpected_errors_are_one_line_unless_sae_debug(ws: dict[str, str], monkeypatch) -> None:
    import sae.train.run as run_mod

    def boom(*a, **k):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(run_mod, "train", boom)
    args = (T + " --out {root}/r").format(**ws).split()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    line = _one_error_line(result.output)
    assert "unexpected ZeroDivisionError: boom" in line and "SAE_DEBUG=1" in line
    monkeypatch.setenv("SAE_DEBUG", "1")
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ZeroDivisionError)


def test_unreachable_scheduler_fails_fast(ws: dict[str, str], monkeypatch) -> None:
    monkeypatch.chdir(ws["root"])
    t0 = time.perf_counter()
    result = CliRunner().invoke(app, ("sweep --store {store} --variants topk --tokens 1024 --batch-size 256 "
                                      "--device cpu --out {root}/sw --scheduler tcp://127.0.0.1:9").format(**ws).split())
    assert time.perf_counter() - t0 < 20
    assert result.exit_code == 2
    assert "no dask scheduler answers" in _one_error_line(result.output)
    assert not (Path(ws["root"]) / "sw").exists()


def test_read_only_run_is_evaluated_into_results_dir(ws: dict[str, str], tmp_path: Path) -> None:
    """A teammate's run we cannot write to: refused up front without --results-dir, fine with it."""
    import sae.evaluate as ev

    run = Path(ws["run"])
    with pytest.raises(ValueError, match="pass --results-dir"):
        ev.evaluate_runs([run], evals=["geometry"], device="cpu", quiet=True, results_dir="/proc/sae-results")
    out = ev.evaluate_runs([run], evals=["geometry"], device="cpu", quiet=True, results_dir=tmp_path / "res")
    assert out and (tmp_path / "res" / run.name / "eval_results" / "geometry.json").exists()
    assert not (run / "eval_results").exists()


def _sae(*args: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sae", *args], capture_output=True, text=True, timeout=120,
                          cwd=REPO, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, **kw)


def test_console_entry_point_usage_errors_are_one_line(ws: dict[str, str]) -> None:
    for args in (["train", "--store", ws["store"], "--batch-size", "abc"], ["train", "--no-such-flag"],
                 ["train", "--store", ws["store"], "--batch-size", "0", "--out", ws["root"] + "/r"]):
        r = _sae(*args)
        assert r.returncode == 2, r.stderr
        assert "Traceback" not in r.stderr + r.stdout
        assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1, r.stderr
    assert not (Path(ws["root"]) / "r").exists()


def test_sigterm_before_first_checkpoint_resumes_bit_identical(tmp_path: Path) -> None:
    x, _ = planted_features(8192, d_in=64, n_features=256, seed=1)
    store = write_store(tmp_path / "s.zarr", x, chunk_tokens=2048)
    common = ["train", "--store", str(store), "--device", "cpu", "--d-sae", "2048", "--k", "16", "--batch-size",
              "1024", "--tokens", str(1024 * 300), "--log-every", "5", "--checkpoint-every", "100000", "--quiet"]
    ref = tmp_path / "ref"  # a process like the cut one: an in-process reference would inherit this process's
    assert _sae(*common, "--out", str(ref)).returncode == 0  # thread settings (changed by earlier tests)
    run = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "sae", *common, "--out", str(run)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.time() + 60
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.01)
    proc.send_signal(15)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "SIGTERM received: checkpoint saved at step" in err and "Traceback" not in err
    assert (run / "checkpoint.pt").exists() and not (run / "sae_weights.safetensors").exists()
    done = torch.load(run / "checkpoint.pt", weights_only=False)["trainer"]["step"]
    assert 0 < done < 300
    r = _sae(*common, "--out", str(run), "--resume")
    assert r.returncode == 0, r.stderr
    a, b = load_file(str(ref / "sae_weights.safetensors")), load_file(str(run / "sae_weights.safetensors"))
    for n in a:
        assert torch.equal(a[n], b[n]), n
    ref_lines = (ref / "metrics.jsonl").read_text().splitlines()
    cut_lines = (run / "metrics.jsonl").read_text().splitlines()
    strip = [{k: v for k, v in json.loads(ln).items() if k != "elapsed_s"} for ln in ref_lines]
    assert strip == [{k: v for k, v in json.loads(ln).items() if k != "elapsed_s"} for ln in cut_lines]
    assert np.isfinite([json.loads(ln)["loss"] for ln in cut_lines]).all()
