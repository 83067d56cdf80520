"""Import every architecture module so that each registers itself, in the order ``--arch`` lists them."""

import importlib

ARCH_MODULES = ("topk", "relu", "batchtopk", "jumprelu", "matryoshka")

for _name in ARCH_MODULES:
    importlib.import_module(f"{__package__}.{_name}")
