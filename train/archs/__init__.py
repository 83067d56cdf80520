"""SAE architectures (``--arch``): one file each behind :class:`~sae.train.archs.base.Arch`.

``topk`` (Gao et al. 2024), ``relu`` (L1, SAELens "standard"), ``batchtopk`` (Bussmann et al.
2024), ``jumprelu`` (Rajamanoharan et al. 2024; Anthropic 2025 option), ``matryoshka``
(Matryoshka BatchTopK, Bussmann et al. 2025). Every orthogonality penalty composes with every
architecture: the penalty only sees the sparse codes and the decoder.
"""

from .base import (
    ARCHS,
    Arch,
    Encoded,
    Inference,
    arch_class,
    arch_names,
    arch_param_names,
    build_arch,
    make_arch_config,
    register,
)

__all__ = ["ARCHS", "Arch", "Encoded", "Inference", "arch_class", "arch_names", "arch_param_names",
           "build_arch", "make_arch_config", "register"]
