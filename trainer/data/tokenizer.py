"""Tokenizers: byte-level, any tokenizers-library tokenizer (a tokenizer.json, an AutoTokenizer's
Rust backend), or a byte-level BPE trained here on the corpus.

Every tokenizer encodes a batch of documents at once and adds no special tokens: the packer puts
the end-of-document token between documents itself. ``name`` identifies the tokenizer's exact
behaviour for the cache key (a hash of its JSON), so two spellings of one tokenizer share a cache
entry and an edited tokenizer never reads another's tokens.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from trainer.config import DataConfig
from trainer.errors import ConfigError

if TYPE_CHECKING:
    from tokenizers import Tokenizer as RustTokenizer

Text = str | bytes
"""A document: str, or bytes for files read raw (the byte tokenizer keeps them exact)."""

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
TRAINED_EOS = "<|endoftext|>"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (half the disk and page cache), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class Tokenizer(Protocol):
    """What the packer and the token cache need of a tokenizer."""

    name: str
    eos_id: int
    vocab_size: int

    def encode_batch(self, texts: Sequence[Text]) -> list[np.ndarray]:
        """Each text's token ids, with no special tokens added."""

    def to_json(self) -> str | None:
        """The tokenizer.json to keep with the tokens, or None when there is nothing to keep."""


class ByteTokenizer:
    """256 byte values plus an end-of-document token: nothing to train, nothing to load."""

    name = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode(self, data: Text) -> np.ndarray:
        """The text's UTF-8 bytes (bytes as they are) as uint8 token ids."""
        # surrogateescape: text read with errors="surrogateescape" gives back its exact bytes
        raw = data if isinstance(data, bytes) else data.encode("utf-8", errors="surrogateescape")
        return np.frombuffer(raw, dtype=np.uint8)

    def encode_batch(self, texts: Sequence[Text]) -> list[np.ndarray]:
        """:meth:`encode` of each text."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``: the end-of-document token dropped, invalid UTF-8 replaced."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_json(self) -> None:
        """None: there is no file to keep."""
        return None

    def to_tokenizers(self) -> RustTokenizer:
        """The same ids as a tokenizers-library tokenizer, for a Hugging Face export: a BPE without merges
        over GPT-2's 256 byte-level symbols (symbol of byte ``b`` = id ``b``), no pre-tokenizer splitting,
        a byte-level decoder, and :data:`TRAINED_EOS` as the special token :attr:`eos_id`."""
        from tokenizers import Tokenizer as RustTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        vocab = {symbol: byte for byte, symbol in byte_symbols().items()}
        tokenizer = RustTokenizer(models.BPE(vocab=vocab, merges=[]))
        # no regex: one text is one word, so no byte is ever moved, merged or dropped
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tokenizer.decoder = decoders.ByteLevel()
        tokenizer.add_special_tokens([TRAINED_EOS])
        assert tokenizer.token_to_id(TRAINED_EOS) == self.eos_id
        return tokenizer


def byte_symbols() -> dict[int, str]:
    """GPT-2's printable symbol of each byte value (its ``bytes_to_unicode``), as tokenizers' ByteLevel
    pre-tokenizer writes bytes: printable Latin-1 bytes stand for themselves, the rest for 256 onwards."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    moved = [byte for byte in range(256) if byte not in kept]
    symbols = {byte: chr(byte) for byte in kept}
    symbols.update({byte: chr(256 + n) for n, byte in enumerate(moved)})
    return symbols


class HFTokenizer:
    """A tokenizers-library (Rust) tokenizer. Its encode_batch runs on every core by itself."""

    def __init__(self, tokenizer: object, eos_id: int, original: str | None = None) -> None:
        from tokenizers import Tokenizer as RustTokenizer

        assert isinstance(tokenizer, RustTokenizer)
        canonical = tokenizer.to_str()
        # The key hashes the canonical form, so a file and a folder holding one tokenizer share it.
        self.name = f"tokenizers-{hashlib.sha256(canonical.encode()).hexdigest()[:16]}-eos{eos_id}"
        self.json = original or canonical
        """What is saved with the tokens and into the run folder: the user's file as they wrote it."""
        # A tokenizer.json may carry truncation or padding settings; packing must see whole documents.
        tokenizer.no_truncation()
        tokenizer.no_padding()
        self.tokenizer = tokenizer
        self.eos_id = eos_id
        self.vocab_size = max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1
        self.dtype = token_dtype(self.vocab_size)

    def encode_batch(self, texts: Sequence[Text]) -> list[np.ndarray]:
        """Each text's token ids (bytes read as UTF-8) as uint16 or uint32 arrays, no special tokens added."""
        strings = [t.decode("utf-8", errors="replace") if isinstance(t, bytes) else t for t in texts]
        # encode_batch_fast skips character offsets, which packing never needs
        encodings = self.tokenizer.encode_batch_fast(strings, add_special_tokens=False)
        return [np.array(encoding.ids, dtype=self.dtype) for encoding in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        """The text of ``ids``, special tokens included."""
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=False))

    def to_json(self) -> str:
        """The tokenizer.json to keep: the user's file as written, else the canonical form."""
        return self.json


