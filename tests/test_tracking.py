"""Experiment trackers: what TensorBoard, a real MLflow server (127.0.0.1) and W&B (offline) receive,
read back through each library's own reader; a failing tracker; a missing library."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sae.cli import app
from sae.errors import ConfigError
from sae.tracking import TensorBoardTracker, TrackingConfig
from sae.train.config import TrainConfig
from sae.train.run import train
from sae.train.sweep import expand, run_sweep


@pytest.fixture(scope="module")
def store(planted_store_factory):
    return planted_store_factory(4096, d_in=16, n_features=32, active=2, seed=11)


def _cfg(store: Path, out: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"store": str(store), "d_sae": 32, "k": 2, "batch_size": 256, "tokens": 256 * 8,
                          "log_every": 2, "device": "cpu", "out": str(out), **kw})


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_receives_every_logged_record(store, tmp_path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = train(_cfg(store, tmp_path / "run"), quiet=True,
                tracking=TrackingConfig(backends=["tensorboard"], dir=str(tmp_path / "tb")))
    ref = json.loads((run / "cfg.json").read_text())["tracking"]["tensorboard"]
    acc = EventAccumulator(ref["log_dir"])
    acc.Reload()
    recs = _records(run)
    for key in ("loss", "l0", "explained_variance", "dead_fraction"):
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [g[0] for g in got] == [r["step"] for r in recs], key  # (pytest 9.2's approx takes no nested data)
        assert [g[1] for g in got] == pytest.approx([r[key] for r in recs]), key
    assert "config" in " ".join(acc.Tags()["tensors"])  # the settings, as text


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 (sqlite backend), up within 120 s, killed afterwards."""
    pytest.importorskip("mlflow")
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root}/db.sqlite", "--default-artifact-root",
                             str(root / "art"), "--workers", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail("mlflow server did not start within 120 s")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


def test_mlflow_sweep_is_a_parent_with_one_run_per_configuration_and_evaluate_attaches(store, tmp_path,
                                                                                     mlflow_server) -> None:
    from mlflow import MlflowClient

    cfgs = expand(_cfg(store, tmp_path), ["none", "ortsae"], {}, tmp_path / "sweep")
    tracking = TrackingConfig(backends=["mlflow"], project="ortho", group="sweep", mlflow_uri=mlflow_server,
                              tags={"team": "interp"})
    dirs = run_sweep(cfgs, quiet=True, tracking=tracking)
    client = MlflowClient(tracking_uri=mlflow_server)
    exp = client.get_experiment_by_name("ortho")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert set(runs) == {"sweep", "topk", "ortsae"}
    parent = runs["sweep"].info.run_id
    for d in dirs:
        r = runs[d.name]
        assert r.data.tags["mlflow.parentRunId"] == parent
        assert r.data.tags["arch"] == "topk" and r.data.tags["team"] == "interp" and r.data.tags["seed"] == "0"
        assert r.data.params["variant"] == ("none" if d.name == "topk" else "ortsae")
        assert r.data.params["content_digest"]
        hist = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss"))
        assert [h[0] for h in hist] == [x["step"] for x in _records(d)]
        assert [h[1] for h in hist] == pytest.approx([x["loss"] for x in _records(d)])
        assert r.info.status == "FINISHED"
        assert json.loads((d / "cfg.json").read_text())["tracking"]["mlflow"]["run_id"] == r.info.run_id
    # sae evaluate --log-to mlflow adds the evaluation to the same runs
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
    try:
        res = CliRunner().invoke(app, ["evaluate", *map(str, dirs), "--eval", "geometry", "--log-to", "mlflow",
                                       "--quiet"])
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert res.exit_code == 0, res.output
    geometry = json.loads((dirs[1] / "eval_results" / "geometry.json").read_text())["eval_result_metrics"]
    logged = client.get_run(runs[dirs[1].name].info.run_id).data.metrics
    for group, values in geometry.items():
        if "mean_max_cos" in values:
            assert logged[f"eval/geometry/{group}/mean_max_cos"] == pytest.approx(values["mean_max_cos"])


