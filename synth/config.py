"""Settings of ``sae store synth`` (no heavy imports: the CLI reads its defaults and help here)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError
from ..store.codecs import CodecSpec


@dataclass
class SynthConfig:
    """Settings of ``sae store synth``."""

    config: str = "synthsaebench-cpu"
    """Preset (synthsaebench-16k | synthsaebench-cpu) or a TOML file of SAELens' SyntheticModelConfig."""
    tokens: int = 2_097_152
    """Samples (rows) to write, rounded up to whole sequences of context_size."""
    out: str = "synth.zarr"
    """Output store: a path or a URL (s3://, gs://, file://...)."""
    seed: int = 0
    """Sample-stream seed (the dictionary's own seed is the config's ``seed``)."""
    dtype: str = "float32"
    """Storage dtype: float32 | bfloat16 | float16."""
    codec: str = "zstd"
    """zstd | none | bitround:K | int8 | fp8 (docs/store-format.md)."""
    chunk_tokens: int = 16_384
    """Rows per Zarr chunk (a multiple of context_size)."""
    context_size: int = 128
    """Rows per nominal sequence (rows are independent; the format groups them)."""
    device: str = "cpu"
    """Where the generator runs: cpu | cuda."""
    resume: bool = False
    """Continue an interrupted ``sae store synth`` (only the missing chunks are drawn)."""
    overwrite: bool = False
    """Replace an existing store of ours (built beside it, swapped in atomically)."""
    storage_options: dict = field(default_factory=dict)
    """fsspec options for a remote ``out`` (never written into the store)."""

    def validate(self) -> None:
        """Check every option (no side effects). Raises ``ConfigError`` naming the option."""
        for name in ("tokens", "chunk_tokens", "context_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {v!r} must be a positive integer")
        if self.chunk_tokens % self.context_size:
            raise ConfigError(f"--chunk-tokens {self.chunk_tokens} must be a multiple of --context-size "
                              f"{self.context_size}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"--seed {self.seed!r} must be an integer >= 0")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite are exclusive: pick one")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ConfigError(f"--device {self.device!r}: choose cpu or cuda")
        try:
            CodecSpec.parse(self.codec, self.dtype)
        except ValueError as e:
            raise ConfigError(f"--codec/--dtype: {e}") from e