def _eos_id(vocab: dict[str, int], wanted: str | None, own: str | None, spec: str) -> int:
    if wanted is not None:
        if wanted not in vocab:
            raise ConfigError(
                f"data.eos_token={wanted} is not in the vocabulary of data.tokenizer={spec}; name one of its "
                "tokens, or remove data.eos_token to use the tokenizer's own"
            )
        return vocab[wanted]
    for candidate in (own, *EOS_CANDIDATES):
        if candidate is not None and candidate in vocab:
            return vocab[candidate]
    raise ConfigError(
        f"data.tokenizer={spec} has no end-of-document token (none of {', '.join(EOS_CANDIDATES)}); "
        "set data.eos_token to the token that ends a document"
    )


def _from_file(path: Path, cfg: DataConfig) -> HFTokenizer:
    from tokenizers import Tokenizer as RustTokenizer

    try:
        tokenizer = RustTokenizer.from_file(str(path))
    except Exception as err:  # the Rust side reports a bad file as a plain Exception
        raise ConfigError(
            f"data.tokenizer={path} is not a valid tokenizer.json ({str(err).splitlines()[0]}); "
            "point it at a file saved with tokenizers' Tokenizer.save"
        ) from None
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    original = path.read_text(encoding="utf-8")
    return HFTokenizer(tokenizer, _eos_id(vocab, cfg.eos_token, None, str(path)), original)


def _from_transformers(spec: str, cfg: DataConfig) -> HFTokenizer:
    from transformers import AutoTokenizer

    try:
        auto = AutoTokenizer.from_pretrained(spec)
    except Exception as err:  # transformers raises OSError, ValueError or hub errors here
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("TRANSFORMERS_OFFLINE") == "1"
        hint = (
            "it is neither a local folder nor in the local Hugging Face cache, and HF_HUB_OFFLINE=1 forbids "
            "downloading it; run once with network access, or pass a folder or a tokenizer.json path"
            if offline
            else "pass bytes, train, a tokenizer.json path, a folder saved with save_pretrained, or a hub name"
        )
        raise ConfigError(
            f"data.tokenizer={spec} cannot be loaded ({str(err).splitlines()[0][:200]}); {hint}"
        ) from None
    backend = getattr(auto, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"data.tokenizer={spec} has no tokenizers-library (Rust) backend; save it with a tokenizer.json "
            "(transformers converts most tokenizers) and pass that"
        )
    vocab = backend.get_vocab(with_added_tokens=True)
    return HFTokenizer(backend, _eos_id(vocab, cfg.eos_token, getattr(auto, "eos_token", None), spec))


def load_tokenizer(cfg: DataConfig) -> ByteTokenizer | HFTokenizer | None:
    """The configured tokenizer; None for data.tokenizer=train, which only exists once trained.

    Raises:
        ConfigError: a tokenizer.json that is missing or invalid, a tokenizer that cannot be loaded or
            has no tokenizers-library backend, or no usable end-of-document token.
    """
    spec = cfg.tokenizer
    if spec == "bytes":
        return ByteTokenizer()
    if spec == "train":
        return None
    path = Path(spec).expanduser()
    if path.is_file():
        return _from_file(path, cfg)
    if spec.endswith(".json"):
        raise ConfigError(f"data.tokenizer={spec} does not exist; pass the path of a tokenizer.json")
    return _from_transformers(spec, cfg)


def train_identity(cfg: DataConfig) -> str:
    """What a trained tokenizer depends on besides the corpus (which the cache key covers)."""
    return f"train-bytelevel-bpe-v1-{cfg.vocab_size}"


def train_bpe(texts: Iterable[list[str]], vocab_size: int) -> HFTokenizer:
    """A GPT-2-style byte-level BPE learned from batches of documents: every string round-trips.

    tokenizers' trainer is deterministic, so every node that trains on the same corpus gets the
    same tokenizer.
    """
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = RustTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TRAINED_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    eos_id = tokenizer.token_to_id(TRAINED_EOS)
    assert eos_id is not None
    return HFTokenizer(tokenizer, eos_id)
