"""``sae import`` from sparsify, dictionary_learning and SAELens, checked against each library's own encode.

* sparsify (``eai-sparsify``, dev extra): SAEs written by ``SparseCoder.save_to_disk``; reference
  = ``SparseCoder.encode``.
* dictionary_learning cannot be installed here with its dependencies (it pins a CUDA torch via
  circuitsvis/nnsight), so its files are written from its documented format (``ae.pt`` state dict
  with the classes' key names + ``config.json`` as ``training.py`` writes it) and the reference is
  each class's ``encode`` formula, written out below from ``dictionary.py`` / ``trainers/*.py``. When
  the package is importable (``pip install --no-deps dictionary-learning``), the same checks also
  run against its real classes.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import types
import warnings

import pytest
import torch
from typer.testing import CliRunner

from sae.cli import app
from sae.errors import ConfigError, SAELoadError
from sae.interop.importer import import_sae
from sae.rundir.sae import SAE

D_IN, D_SAE = 16, 48


def _x(n: int = 200, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        v = torch.randn(p.shape, generator=g)
        if "bias" in name or name.startswith("b_"):
            v = v * 0.3
        if name == "threshold":
            v = v.abs() * 0.4
        if name == "r_mag":
            v = v * 0.2
        p.copy_(v)


# -- sparsify ---------------------------------------------------------------------------------------------------
def test_a_sparsify_sae_imports_with_its_own_codes_and_loads_in_saelens(tmp_path) -> None:
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is in the dev extra")
    coder = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(k=5, num_latents=D_SAE))
    _randomise(coder)
    coder.save_to_disk(tmp_path / "run" / "layers.2")
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": "HuggingFaceTB/SmolLM2-135M"}))
    res = CliRunner().invoke(app, ["import", str(tmp_path / "run"), "--from", "sparsify", "--out",
                                   str(tmp_path / "ours")])
    assert res.exit_code == 0, res.output
    ours = SAE.load(tmp_path / "ours")
    cfg = json.loads((tmp_path / "ours" / "cfg.json").read_text())
    assert cfg["hook_name"] == "blocks.2.hook_resid_post" and cfg["model_name"] == "HuggingFaceTB/SmolLM2-135M"
    assert cfg["imported_from"]["format"] == "sparsify" and ours.activation == "topk" and ours.k == 5
    x = _x()
    with torch.no_grad():
        top_acts, top_idx, _ = coder.encode(x)
        ref = torch.zeros(len(x), D_SAE).scatter_(1, top_idx, top_acts)
        torch.testing.assert_close(ours.encode(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours(x), coder.decode(top_acts, top_idx), rtol=1e-5, atol=1e-5)
    sae_lens = pytest.importorskip("sae_lens")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ref, rtol=1e-5, atol=1e-5)


def test_sparsify_without_a_model_or_with_a_skip_connection_is_refused(tmp_path) -> None:
    sparsify = pytest.importorskip("sparsify", reason="eai-sparsify is in the dev extra")
    sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(k=5, num_latents=D_SAE)).save_to_disk(tmp_path / "a")
    with pytest.raises(ConfigError, match="pass --model"):
        import_sae(tmp_path / "a", "sparsify", tmp_path / "o")
    assert not (tmp_path / "o").exists()  # nothing created before every input is valid
    with pytest.raises(ConfigError, match="--hook-name"):  # directory name "a" is no block output
        import_sae(tmp_path / "a", "sparsify", tmp_path / "o", model="gpt2")
    import_sae(tmp_path / "a", "sparsify", tmp_path / "o", model="gpt2", hook_name="blocks.0.hook_resid_post")
    skip = sparsify.SparseCoder(D_IN, sparsify.SparseCoderConfig(k=5, num_latents=D_SAE, skip_connection=True))
    skip.save_to_disk(tmp_path / "layers.1")
    with pytest.raises(SAELoadError, match="skip connection"):
        import_sae(tmp_path / "layers.1", "sparsify", tmp_path / "o2", model="gpt2")


# -- dictionary_learning ------------------------------------------------------------------------------------------
def _dl_reference(cls: str, s: dict[str, torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """Each class's ``encode`` (dictionary_learning dictionary.py / trainers/*.py), written out."""
    relu = torch.relu
    if cls == "AutoEncoder":
        return relu((x - s["bias"]) @ s["encoder.weight"].T + s["encoder.bias"])
    if cls == "AutoEncoderNew":
        return relu(x @ s["encoder.weight"].T + s["encoder.bias"])
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        post = relu((x - s["b_dec"]) @ s["encoder.weight"].T + s["encoder.bias"])
        if cls == "BatchTopKSAE":  # use_threshold=True at inference
            return post * (post > s["threshold"])
        top = post.topk(k, dim=-1)
        return torch.zeros_like(post).scatter_(-1, top.indices, top.values)
    if cls == "MatryoshkaBatchTopKSAE":
        post = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        return post * (post > s["threshold"])
    if cls == "JumpReluAutoEncoder":  # apply_b_dec_to_input = False
        pre = x @ s["W_enc"] + s["b_enc"]
        return relu(pre * (pre > s["threshold"]))
    assert cls == "GatedAutoEncoder"
    x_enc = (x - s["decoder_bias"]) @ s["encoder.weight"].T
    return (x_enc + s["gate_bias"] > 0).float() * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])


