"""Tokenizers. Byte-level needs no training: 256 byte values plus an end-of-document token."""

from __future__ import annotations

import numpy as np


class ByteTokenizer:
    name = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode(self, data: bytes) -> np.ndarray:
        return np.frombuffer(data, dtype=np.uint8)

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")