def test_evaluate_gives_an_sae_without_tracker_runs_new_ones_and_reuses_them(store, tmp_path, mlflow_server,
                                                                            monkeypatch) -> None:
    pytest.importorskip("tensorboard")
    from mlflow import MlflowClient

    run = train(_cfg(store, tmp_path / "plain"), quiet=True)  # trained without --log-to: cfg.json has no tracking
    cfg_bytes = (run / "cfg.json").read_bytes()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for trackers in ("mlflow,tensorboard", "mlflow"):
        res = CliRunner().invoke(app, ["evaluate", str(run), "--eval", "geometry", "--log-to", trackers, "--quiet"])
        assert res.exit_code == 0, res.output
    assert (run / "cfg.json").read_bytes() == cfg_bytes  # never rewritten
    refs = json.loads((run / "tracking.json").read_text())
    assert set(refs) == {"mlflow", "tensorboard"}
    client = MlflowClient(tracking_uri=mlflow_server)
    mine = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if r.info.run_name == "plain"]
    assert [r.info.run_id for r in mine] == [refs["mlflow"]["run_id"]]  # the second evaluation reused it
    r = mine[0]
    assert r.data.tags["arch"] == "topk" and r.data.tags["variant"] == "none" and r.data.tags["seed"] == "0"
    assert r.data.tags["hook"] == json.loads(cfg_bytes)["hook_name"]
    geometry = json.loads((run / "eval_results" / "geometry.json").read_text())["eval_result_metrics"]
    group, values = next((g, v) for g, v in geometry.items() if "mean_max_cos" in v)
    history = client.get_metric_history(r.info.run_id, f"eval/geometry/{group}/mean_max_cos")
    assert [m.value for m in history] == pytest.approx([values["mean_max_cos"]] * 2)  # both evaluations
    assert Path(refs["tensorboard"]["log_dir"]).is_dir()


def _wandb_record(root: Path, run_id: str, must_hold: bytes) -> bytes:
    """The offline record file of W&B run ``run_id`` under ``root``, once it holds ``must_hold`` and stopped
    growing (wandb-core may flush just after ``finish()`` returns)."""
    (path,) = root.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb")
    deadline, data, size = time.monotonic() + 30, b"", -1
    while time.monotonic() < deadline:
        data = path.read_bytes()
        if must_hold in data and len(data) == size:
            break
        size = len(data)
        time.sleep(0.5)
    return data


