"""Training configuration (one dataclass; every field is a CLI option and lands in cfg.json)."""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

# Settings that do not change the trained weights: everything else must match for ``--resume``.
NON_RUN_KEYS = ("store", "storage_options", "cache", "hook_name", "device", "out", "resume", "overwrite",
                "log_every", "checkpoint_every", "checkpoint_minutes", "save_unit_decoder", "read_workers",
                "init_from")  # the source SAE is compared by its weights' digest instead (train/run.py)


LEGACY_VARIANTS = {"topk": "topk", "relu": "relu"}
"""Old ``--variant`` spellings that named a base architecture, and the ``--arch`` each means (the
penalty is then ``none``). They keep working, with a one-line notice."""


@dataclass
class TrainConfig:
    """Hyperparameters of one SAE training run.

    Defaults follow Gao et al. 2024 (TopK, AuxK α = 1/32, k_aux = d_in/2) and SAELens (Adam,
    decoder-norm-weighted L1 with warm-up for ReLU), adapted to short CPU runs.
    """

    store: str = "acts.zarr"
    """Activation store written by ``sae harvest``: a path or URL (``s3://``, ``gs://``, ``http(s)://``,
    ``hf://``, ``file://``, ``memory://``)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options of a remote store (e.g. ``endpoint_url``); never written to ``cfg.json``."""
    cache: str | None = None
    """Local directory caching a remote store's chunk objects (fsspec ``simplecache``), shared by readers."""
    hook_name: str | None = None
    """Store array to train on; None = the store's only hook."""
    variant: str = "none"
    """The orthogonality penalty: none | topk_pairs | adaptive | progressive | temporal | static_ortho |
    ortsae. (``topk`` and ``relu``, which named a base architecture, are read as ``none`` with that
    ``arch``, with a notice: see :data:`LEGACY_VARIANTS`.)"""
    arch: str | None = None
    """SAE architecture: topk | relu | batchtopk | jumprelu | matryoshka. None = topk."""
    variant_params: dict[str, Any] = field(default_factory=dict)
    """Penalty hyperparameters (see the variant's Config); unspecified ones take defaults."""
    arch_params: dict[str, Any] = field(default_factory=dict)
    """Architecture hyperparameters (see the arch's Config, e.g. matryoshka ``groups``)."""
    d_sae: int | None = None
    """Latents; None = expansion × d_in."""
    expansion: int = 8
    """d_sae = expansion · d_in when d_sae is None."""
    k: int = 32
    """Active latents per token (TopK; the mean per token for BatchTopK and Matryoshka)."""
    l1_coefficient: float = 0.02
    """ReLU only: λ of λ·mean_b Σ_i f_bi‖W_dec,i‖ (in units of the FVU loss)."""
    l1_warmup_frac: float = 0.05
    lr: float = 1e-3
    """Adam learning rate."""
    lr_warmup_steps: int = 20
    lr_decay_frac: float = 0.2
    """Linear decay to 0 over this final fraction of steps."""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    tokens: int = 1_000_000
    """Training tokens (token-updates); steps = tokens // batch_size."""
    batch_size: int = 4096
    """Tokens per step."""
    aux_k_coefficient: float = 1 / 32
    aux_k: int | None = None
    """Latents in the AuxK reconstruction; None = d_in // 2."""
    dead_tokens: int = 200_000
    """A latent is dead when it has not fired for this many training tokens."""
    mix_chunks: int = 4
    read_workers: int = 0
    """Store decode threads (0 = ``os.cpu_count()``); never changes the batch stream."""
    autocast: str = "none"
    """``bf16``: the dense encoder GEMM (and AuxK's column GEMMs) in bfloat16 with fp32 accumulation;
    parameters, Adam state, the sparse backward and the losses stay float32. ``none``: all float32."""
    normalize: bool = True
    """Scale inputs so that E‖x‖² = d_in (store statistics); folded into the saved weights."""
    seed: int = 0
    """Seed of the data order, and of the initialisation unless ``init_seed`` is given."""
    init_seed: int | None = None
    """Seed of the SAE's initialisation and per-step randomness (AuxK, penalty sampling); None = ``seed``.
    ``seed`` alone fixes the data order, so runs differing only in ``init_seed`` share one pass
    (``sae sweep --seeds``)."""
    init_from: str | None = None
    """Run directory of an existing SAE (ours, or one ``sae import`` wrote) to fine-tune instead of a random
    initialisation: same width, model, hook and saved activation (topk → topk, standard → relu, jumprelu →
    jumprelu). None = random initialisation."""
    device: str = "auto"
    """auto | cpu | cuda (auto: CUDA when available)."""
    out: str = "runs/sae"
    """Run directory."""
    resume: bool = False
    """Continue a killed run from its checkpoint (refused if a setting that changes the weights differs)."""
    overwrite: bool = False
    """Replace an existing run directory of ours (built beside it, swapped in atomically)."""
    save_unit_decoder: bool = True
    """Save unit-norm decoder rows, the scale moved into the encoder and the codes (SAELens'
    ``fold_W_dec_norm`` convention); reconstructions are unchanged. False keeps ‖W_dec,i‖ = 1/s."""
    log_every: int = 10
    """Steps between ``metrics.jsonl`` records."""
    checkpoint_every: int = 50
    """Steps between checkpoints."""
    checkpoint_minutes: float = 10.0
    """Also checkpoint when this many minutes passed since the last checkpoint (besides SIGTERM/SIGINT)."""

    @property
    def model_seed(self) -> int:
        """The seed of initialisation and per-step randomness (``init_seed``, else ``seed``)."""
        return self.seed if self.init_seed is None else self.init_seed

    @property
    def activation(self) -> str:
        """The resolved architecture name (``arch``, else topk)."""
        return self.arch or "topk"

    def __post_init__(self) -> None:
        self.legacy_notice: str | None = None
        if self.variant in LEGACY_VARIANTS:
            old = self.variant
            if old == "relu" and self.arch not in (None, "relu"):
                raise ConfigError(f"--variant relu means --arch relu, not --arch {self.arch}: use --arch {self.arch} "
                                  "for a plain SAE of that architecture")
            self.variant, self.arch = "none", self.arch or LEGACY_VARIANTS[old]
            self.legacy_notice = (f"note: --variant {old} names a base architecture; read as --variant none "
                                  f"--arch {self.arch} (spell it that way to silence this note)")
        self.route_params()

    def route_params(self) -> None:
        """Move ``-p`` names that belong to the architecture (e.g. matryoshka ``groups``, jumprelu
        ``bandwidth``) from ``variant_params`` to ``arch_params``; names the variant has stay.
        Idempotent; does nothing for an unknown arch or variant (``validate`` reports those)."""
        import dataclasses

        from .archs import arch_names, arch_param_names
        from .variants import variant_names
        from .variants.base import BASELINES, penalty_class

        if self.activation == "jumprelu" and "variant" in self.variant_params:  # JumpReLU's old name
            params = dict(self.variant_params)
            params.setdefault("sparsity_loss", params.pop("variant"))
            self.variant_params = params
        if self.activation not in arch_names() or self.variant not in variant_names() or not self.variant_params:
            return
        own = set() if self.variant in BASELINES else {
            f.name for f in dataclasses.fields(penalty_class(self.variant).Config)}
        mine = arch_param_names(self.activation) - own
        moved = {k: v for k, v in self.variant_params.items() if k in mine}
        if moved:
            self.variant_params = {k: v for k, v in self.variant_params.items() if k not in moved}
            self.arch_params = {**self.arch_params, **moved}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        return d

    def validate(self) -> None:
        """Check every option's type and range before anything is created (no side effects).

        Raises ``ConfigError`` naming the option and its allowed values (``-p`` values included).
        """
        from ..model import check_device
        from ..outputs import check_output_location
        from .archs import arch_names, make_arch_config
        from .variants import make_config

        def integer(option: str, value: Any, lo: int = 1) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ConfigError(f"{option} {value!r} must be an integer >= {lo}")

        def number(option: str, value: Any, lo: float = 0.0, hi: float = math.inf, lo_open: bool = False,
                   hi_open: bool = False) -> None:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            ok = ok and (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
            if not ok:
                rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"
                raise ConfigError(f"{option} {value!r} must be a finite number in {rng}")

        if not isinstance(self.store, str) or not self.store:
            raise ConfigError("--store must name a store path or URL (e.g. --store acts.zarr)")
        if not isinstance(self.storage_options, dict):
            raise ConfigError("storage_options must be a table of fsspec options")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite are exclusive: pick one")
        if self.arch is not None and self.arch not in arch_names():
            raise ConfigError(f"--arch {self.arch!r}: choose one of {', '.join(arch_names())}")
        self.route_params()
        make_config(self.variant, self.variant_params)  # unknown variant / parameter, type, range
        make_arch_config(self.activation, self.arch_params)
        if self.d_sae is not None:
            integer("--d-sae", self.d_sae)
        integer("--expansion", self.expansion)
        integer("--k", self.k)
        if self.d_sae is not None and self.activation == "topk" and self.k > self.d_sae:
            raise ConfigError(f"--k {self.k} must be at most --d-sae {self.d_sae}")
        number("--l1-coefficient", self.l1_coefficient)
        number("l1_warmup_frac", self.l1_warmup_frac, 0, 1)
        number("--lr", self.lr, 0, lo_open=True)
        integer("lr_warmup_steps", self.lr_warmup_steps, 0)
        number("lr_decay_frac", self.lr_decay_frac, 0, 1)
        if len(tuple(self.adam_betas)) != 2:
            raise ConfigError(f"adam_betas {self.adam_betas!r} must be two numbers in [0, 1)")
        for b in self.adam_betas:
            number("adam_betas", b, 0, 1, hi_open=True)
        integer("--tokens", self.tokens)
        integer("--batch-size", self.batch_size)
        if self.tokens < self.batch_size:
            raise ConfigError(f"--tokens {self.tokens} is less than one batch of --batch-size {self.batch_size}")
        number("aux_k_coefficient", self.aux_k_coefficient)
        if self.aux_k is not None:
            integer("aux_k", self.aux_k)
        integer("dead_tokens", self.dead_tokens)
        integer("mix_chunks", self.mix_chunks)
        integer("--read-workers", self.read_workers, 0)
        if self.autocast not in ("none", "bf16"):
            raise ConfigError(f"--autocast {self.autocast!r}: choose none or bf16")
        integer("--seed", self.seed, 0)
        if self.init_seed is not None:
            integer("--init-seed", self.init_seed, 0)
        self._check_init_from()
        integer("--log-every", self.log_every)
        integer("--checkpoint-every", self.checkpoint_every)
        number("--checkpoint-minutes", self.checkpoint_minutes, 0, lo_open=True)
        if not isinstance(self.normalize, bool):
            raise ConfigError(f"normalize {self.normalize!r} must be true or false")
        check_device(self.device)
        check_output_location(self.out, "--out")
        if self.cache is not None:
            check_output_location(self.cache, "--cache")

    def _check_init_from(self) -> None:
        if self.init_from is not None:
            src = Path(self.init_from)
            if not ((src / "sae_weights.safetensors").is_file() and (src / "cfg.json").is_file()):
                raise ConfigError(f"--init-from {src}: no sae_weights.safetensors + cfg.json there; give the run "
                                  "directory of a finished SAE (`sae import` converts other libraries' files)")

    def run_settings(self) -> dict[str, Any]:
        """Every setting that changes the trained weights (``--resume`` refuses a change of any),
        with the variant's parameters completed by their defaults and the resolved base activation."""
        import dataclasses

        from .archs import make_arch_config
        from .variants import make_config

        d = {k: v for k, v in self.to_dict().items() if k not in NON_RUN_KEYS}
        d["arch"] = self.activation
        d["variant_params"] = dataclasses.asdict(make_config(self.variant, self.variant_params))
        d["arch_params"] = dataclasses.asdict(make_arch_config(self.activation, self.arch_params))
        return d

    @classmethod
    def from_toml(cls, path: str | Path, **overrides: Any) -> TrainConfig:
        """Read a TOML file: top-level keys are fields; a ``[variant_params]`` table (or a table
        named after the variant) gives penalty hyperparameters.

        Precedence: ``overrides`` (the options given explicitly on the command line) > the file >
        the defaults. Unknown keys or tables, and syntax errors, raise ``ConfigError`` naming the
        file and the line.
        """
        data, _tables = read_toml(path, overrides.get("variant"))
        params = dict(data.pop("variant_params", {}))
        arch_params = dict(data.pop("arch_params", {}))
        variant = overrides.get("variant") or data.get("variant", "none")
        own = data.get(variant)
        if isinstance(own, dict):
            params.update(own)
        kw = {k: v for k, v in data.items() if not isinstance(v, dict)}
        kw.update({k: v for k, v in overrides.items() if k != "variant_params"})
        kw["variant_params"] = {**params, **overrides.get("variant_params", {})}
        kw["arch_params"] = {**arch_params, **overrides.get("arch_params", {})}
        if isinstance(kw.get("adam_betas"), list):
            kw["adam_betas"] = tuple(kw["adam_betas"])
        return cls(**kw)


def _line_of(text: str, key: str | None, table: str | None = None) -> int:
    """1-based line where ``key`` (or the header of ``table`` when key is None) is defined; 0 if not found."""
    lines = text.splitlines()
    start = 0
    if table is not None:
        pat = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]")
        start = next((i for i, ln in enumerate(lines) if pat.match(ln)), -1)
        if key is None:
            return start + 1
        start = max(start + 1, 0)
    pat = re.compile(rf"^\s*[\"']?{re.escape(str(key))}[\"']?\s*=")
    for i in range(start, len(lines)):
        if table is None and lines[i].lstrip().startswith("["):
            break
        if pat.match(lines[i]):
            return i + 1
    return 0


