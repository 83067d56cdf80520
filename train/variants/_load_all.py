"""Import every variant module so that each registers itself (add new variants here)."""

import importlib

VARIANT_MODULES = ("topk_pairs", "adaptive", "progressive", "temporal", "static_ortho", "ortsae")

for _name in VARIANT_MODULES:
    importlib.import_module(f"{__package__}.{_name}")
