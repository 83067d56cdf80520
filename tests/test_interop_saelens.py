"""SAELens 6.54 round trips with the real library: SAEs SAELens writes load here with its codes,
and ours load in SAELens with ours. SAELens' own ``encode``/``decode`` is the reference throughout."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from sae.errors import SAELoadError
from sae.rundir.sae import SAE

sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is in the dev extra; install it to run the round trips")
warnings.filterwarnings("ignore", module="sae_lens")

D_IN, D_SAE = 16, 64
META = {"model_name": "google/gemma-3-270m", "hook_name": "blocks.3.hook_resid_post", "context_size": 64,
        "prepend_bos": True, "dataset_path": "embedded"}


def _x(n: int = 256, seed: int = 3) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


@torch.no_grad()
def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Every parameter random and non-trivial: non-unit decoder rows, non-zero biases."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        v = torch.randn(p.shape, generator=g)
        if name == "W_dec":
            v = v * (0.5 + torch.rand(p.shape[0], 1, generator=g) * 2)  # norms 0.5..2.5 × √d_in
        elif name in ("threshold",):
            v = v.abs() * 0.5
        elif name == "r_mag":
            v = v * 0.3
        p.copy_(v * (0.3 if name.startswith("b_") else 1.0))


def _saelens(arch: str, **kw):
    cfg_cls = {"standard": sae_lens.StandardSAEConfig, "topk": sae_lens.TopKSAEConfig,
               "jumprelu": sae_lens.JumpReLUSAEConfig, "gated": sae_lens.GatedSAEConfig}[arch]
    cfg = cfg_cls(d_in=D_IN, d_sae=D_SAE, metadata=sae_lens.saes.sae.SAEMetadata(**META), **kw)
    model = sae_lens.SAE.from_dict(cfg.to_dict())
    _randomise(model)
    return model


CASES = [("standard", {}), ("standard", {"apply_b_dec_to_input": False}), ("topk", {"k": 5}),
         ("topk", {"k": 5, "rescale_acts_by_decoder_norm": True}), ("jumprelu", {}),
         ("jumprelu", {"apply_b_dec_to_input": False}), ("gated", {}), ("gated", {"apply_b_dec_to_input": False})]


@pytest.mark.parametrize(("arch", "kw"), CASES, ids=[f"{a}-{'-'.join(kw) or 'plain'}" for a, kw in CASES])
def test_a_saelens_6_sae_loads_with_identical_codes(tmp_path, arch, kw) -> None:
    theirs = _saelens(arch, **kw)
    theirs.save_model(tmp_path / "sae")
    ours = SAE.load(tmp_path / "sae")
    x = _x()
    with torch.no_grad():
        f_ref, f = theirs.encode(x), ours.encode(x)
        assert torch.equal(f > 0, f_ref > 0), "active sets differ"
        torch.testing.assert_close(f, f_ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours(x), theirs.decode(f_ref), rtol=1e-4, atol=1e-4)
    assert ours.activation == {"standard": "relu", "gated": "jumprelu"}.get(arch, arch)
    # 6.x keeps usage fields under metadata: our evaluations read them at the top level
    assert ours.cfg["hook_name"] == META["hook_name"] and ours.cfg["hook_layer"] == 3
    assert ours.cfg["model_name"] == META["model_name"] and ours.cfg["context_size"] == 64
    assert ours.cfg["source_architecture"] == arch


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka_batchtopk", "jumprelu"])
def test_a_saelens_training_file_loads_as_its_inference_sae(tmp_path, arch) -> None:
    """A TrainingSAE's own save (``topk_threshold`` / ``log_threshold``) equals the JumpReLU SAE SAELens
    converts it to for inference (``save_inference_model``)."""
    if arch == "jumprelu":
        cfg = sae_lens.JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE)
        model = sae_lens.saes.jumprelu_sae.JumpReLUTrainingSAE(cfg)
    else:
        cls = (sae_lens.BatchTopKTrainingSAEConfig if arch == "batchtopk"
               else sae_lens.MatryoshkaBatchTopKTrainingSAEConfig)
        extra = {} if arch == "batchtopk" else {"matryoshka_widths": [8, 24, 64]}
        cfg = cls(d_in=D_IN, d_sae=D_SAE, k=4, **extra)
        model = sae_lens.saes.sae.TrainingSAE.from_dict(cfg.to_dict())
    cfg.metadata = sae_lens.saes.sae.SAEMetadata(**META)
    _randomise(model)
    if arch != "jumprelu":
        model.topk_threshold = torch.tensor(1.3, dtype=torch.double)
    model.save_model(tmp_path / "train")
    model.save_inference_model(tmp_path / "infer")
    if arch == "jumprelu":  # 6.54 trains θ itself; older checkpoints hold log θ (process_state_dict_for_loading)
        state = {n: t.detach().contiguous() for n, t in model.state_dict().items()}
        state["log_threshold"] = state.pop("threshold").log()
        save_file(state, str(tmp_path / "train" / "sae_weights.safetensors"))
    names = set(load_file(str(tmp_path / "train" / "sae_weights.safetensors")))
    assert ("log_threshold" if arch == "jumprelu" else "topk_threshold") in names
    assert json.loads((tmp_path / "train" / "cfg.json").read_text())["architecture"] == arch
    reference = sae_lens.SAE.load_from_disk(str(tmp_path / "infer"))
    assert reference.cfg.architecture() == "jumprelu"
    x = _x()
    with torch.no_grad():
        f_ref = reference.encode(x)
        assert 0 < float((f_ref > 0).float().sum(1).mean()) < D_SAE
        for d in ("train", "infer"):
            ours = SAE.load(tmp_path / d)
            assert ours.activation == "jumprelu"
            torch.testing.assert_close(ours.encode(x), f_ref, rtol=1e-5, atol=1e-5)


def test_a_pre_6_config_loads_like_saelens_loads_it(tmp_path) -> None:
    """Pre-6 layout: activation_fn_str + activation_fn_kwargs, hook_point and model_name at the top level,
    no sae_lens_version. SAELens 6's own loader (handle_pre_6_0_config) is the reference."""
    theirs = _saelens("topk", k=3)
    d = tmp_path / "old"
    d.mkdir()
    save_file({n: p.detach().contiguous() for n, p in theirs.state_dict().items()}, str(d / "sae_weights.safetensors"))
    (d / "cfg.json").write_text(json.dumps({
        "d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "topk", "activation_fn_kwargs": {"k": 3},
        "hook_point": "blocks.5.hook_resid_post", "hook_point_layer": 5, "model_name": "gpt2", "dtype": "float32",
        "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": False, "context_size": 128}))
    reference = sae_lens.SAE.load_from_disk(str(d))
    assert reference.cfg.architecture() == "topk"
    ours = SAE.load(d)
    x = _x()
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(x), reference.encode(x), rtol=1e-5, atol=1e-5)
    assert ours.activation == "topk" and ours.k == 3
    assert ours.cfg["hook_name"] == "blocks.5.hook_resid_post" and ours.cfg["hook_layer"] == 5


