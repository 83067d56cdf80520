"""Import every variant module so that each registers itself (add new variants here)."""

import importlib

VARIANT_MODULES = ("topk_pairs", "adaptive", "progressive", "temporal", "static_ortho", "ortsae")

for _name in VARIANT_MODULES:
    try:
        importlib.import_module(f"{__package__}.{_name}")
    except ModuleNotFoundError as e:  # a variant module not written yet
        if e.name != f"{__package__}.{_name}":
            raise
