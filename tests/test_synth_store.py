"""Synthetic stores (``sae store synth``): SAELens' generator, exactly, in an ordinary store that every
command reads; deterministic chunks, exact resume after SIGKILL, the ground truth recorded, refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from sae.cli import app
from sae.store import ActivationStore
from sae.synth.config import SynthConfig
from sae.synth.presets import load_config, preset_config, to_toml
from sae.synth.store import HOOK, load_synthetic_model, sample_block, stream_seed, write_synthetic_store
from tests.helpers import run_killed, tree_hash

synthetic = pytest.importorskip("sae_lens.synthetic", reason="the synth extra (SAELens) is in dev")


def tiny_config() -> object:
    """The CPU preset's structure at toy size (64 features in 16 dimensions, 5 orthogonalisation steps)."""
    c = preset_config("synthsaebench-cpu")
    return dataclasses.replace(
        c, num_features=64, hidden_dim=16,
        hierarchy=dataclasses.replace(c.hierarchy, total_root_nodes=2, max_depth=2),
        orthogonalization=dataclasses.replace(c.orthogonalization, num_steps=5),
        correlation=dataclasses.replace(c.correlation, rank=4))


@pytest.fixture(scope="module")
def tiny_toml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    p = tmp_path_factory.mktemp("synthcfg") / "tiny.toml"
    p.write_text(to_toml(tiny_config()))
    return p


@pytest.fixture(scope="module")
def synth_store(tmp_path_factory: pytest.TempPathFactory, tiny_toml: Path) -> Path:
    out = tmp_path_factory.mktemp("synth") / "synth.zarr"
    write_synthetic_store(SynthConfig(config=str(tiny_toml), tokens=5000, chunk_tokens=1024, out=str(out)),
                          quiet=True)
    return out


def test_the_16k_preset_is_the_published_synthsaebench_configuration() -> None:
    # the table of SAELens docs/synth_sae_bench.md (SynthSAEBench-16k), field by field
    c = preset_config("synthsaebench-16k").to_dict()
    assert (c["num_features"], c["hidden_dim"], c["bias"], c["seed"]) == (16_384, 768, 0.5, 42)
    assert c["firing_probability"] == {"generator_name": "zipfian", "exponent": 0.5, "max_prob": 0.4, "min_prob": 5e-4}
    h = c["hierarchy"]
    assert (h["total_root_nodes"], h["branching_factor"], h["max_depth"]) == (128, 4, 3)
    assert h["mutually_exclusive_portion"] == 1.0 and h["scale_children_by_parent"] and h["compensate_probabilities"]
    assert (c["correlation"]["rank"], c["correlation"]["correlation_scale"]) == (25, 0.1)
    assert (c["orthogonalization"]["num_steps"], c["orthogonalization"]["lr"]) == (100, 3e-4)
    assert c["mean_firing_magnitudes"] == {"generator_name": "linear", "start": 5.0, "end": 4.0}
    assert c["std_firing_magnitudes"]["mean"] == 0.5 and c["std_firing_magnitudes"]["std"] == 0.5
    cpu = preset_config("synthsaebench-cpu").to_dict()
    assert (cpu["num_features"], cpu["hidden_dim"], cpu["hierarchy"]["total_root_nodes"]) == (4096, 192, 32)
    assert {k: v for k, v in cpu.items() if k not in ("num_features", "hidden_dim", "hierarchy")} == \
        {k: v for k, v in c.items() if k not in ("num_features", "hidden_dim", "hierarchy")}


def test_a_toml_file_round_trips_to_the_same_config(tiny_toml: Path) -> None:
    name, cfg = load_config(str(tiny_toml))
    assert name == "tiny" and cfg.to_dict() == tiny_config().to_dict()


def test_every_chunk_is_the_generator_stream_and_every_command_reads_the_store(synth_store: Path) -> None:
    s = ActivationStore(str(synth_store))
    assert s.hook_names == [HOOK] and s.d_model == 16 and s.n_tokens == 5120  # rounded up to whole sequences
    assert s.attrs["model_id"] == "synthetic:tiny" and s.special_token_ids == []
    model = load_synthetic_model(s)
    # the rebuilt generator is SAELens' model of the config (same dictionary, same firing probabilities)
    fresh = synthetic.SyntheticModel(tiny_config())
    assert torch.equal(model.feature_dict.feature_vectors, fresh.feature_dict.feature_vectors)
    assert torch.equal(model.activation_generator.firing_probabilities,
                       fresh.activation_generator.firing_probabilities)
    for i in (0, 4):  # chunk i = block i of the store stream, and the last chunk is short
        start, stop = s.chunk_bounds(i)
        x, _ = sample_block(fresh, stop - start, 0, 0, i)
        assert torch.equal(s.read_rows(HOOK, start, stop), x)
    # the samples follow x = a @ D + b with SAELens' sampler: reproduce block 0 by hand from the global RNG
    torch.manual_seed(stream_seed(0, 0, 0))
    a = fresh.activation_generator.sample(1024)
    assert torch.allclose(s.read_rows(HOOK, 0, 1024), a @ fresh.feature_dict.feature_vectors
                          + fresh.feature_dict.bias, atol=1e-5)
    r = CliRunner().invoke(app, ["store", "verify", str(synth_store)])
    assert r.exit_code == 0 and "clean" in r.output