def read_toml(path: str | Path, variant: str | None = None) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Parse and check a training TOML file; return ``(data, variant_tables)``.

    Allowed: top-level keys naming :class:`TrainConfig` fields; a ``[variant_params]`` table (for the
    selected variant); one table per variant name (``[adaptive]``, ``[ortsae]``...; a sweep uses each);
    a ``[log]`` table of experiment trackers (read by :meth:`sae.tracking.TrackingConfig.parse`).
    Raises ``ConfigError`` (file and line) for a missing file, a syntax error, an unknown key or table,
    or a parameter its variant does not have.
    """
    from .variants import make_config, variant_names

    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError(f"--config {p}: cannot read it ({e.strerror or e})") from e
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {p}: TOML syntax error: {e}") from e
    names = {f.name for f in fields(TrainConfig)} - {"variant_params", "arch_params", "resume", "overwrite",
                                                     "storage_options"}
    known_variants = set(variant_names())
    tables: dict[str, dict[str, Any]] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            if key == "log":  # experiment trackers (tracking.TrackingConfig.parse), not a training option
                continue
            if key not in ("variant_params", "arch_params") and key not in known_variants:
                raise ConfigError(f"--config {p}, line {_line_of(text, None, key)}: unknown table [{key}] "
                                  f"(use [variant_params] or one of [{'], ['.join(sorted(known_variants))}])")
            tables[key] = value
        elif key not in names:
            raise ConfigError(f"--config {p}, line {_line_of(text, key)}: unknown training option {key!r}")
    selected = variant or data.get("variant", "topk")
    arch_table = tables.pop("arch_params", None)
    if arch_table is not None and isinstance(data.get("arch"), str):  # else the arch comes from the CLI
        from .archs import make_arch_config

        try:
            make_arch_config(data["arch"], arch_table)
        except ConfigError as e:
            raise ConfigError(f"--config {p}, line {_line_of(text, None, 'arch_params')}: [arch_params] {e}") from e
    for key, table in tables.items():
        owner = selected if key == "variant_params" else key
        try:
            make_config(owner, table)
        except ConfigError as e:
            bad = next((k for k in table if repr(k) in str(e) or f"-p {k}=" in str(e)), None)
            line = _line_of(text, bad, key) if bad else _line_of(text, None, key)
            raise ConfigError(f"--config {p}, line {line}: [{key}] {e}") from e
    return data, {k: v for k, v in tables.items() if k != "variant_params"}
