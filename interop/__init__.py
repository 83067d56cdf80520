"""Interop with the formats SAE researchers already use: SAELens, sparsify, dictionary_learning
SAEs (read, import, write) and SAELens activation caches (export, import)."""
