"""The activation store: a Zarr v3 group of token-chunked, compressed residual-stream arrays.

:mod:`.format` names the layout, :mod:`.codecs` the storage precisions, :mod:`.writer` writes
(resumably), :mod:`.reader` reads and decodes, :mod:`.loader` streams shuffled training batches.
"""

from .codecs import CodecSpec
from .format import FORMAT_VERSION, StoreError
from .loader import ShuffledBatches
from .reader import ActivationStore
from .writer import ChunkWriter, StoreWriter

__all__ = ["FORMAT_VERSION", "ActivationStore", "ChunkWriter", "CodecSpec", "ShuffledBatches", "StoreError",
           "StoreWriter"]