def test_an_architecture_we_cannot_run_is_one_line_never_a_fallback(tmp_path) -> None:
    cfg = sae_lens.AbsTopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=4)
    sae_lens.SAE.from_dict(cfg.to_dict()).save_model(tmp_path / "abs")
    with pytest.raises(SAELoadError, match="'abstopk' cannot be run here") as e:
        SAE.load(tmp_path / "abs")
    assert "\n" not in str(e.value)
    theirs = _saelens("standard", normalize_activations="layer_norm")
    theirs.save_model(tmp_path / "ln")
    with pytest.raises(SAELoadError, match="normalize_activations='layer_norm'"):
        SAE.load(tmp_path / "ln")
    cfg = json.loads((tmp_path / "ln" / "cfg.json").read_text())
    cfg["architecture"] = "mystery"
    (tmp_path / "ln" / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SAELoadError, match="unknown SAE architecture 'mystery'"):
        SAE.load(tmp_path / "ln")


def test_expected_average_only_in_needs_and_folds_its_scale(tmp_path) -> None:
    theirs = _saelens("standard", normalize_activations="expected_average_only_in")
    theirs.save_model(tmp_path / "s")
    with pytest.raises(SAELoadError, match="--activation-scale"):
        SAE.load(tmp_path / "s")
    ours = SAE.load(tmp_path / "s", activation_scale=0.25)
    x = _x()
    with torch.no_grad():  # the SAE expects 0.25·x: f(x) = f_theirs(0.25 x), x̂(x) = x̂_theirs(0.25 x) / 0.25
        torch.testing.assert_close(ours.encode(x), theirs.encode(0.25 * x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours(x), theirs.decode(theirs.encode(0.25 * x)) / 0.25, rtol=1e-4, atol=1e-4)


# -- the forward direction: our runs in SAELens ----------------------------------------------------------------
@pytest.fixture(scope="module")
def store(planted_store_factory):
    return planted_store_factory(n_tokens=4096, d_in=D_IN, n_features=32, active=2)


@pytest.mark.parametrize("arch", ["topk", "relu", "batchtopk", "jumprelu", "matryoshka"])
def test_our_run_loads_in_saelens_with_identical_codes_and_unit_decoder(store, tmp_path, arch) -> None:
    from sae.train.config import TrainConfig
    from sae.train.run import train

    kw = {"l1_coefficient": 0.01} if arch == "relu" else {}
    run = train(TrainConfig(store=str(store), arch=arch, variant="none", d_sae=D_SAE, k=4, batch_size=256,
                            tokens=256 * 12, device="cpu", out=str(tmp_path / "run"), **kw), quiet=True)
    cfg = json.loads((run / "cfg.json").read_text())
    assert cfg["unit_decoder"] is True
    ours = SAE.load(run)
    torch.testing.assert_close(ours.W_dec.norm(dim=1), torch.ones(D_SAE), rtol=0, atol=1e-5)
    theirs = sae_lens.SAE.load_from_disk(str(run))
    x = _x() * 20  # raw activation units of the store
    with torch.no_grad():
        f = ours.encode(x)
        torch.testing.assert_close(theirs.encode(x), f, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(theirs.decode(f), ours(x), rtol=1e-5, atol=1e-4)
        # fold_W_dec_norm is a no-op on unit rows — and SAELens accepts it for TopK too
        theirs.fold_W_dec_norm()
        torch.testing.assert_close(theirs.encode(x), f, rtol=1e-5, atol=1e-5)