def test_the_ground_truth_is_checked_before_use(synth_store: Path, tmp_path: Path) -> None:
    import shutil

    import zarr

    from sae.store import StoreError

    bad = tmp_path / "bad.zarr"
    shutil.copytree(synth_store, bad)
    g = zarr.open_group(str(bad), mode="r+")
    fv = g["synthetic/feature_vectors"]
    fv[0, 0] = float(fv[0, 0]) + 1.0
    with pytest.raises(StoreError, match="ground-truth arrays do not match"):
        load_synthetic_model(ActivationStore(str(bad)))


def test_a_killed_synth_resumes_to_the_same_store(tmp_path: Path, tiny_toml: Path, synth_store: Path) -> None:
    out = tmp_path / "killed.zarr"
    body = """
        from sae.synth.config import SynthConfig
        from sae.synth.store import write_synthetic_store
        write_synthetic_store(SynthConfig(config=sys.argv[3], tokens=5000, chunk_tokens=1024, out=sys.argv[4]),
                              quiet=True)
    """
    run_killed(body, "after_commit", 3, tiny_toml, out)  # tokens commit, then two chunk commits
    assert ActivationStore(str(out), require_complete=False).attrs["status"] == "in_progress"
    r = CliRunner().invoke(app, ["store", "synth", str(tiny_toml), "--tokens", "5000", "--chunk-tokens", "1024",
                                 "--out", str(out)])
    assert r.exit_code == 2 and "--resume" in r.output
    write_synthetic_store(SynthConfig(config=str(tiny_toml), tokens=5000, chunk_tokens=1024, out=str(out),
                                      resume=True), quiet=True)
    a, b = ActivationStore(str(out)), ActivationStore(str(synth_store))
    assert a.content_digest == b.content_digest
    assert torch.equal(a.read_rows(HOOK, 0, a.n_tokens), b.read_rows(HOOK, 0, b.n_tokens))
    assert a.attrs["stats"] == b.attrs["stats"]


def test_refusals_are_one_line_and_touch_nothing(tmp_path: Path, tiny_toml: Path, synth_store: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text(to_toml(dataclasses.replace(tiny_config(), seed=7)))
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    before = tree_hash(tmp_path), tree_hash(synth_store)
    cases = [
        (["store", "synth", "no-such-preset"], "unknown synthetic preset"),
        (["store", "synth", str(tmp_path / "missing.toml")], "cannot read synthetic config"),
        (["store", "synth", str(tiny_toml), "--tokens", "0"], "--tokens"),
        (["store", "synth", str(tiny_toml), "--chunk-tokens", "1000"], "multiple of --context-size"),
        (["store", "synth", str(tiny_toml), "--out", str(tmp_path / "theirs"), "--overwrite"], "not an sae store"),
        (["store", "synth", str(other), "--out", str(synth_store), "--resume", "--tokens", "5000",
          "--chunk-tokens", "1024"], "another synthetic config"),
        (["store", "synth", str(tiny_toml), "--out", str(tmp_path / "new.zarr"), "--resume"], "no store to continue"),
    ]
    for args, msg in cases:
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.count("error:") == 1 and msg in r.output, (args, r.output)
    assert (tree_hash(tmp_path), tree_hash(synth_store)) == before


def test_print_config_is_a_file_the_command_reads(tmp_path: Path) -> None:
    r = CliRunner().invoke(app, ["store", "synth", "synthsaebench-cpu", "--print-config"])
    assert r.exit_code == 0
    p = tmp_path / "cpu.toml"
    p.write_text(r.output)
    assert load_config(str(p))[1].to_dict() == preset_config("synthsaebench-cpu").to_dict()


def test_recorded_attributes_name_the_generator_and_no_credentials(synth_store: Path) -> None:
    a = json.loads((synth_store / "zarr.json").read_text())["attributes"]
    meta = a["synthetic"]
    assert meta["config"] == tiny_config().to_dict() and meta["generator"].startswith("sae_lens ")
    assert meta["hierarchy"]["roots"] and "storage_options" not in a["harvest_config"]
    assert np.isfinite(a["stats"][HOOK]["mean_sq_norm"])