def test_wandb_offline_run_has_the_config_and_the_logged_keys(store, tmp_path, monkeypatch) -> None:
    """wandb 0.31 writes an offline run as one record file (``run-<id>.wandb``, protobuf records; it ships no
    Python reader for it), so the file is scanned for the config values, the tags and every logged value."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = train(_cfg(store, tmp_path / "run", variant="ortsae"), quiet=True,
                tracking=TrackingConfig(backends=["wandb"], project="ortho", dir=str(tmp_path / "wb")))
    ref = json.loads((run / "cfg.json").read_text())["tracking"]["wandb"]
    digest = json.loads((run / "cfg.json").read_text())["content_digest"]
    data = _wandb_record(tmp_path / "wb", ref["run_id"], b"content_digest")
    assert b"content_digest" in data and digest.encode() in data and b"variant:ortsae" in data
    for rec in _records(run):
        for key in ("loss", "l0", "explained_variance"):
            v = rec[key]  # JSON of the value (W&B writes an integral float as an integer)
            text = str(int(v)) if float(v).is_integer() else json.dumps(v)
            assert key.encode() in data and text.encode() in data, (rec["step"], key)


def test_a_wandb_sweep_is_one_offline_run_per_configuration_in_one_group(store, tmp_path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfgs = expand(_cfg(store, tmp_path), ["none", "ortsae"], {}, tmp_path / "sweep")
    dirs = run_sweep(cfgs, quiet=True, tracking=TrackingConfig(backends=["wandb"], project="ortho",
                                                               group="l1-sweep-7f3", dir=str(tmp_path / "wb")))
    ids = [json.loads((d / "cfg.json").read_text())["tracking"]["wandb"]["run_id"] for d in dirs]
    assert len(set(ids)) == 2
    for d, run_id in zip(dirs, ids, strict=True):
        data = _wandb_record(tmp_path / "wb", run_id, b"l1-sweep-7f3")
        assert b"l1-sweep-7f3" in data and d.name.encode() in data  # the group, and the run named after its config
        assert f"variant:{'none' if d.name == 'topk' else 'ortsae'}".encode() in data


def test_a_failing_tracker_warns_once_and_training_goes_on(store, tmp_path, monkeypatch, capsys) -> None:
    pytest.importorskip("tensorboard")

    def broken(self, metrics, step):
        raise OSError("No space left on device")

    monkeypatch.setattr(TensorBoardTracker, "log", broken)
    run = train(_cfg(store, tmp_path / "run"), quiet=True,
                tracking=TrackingConfig(backends=["tensorboard"], dir=str(tmp_path / "tb")))
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(err) == 1 and "tensorboard tracker for run failed (OSError: No space left on device)" in err[0]
    assert [r["step"] for r in _records(run)] == [0, 2, 4, 6, 7]  # metrics.jsonl complete
    assert (run / "sae_weights.safetensors").exists()
    assert "tensorboard" not in json.loads((run / "cfg.json").read_text()).get("tracking", {})


def test_the_log_table_names_the_run_and_the_mlflow_experiment(store, tmp_path) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    toml = tmp_path / "t.toml"
    toml.write_text(f'[log]\nto = "mlflow,tensorboard"\nproject = "ortho"\nexperiment = "ortho-gemma"\n'
                    f'name = "topk-baseline"\ndir = "{tmp_path / "tb"}"\nmlflow_uri = "{uri}"\n'
                    'tags = {team = "interp", round = 2}\n')
    r = CliRunner().invoke(app, ["train", "--store", str(store), "--config", str(toml), "--d-sae", "32", "--k", "2",
                                 "--batch-size", "256", "--tokens", "2048", "--device", "cpu",
                                 "--out", str(tmp_path / "run"), "--quiet"])
    assert r.exit_code == 0, r.output
    refs = json.loads((tmp_path / "run" / "cfg.json").read_text())["tracking"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(refs["mlflow"]["run_id"])
    assert run.info.run_name == "topk-baseline"
    assert client.get_experiment(run.info.experiment_id).name == "ortho-gemma"
    assert run.data.tags["team"] == "interp" and run.data.tags["round"] == "2"
    assert Path(refs["tensorboard"]["log_dir"]).name == "topk-baseline"
    # a sweep trains several SAEs: one name cannot name them all (refused before anything is made)
    r = CliRunner().invoke(app, ["sweep", "--store", str(store), "--variants", "none,ortsae", "--config", str(toml),
                                 "--out", str(tmp_path / "sweep")])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "set [log] group" in errors[0], r.output
    assert not (tmp_path / "sweep").exists()
    for table, message in (({"name": ""}, "name = '' must be a non-empty string"),
                           ({"experiment": 3}, "experiment = 3 must be a non-empty string"),
                           ({"tags": ["a"]}, "tags = ['a'] must be a table")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            TrackingConfig.parse("tensorboard", table)


def test_unknown_or_missing_tracker_is_one_line(store, tmp_path, monkeypatch) -> None:
    with pytest.raises(ConfigError, match="choose from wandb, mlflow, tensorboard"):
        TrackingConfig.parse("neptune")
    with pytest.raises(ConfigError, match="timeout_s = -1 must be a number of seconds"):
        TrackingConfig.parse("tensorboard", {"timeout_s": -1})
    assert TrackingConfig.parse(None, {"to": "tensorboard", "timeout_s": 5}).timeout_s == 5
    real_import = __import__

    def no_mlflow(name, *a, **k):
        if name == "mlflow":
            raise ImportError(name)
        return real_import(name, *a, **k)

    monkeypatch.setattr("builtins.__import__", no_mlflow)
    r = CliRunner().invoke(app, ["train", "--store", str(store), "--log-to", "mlflow", "--out", str(tmp_path / "r")])
    errors = [ln for ln in r.output.splitlines() if ln.startswith("error:")]
    assert r.exit_code == 2 and len(errors) == 1 and "pip install 'sae[tracking]'" in errors[0]
    assert not (tmp_path / "r").exists()
    cfg = tmp_path / "t.toml"
    cfg.write_text('[log]\nto = "tensorboard"\nprojekt = "x"\n')
    monkeypatch.setattr("builtins.__import__", real_import)
    r = CliRunner().invoke(app, ["train", "--store", str(store), "--config", str(cfg), "--out", str(tmp_path / "r")])
    assert r.exit_code == 2 and "unknown key 'projekt'" in r.output


def test_a_slow_tracker_never_holds_up_a_step_and_is_left_behind_at_the_deadline(store, tmp_path, monkeypatch,
                                                                                   capsys) -> None:
    """A tracker that takes 2 s per call (a far server): 5 log steps would cost 10 s if steps waited for it.
    They do not; at the end the tracker gets ``timeout_s`` and is left behind with one warning."""
    pytest.importorskip("tensorboard")
    real_log = TensorBoardTracker.log

    def slow(self, metrics, step):
        time.sleep(2.0)
        real_log(self, metrics, step)

    monkeypatch.setattr(TensorBoardTracker, "log", slow)
    t0 = time.perf_counter()
    run = train(_cfg(store, tmp_path / "run"), quiet=True,
                tracking=TrackingConfig(backends=["tensorboard"], dir=str(tmp_path / "tb"), timeout_s=1.0))
    took = time.perf_counter() - t0
    recs = _records(run)
    assert [r["step"] for r in recs] == [0, 2, 4, 6, 7] and recs[-1]["elapsed_s"] < 2.0  # the loop never waited
    assert took < 8.0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(err) == 1 and "tensorboard tracker for run did not finish within 1 s" in err[0], err
    ref = json.loads((run / "cfg.json").read_text())["tracking"]["tensorboard"]  # it started: its run is named
    assert Path(ref["log_dir"]).is_dir()


def _start_mlflow(root: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{root}/db.sqlite", "--default-artifact-root",
                             str(root / "art"), "--workers", "1"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            os.killpg(proc.pid, 9)
            pytest.fail("mlflow server did not start within 120 s")
        time.sleep(0.5)


def test_mlflow_server_killed_mid_run_warns_once_and_keeps_what_it_received(store, tmp_path, monkeypatch,
                                                                           capsys) -> None:
    """A real ``mlflow server`` killed while training logs to it: one warning, training finishes with a
    complete run directory; the server, restarted on the same database, holds a prefix of metrics.jsonl."""
    pytest.importorskip("mlflow")
    import threading

    from mlflow import MlflowClient

    from sae.train.run import TEST_DELAY_ENV

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # refused at once (default: ~4 min of retries)
    monkeypatch.setenv(TEST_DELAY_ENV, "0.2")
    root, port = tmp_path / "mlflow", _free_port()
    root.mkdir()
    uri = f"http://127.0.0.1:{port}"
    proc = _start_mlflow(root, port)
    out: dict = {}
    trainer = threading.Thread(target=lambda: out.setdefault("run", train(
        _cfg(store, tmp_path / "run", tokens=256 * 40, log_every=2), quiet=True,
        tracking=TrackingConfig(backends=["mlflow"], project="gone", mlflow_uri=uri, timeout_s=10))))
    trainer.start()
    try:
        client = MlflowClient(tracking_uri=uri)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the server holds a few logged steps
            exp = client.get_experiment_by_name("gone")
            runs = client.search_runs([exp.experiment_id]) if exp else []
            if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= 3:
                break
            time.sleep(0.2)
        else:
            pytest.fail("the run never reached the server")
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
    trainer.join(timeout=120)
    assert not trainer.is_alive() and "run" in out
    run = out["run"]
    recs = _records(run)
    assert [r["step"] for r in recs] == [*range(0, 40, 2), 39] and (run / "sae_weights.safetensors").exists()
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning:")]
    assert len(err) == 1 and "mlflow tracker for run failed (MlflowException" in err[0], err
    assert "mlflow" not in json.loads((run / "cfg.json").read_text()).get("tracking", {})
    proc = _start_mlflow(root, port)  # the same database, served again
    try:
        client = MlflowClient(tracking_uri=uri)
        [r] = client.search_runs([client.get_experiment_by_name("gone").experiment_id])
        hist = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss"))
        assert 3 <= len(hist) < len(recs)
        assert hist == [(x["step"], pytest.approx(x["loss"])) for x in recs[:len(hist)]]
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)


def test_a_resumed_run_goes_on_in_the_same_tracker_runs_without_repeating_a_step(store, tmp_path,
                                                                                 monkeypatch) -> None:
    """Killed at step 8 (checkpoint after step 4; steps 0–6 already logged), resumed: the same MLflow run
    (KILLED, then FINISHED), W&B run id and TensorBoard directory; every step reaches them exactly once."""
    pytest.importorskip("mlflow")
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    import torch
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import sae.train.run as run_mod

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking = TrackingConfig(backends=["tensorboard", "mlflow", "wandb"], project="resume",
                              dir=str(tmp_path / "tracking"), mlflow_uri=uri)
    cfg = _cfg(store, tmp_path / "run", tokens=256 * 12, checkpoint_every=5)
    real_step = run_mod.Trainer.step

    def dying_step(self, x, sync=True):
        if self.step_idx == 4:  # before the checkpoint: let the trackers start (the first seconds of a real run)
            deadline = time.monotonic() + 60
            while not (list((tmp_path / "tracking").glob("wandb/offline-run-*"))
                       and MlflowClient(tracking_uri=uri).search_runs(
                           [e.experiment_id for e in MlflowClient(tracking_uri=uri).search_experiments()])):
                assert time.monotonic() < deadline, "the trackers did not start within 60 s"
                time.sleep(0.2)
            time.sleep(1.0)
        if self.step_idx == 8:
            raise KeyboardInterrupt("killed")
        return real_step(self, x, sync)

    monkeypatch.setattr(run_mod.Trainer, "step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, quiet=True, tracking=tracking)
    monkeypatch.setattr(run_mod.Trainer, "step", real_step)
    refs = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["tracking"]
    assert set(refs) == {"tensorboard", "mlflow", "wandb"}
    client = MlflowClient(tracking_uri=uri)
    assert client.get_run(refs["mlflow"]["run_id"]).info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(refs["mlflow"]["run_id"], "loss")] == [0, 2, 4, 6]

    run = train(_cfg(store, tmp_path / "run", tokens=256 * 12, checkpoint_every=5, resume=True), quiet=True,
                tracking=tracking)
    recs = _records(run)
    assert [r["step"] for r in recs] == [0, 2, 4, 6, 8, 10, 11]
    final = json.loads((run / "cfg.json").read_text())["tracking"]
    assert final["mlflow"]["run_id"] == refs["mlflow"]["run_id"] and final["wandb"]["run_id"] == refs["wandb"]["run_id"]
    assert final["tensorboard"]["log_dir"] == refs["tensorboard"]["log_dir"]
    r = client.get_run(refs["mlflow"]["run_id"])
    assert r.info.status == "FINISHED"
    hist = sorted((m.step, m.value) for m in client.get_metric_history(r.info.run_id, "loss"))
    assert [h[0] for h in hist] == [x["step"] for x in recs]  # step 6 was not sent twice
    assert [h[1] for h in hist] == pytest.approx([x["loss"] for x in recs])
    acc = EventAccumulator(final["tensorboard"]["log_dir"])
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [x["step"] for x in recs]