def _dl_decode(cls: str, s: dict[str, torch.Tensor], f: torch.Tensor) -> torch.Tensor:
    if cls in ("MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder"):
        return f @ s["W_dec"] + s["b_dec"]
    biases = {"AutoEncoder": "bias", "AutoEncoderNew": "decoder.bias", "GatedAutoEncoder": "decoder_bias"}
    bias = biases.get(cls, "b_dec")
    return f @ s["decoder.weight"].T + s[bias]


def _dl_state(cls: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with exactly the class's keys and shapes (from its ``__init__``)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    if cls == "AutoEncoder":
        return {"bias": r(D_IN, scale=0.3), "encoder.weight": r(D_SAE, D_IN), "encoder.bias": r(D_SAE, scale=0.3),
                "decoder.weight": r(D_IN, D_SAE)}
    if cls == "AutoEncoderNew":
        return {"encoder.weight": r(D_SAE, D_IN), "encoder.bias": r(D_SAE, scale=0.3),
                "decoder.weight": r(D_IN, D_SAE), "decoder.bias": r(D_IN, scale=0.3)}
    if cls in ("AutoEncoderTopK", "BatchTopKSAE"):
        return {"k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(0.7),
                "decoder.weight": r(D_IN, D_SAE), "encoder.weight": r(D_SAE, D_IN),
                "encoder.bias": r(D_SAE, scale=0.3), "b_dec": r(D_IN, scale=0.3)}
    if cls == "MatryoshkaBatchTopKSAE":
        return {"k": torch.tensor(4, dtype=torch.int), "threshold": torch.tensor(0.7),
                "group_sizes": torch.tensor([8, 16, 24]), "W_enc": r(D_IN, D_SAE), "b_enc": r(D_SAE, scale=0.3),
                "W_dec": r(D_SAE, D_IN), "b_dec": r(D_IN, scale=0.3)}
    if cls == "JumpReluAutoEncoder":
        return {"W_enc": r(D_IN, D_SAE), "b_enc": r(D_SAE, scale=0.3), "W_dec": r(D_SAE, D_IN),
                "b_dec": r(D_IN, scale=0.3), "threshold": r(D_SAE).abs() * 0.4}
    return {"decoder_bias": r(D_IN, scale=0.3), "encoder.weight": r(D_SAE, D_IN), "r_mag": r(D_SAE, scale=0.2),
            "gate_bias": r(D_SAE, scale=0.3), "mag_bias": r(D_SAE, scale=0.3), "decoder.weight": r(D_IN, D_SAE)}


DL_CLASSES = ["AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE",
              "JumpReluAutoEncoder", "GatedAutoEncoder"]


def _dl_save(d, cls: str, state: dict[str, torch.Tensor], k: int = 4) -> None:
    d.mkdir(parents=True)
    torch.save(state, d / "ae.pt")
    trainer = {"trainer_class": cls.replace("AutoEncoder", "") + "Trainer", "dict_class": cls,
               "activation_dim": D_IN, "dict_size": D_SAE, "k": k, "layer": 3, "lm_name": "EleutherAI/pythia-70m",
               "submodule_name": "resid_post_layer_3", "device": "cpu"}
    (d / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": {"ctx_len": 128, "d_submodule": D_IN}}))


@pytest.mark.parametrize("cls", DL_CLASSES)
def test_a_dictionary_learning_save_imports_with_its_encode(tmp_path, cls) -> None:
    state = _dl_state(cls)
    _dl_save(tmp_path / "dl", cls, state)
    res = import_sae(tmp_path / "dl", "dictionary_learning", tmp_path / "ours")
    ours = SAE.load(res.run_dir)
    cfg = ours.cfg
    assert cfg["hook_name"] == "blocks.3.hook_resid_post" and cfg["model_name"] == "EleutherAI/pythia-70m"
    assert cfg["context_size"] == 128 and cfg["imported_from"]["architecture"] == cls
    x = _x()
    s = {n: t.float() for n, t in state.items()}
    ref = _dl_reference(cls, s, x, 4)
    assert 0 < float((ref > 0).float().mean()) < 0.9
    with torch.no_grad():
        f = ours.encode(x)
        assert torch.equal(f > 0, ref > 0)
        torch.testing.assert_close(f, ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours(x), _dl_decode(cls, s, ref), rtol=1e-4, atol=1e-4)


def test_an_uncalibrated_batchtopk_threshold_is_refused(tmp_path) -> None:
    state = _dl_state("BatchTopKSAE")
    state["threshold"] = torch.tensor(-1.0)
    _dl_save(tmp_path / "dl", "BatchTopKSAE", state)
    with pytest.raises(SAELoadError, match="never calibrated"):
        import_sae(tmp_path / "dl", "dictionary_learning", tmp_path / "ours")


def _real_dictionary_learning():
    spec = None if "dictionary_learning" in sys.modules else importlib.util.find_spec("dictionary_learning")
    if spec is None and "dictionary_learning" not in sys.modules:
        pytest.skip("dictionary_learning is not installed: its dependencies pull a CUDA torch here "
                    "(`pip install --no-deps dictionary-learning` enables this check)")
    if spec is not None:  # its __init__ imports nnsight; the classes need only torch
        pkg = types.ModuleType("dictionary_learning")
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["dictionary_learning"] = pkg
    from dictionary_learning import dictionary
    from dictionary_learning.trainers import batch_top_k, matryoshka_batch_top_k, top_k

    return {"AutoEncoder": lambda: dictionary.AutoEncoder(D_IN, D_SAE),
            "AutoEncoderNew": lambda: dictionary.AutoEncoderNew(D_IN, D_SAE),
            "AutoEncoderTopK": lambda: top_k.AutoEncoderTopK(D_IN, D_SAE, 4),
            "BatchTopKSAE": lambda: batch_top_k.BatchTopKSAE(D_IN, D_SAE, 4),
            "MatryoshkaBatchTopKSAE": lambda: matryoshka_batch_top_k.MatryoshkaBatchTopKSAE(
                D_IN, D_SAE, 4, [8, 16, 24]),
            "JumpReluAutoEncoder": lambda: dictionary.JumpReluAutoEncoder(D_IN, D_SAE),
            "GatedAutoEncoder": lambda: dictionary.GatedAutoEncoder(D_IN, D_SAE)}


@pytest.mark.parametrize("cls", DL_CLASSES)
def test_the_real_dictionary_learning_classes_agree(tmp_path, cls) -> None:
    model = _real_dictionary_learning()[cls]()
    _randomise(model)
    if hasattr(model, "threshold") and model.threshold.ndim == 0:
        model.threshold.fill_(0.7)
    state = {n: t.detach().clone() for n, t in model.state_dict().items()}
    assert set(state) == set(_dl_state(cls)), "the documented key names drifted from the library's"
    _dl_save(tmp_path / "dl", cls, state)
    ours = SAE.load(import_sae(tmp_path / "dl", "dictionary_learning", tmp_path / "ours").run_dir)
    x = _x()
    with torch.no_grad():
        ref = model.encode(x)
        torch.testing.assert_close(ours.encode(x), ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours(x), model.decode(ref), rtol=1e-4, atol=1e-4)


# -- SAELens import, the store check, and our evaluations on an imported SAE ----------------------------------------
def test_an_imported_saelens_sae_is_evaluated_and_checked_against_the_store(tmp_path, tiny_model_dir, tiny_store
                                                                           ) -> None:
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is in the dev extra")
    from sae.evaluate import evaluate_runs
    from tests.conftest import TINY_D_MODEL

    meta = sae_lens.saes.sae.SAEMetadata(model_name=str(tiny_model_dir), hook_name="blocks.1.hook_resid_post",
                                         context_size=64)
    theirs = sae_lens.SAE.from_dict(sae_lens.TopKSAEConfig(d_in=TINY_D_MODEL, d_sae=128, k=8, metadata=meta).to_dict())
    theirs.save_model(tmp_path / "sl")
    runner = CliRunner()
    res = runner.invoke(app, ["import", str(tmp_path / "sl"), "--from", "saelens", "--out", str(tmp_path / "run"),
                              "--store", str(tiny_store)])
    assert res.exit_code == 0 and "warning" not in res.output, res.output
    [result] = evaluate_runs([tmp_path / "run"], store=str(tiny_store), evals=["core"], n_tokens=256, device="cpu",
                             quiet=True)
    ev = result["eval_result_metrics"]["reconstruction_quality"]["explained_variance"]
    assert isinstance(ev, float) and ev == ev  # finite, computed through the imported SAE
    # a store of another layer: imported anyway, with one warning naming the mismatch
    res = runner.invoke(app, ["import", str(tmp_path / "sl"), "--from", "saelens", "--out", str(tmp_path / "run2"),
                              "--store", str(tiny_store), "--hook-name", "blocks.3.hook_resid_post"])
    assert res.exit_code == 0 and "warning: no matching store" in res.output and "blocks.3" in res.output
    # an existing output is refused without --overwrite; a foreign directory even with it
    res = runner.invoke(app, ["import", str(tmp_path / "sl"), "--from", "saelens", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "already exists" in res.output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("precious")
    res = runner.invoke(app, ["import", str(tmp_path / "sl"), "--from", "saelens", "--out", str(foreign),
                              "--overwrite"])
    assert res.exit_code == 2 and "not a run directory of ours" in res.output
    assert (foreign / "notes.txt").read_text() == "precious"
    res = runner.invoke(app, ["import", str(tmp_path / "sl"), "--from", "saelens", "--out", str(tmp_path / "run"),
                              "--overwrite"])
    assert res.exit_code == 0, res.output
