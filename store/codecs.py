"""Storage precisions and compressors for activation arrays.

``--codec`` values:

* ``zstd`` (default): lossless; Blosc(zstd, level 3, bitshuffle) on the requested dtype.
* ``none``: uncompressed (fastest reads; SAELens-style raw cache, but in the requested dtype).
* ``bitround:K``: lossy; float32 with numcodecs ``BitRound(keepbits=K)`` (K mantissa bits kept)
  then Blosc(zstd, bitshuffle): zeroed low mantissa bits compress.
* ``int8``: lossy; per-row symmetric int8 (``q = round(127 x / max|x|)``) + float32 row scale.
* ``fp8``: lossy; per-row float8 e4m3 (``x / s`` with ``s = max|x| / 448``) + float32 row scale.

bfloat16 has no Zarr dtype: it is stored as its raw ``uint16`` bit pattern (documented in the
store attributes as ``storage_dtype = "uint16"``, ``dtype = "bfloat16"``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from zarr.codecs import BitRound, BloscCodec, Crc32cCodec

# BitRound is a numcodecs codec outside the Zarr v3 core spec; zarr warns on every open. Documented.
warnings.filterwarnings("ignore", message="Numcodecs codecs are not in the Zarr version 3 specification")

_FP8_MAX = 448.0  # largest finite float8_e4m3fn


@dataclass(frozen=True)
class CodecSpec:
    """A parsed ``--codec`` value together with the logical dtype of the activations."""

    name: str  # zstd | none | bitround | int8 | fp8
    dtype: str  # logical dtype: bfloat16 | float16 | float32
    keepbits: int = 0

    @classmethod
    def parse(cls, codec: str, dtype: str = "bfloat16") -> CodecSpec:
        """Parse ``codec`` (see module doc). Raises ``ValueError`` naming the valid choices."""
        if dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"unknown dtype {dtype!r}: choose bfloat16, float16 or float32")
        name, _, arg = codec.partition(":")
        if name in ("zstd", "none", "int8", "fp8") and not arg:
            return cls(name, dtype)
        if name == "bitround" and arg.isdigit() and 1 <= int(arg) <= 23:
            return cls(name, "float32", int(arg))
        raise ValueError(f"unknown codec {codec!r}: choose zstd, none, bitround:K (1<=K<=23), int8 or fp8")

    def __str__(self) -> str:
        return f"bitround:{self.keepbits}" if self.name == "bitround" else self.name

    @property
    def has_scale(self) -> bool:
        return self.name in ("int8", "fp8")

    @property
    def storage_dtype(self) -> str:
        """NumPy dtype of the stored array."""
        if self.name == "int8":
            return "int8"
        if self.name == "fp8":
            return "uint8"
        return {"bfloat16": "uint16", "float16": "float16", "float32": "float32"}[self.dtype]

    def zarr_kwargs(self, checksum: bool = True) -> dict:
        """``filters``/``compressors`` arguments for ``zarr.Group.create_array``. With ``checksum``
        (format 2) every chunk ends in Zarr v3's core ``crc32c`` codec: a reader verifies it on
        decode, and its 4 bytes are the chunk's checksum in commits and in the content digest."""
        blosc = BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle")
        crc = [Crc32cCodec()] if checksum else []
        if self.name == "none":
            return {"compressors": crc or None}
        if self.name == "bitround":
            with warnings.catch_warnings():  # "numcodecs codecs are not in the Zarr v3 spec": documented
                warnings.simplefilter("ignore")
                return {"filters": [BitRound(keepbits=self.keepbits)], "compressors": [blosc, *crc]}
        return {"compressors": [blosc, *crc]}

    def encode(self, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """``x``: ``[rows, d]`` float tensor → (stored array, per-row float32 scale or None)."""
        x = x.detach().float().cpu()
        if self.name == "int8":
            scale = x.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            q = torch.round(x / scale[:, None]).clamp(-127, 127).to(torch.int8)
            return q.numpy(), scale.numpy()
        if self.name == "fp8":
            scale = x.abs().amax(dim=1).clamp_min(1e-12) / _FP8_MAX
            q = (x / scale[:, None]).to(torch.float8_e4m3fn).view(torch.uint8)
            return q.numpy(), scale.numpy()
        if self.dtype == "bfloat16":
            return x.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
        return x.to(getattr(torch, self.dtype)).numpy(), None

    def decode(self, stored: np.ndarray, scale: np.ndarray | None = None) -> torch.Tensor:
        """Inverse of :meth:`encode` → float32 tensor ``[rows, d]``."""
        return self.dequantize(*self.as_tensors(stored, scale))

    def as_tensors(self, stored: np.ndarray, scale: np.ndarray | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The stored bytes as tensors without converting them: ``(raw [rows, d], scale [rows] | None)``
        with ``raw`` int8 (int8), uint8 (fp8 bit patterns), bfloat16, float16 or float32. The loader
        ships these to the GPU (1–2 bytes per value instead of 4) and calls :meth:`dequantize` there."""
        raw = torch.from_numpy(np.ascontiguousarray(stored))
        if self.dtype == "bfloat16" and not self.has_scale:
            raw = raw.view(torch.int16).view(torch.bfloat16)
        return raw, (torch.from_numpy(np.asarray(scale, dtype=np.float32)) if self.has_scale else None)

    def dequantize(self, raw: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """``raw`` (from :meth:`as_tensors`, on any device) → float32 ``[rows, d]`` on that device.
        Elementwise, so the result is bit-identical on CPU and GPU and commutes with a row shuffle."""
        if self.name in ("int8", "fp8"):
            if scale is None:
                raise ValueError(f"{self.name} rows need their per-row scale")
            x = raw.float() if self.name == "int8" else raw.view(torch.float8_e4m3fn).float()
            return x * scale[:, None]
        return raw.float()
