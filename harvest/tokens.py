"""Tokenise documents and pack them into fixed-length sequences that start with BOS."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np


def pack_sequences(texts: Iterable[str], tokenizer: Any, context_size: int,
                   bos_token_id: int) -> Iterator[np.ndarray]:
    """Yield int32 sequences ``[context_size]``: ``BOS`` + the next ``context_size - 1`` tokens.

    Documents are tokenised without special tokens and concatenated with a BOS token between
    consecutive documents (the packing convention of Gemma pre-training); a sequence never starts
    with two BOS tokens. The trailing partial sequence is dropped.
    """
    if context_size < 2:
        raise ValueError("context_size must be at least 2 (BOS + one token)")
    body = context_size - 1
    buf: list[int] = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids:
            continue
        if buf:
            buf.append(bos_token_id)
        buf.extend(ids)
        while len(buf) >= body:
            yield np.asarray([bos_token_id, *buf[:body]], dtype=np.int32)
            buf = buf[body:]
            if buf and buf[0] == bos_token_id:
                buf = buf[1:]
