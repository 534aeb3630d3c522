"""Preprocessing throughput: ramp's tokenize-and-pack pipeline against the bare tokenizer.

For the byte tokenizer and a byte-level BPE, measure in one run (so machine noise cancels out of the
ratio):

- raw: the tokenizer's own batch encoding (``encode_batch``) of the whole corpus, already in memory;
- ramp: building the token cache from the files on disk (reading, hashing for the validation split,
  tokenizing, packing with end-of-document tokens, writing), as a run does on a cache miss.

    python -m bench.data                 # the standard library's sources (about 30 MB)
    python bench/data.py --mb 5 --num-proc 1 2 --repeat 1

This is a benchmark, not a test: it asserts nothing and prints tokens/s and the ratio ramp / raw.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sized
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from trainer.config import TextData
from trainer.data import prepare
from trainer.data.sources import batched, stdlib_files
from trainer.data.tokenizer import ByteTokenizer, Text, train_bpe


def write_corpus(folder: Path, megabytes: float) -> list[bytes]:
    """Copy standard-library sources into ``folder`` as .txt files, up to ``megabytes``."""
    texts: list[bytes] = []
    size = 0
    for i, path in enumerate(stdlib_files()):
        if size >= megabytes * 1e6:
            break
        data = path.read_bytes()
        if not data:
            continue
        (folder / f"{i:05d}.txt").write_bytes(data)
        texts.append(data)
        size += len(data)
    return texts


def raw_rate(encode_batch: Callable[[list[Text]], Iterable[Sized]], texts: list[Text]) -> tuple[int, float]:
    """Tokens and seconds of the bare tokenizer over the corpus, in the batches the pipeline sends it."""
    batches = list(batched(texts))
    started = time.perf_counter()
    tokens = sum(len(ids) for batch in batches for ids in encode_batch(batch))
    return tokens, time.perf_counter() - started


def pipeline_rate(corpus: Path, cache: Path, tokenizer: str, num_proc: int) -> tuple[int, float]:
    """Tokens and seconds of ramp building the token cache of ``corpus`` into ``cache``."""
    cfg = TextData(files=str(corpus), tokenizer=tokenizer, num_proc=num_proc, cache_dir=str(cache))
    _, build_entry, _ = prepare(cfg)
    started = time.perf_counter()
    files = build_entry()
    seconds = time.perf_counter() - started
    return files.meta["tokens"]["train"] + files.meta["tokens"]["val"], seconds


def main() -> None:
    """Measure raw and ramp tokens/s for each tokenizer and data.num_proc; print them and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--mb", type=float, default=1e9, help="corpus size in MB (default: all stdlib sources)"
    )
    parser.add_argument("--vocab-size", type=int, default=8192, help="BPE vocabulary")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1], help="data.num_proc values to run")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each measurement; the best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ramp-bench-") as tmp:
        root = Path(tmp)
        corpus = root / "corpus"
        corpus.mkdir()
        raw_bytes = write_corpus(corpus, args.mb)
        strings = [text.decode("utf-8", errors="replace") for text in raw_bytes]
        print(f"corpus: {len(raw_bytes)} documents, {sum(map(len, raw_bytes)) / 1e6:.1f} MB")
        started = time.perf_counter()
        bpe = train_bpe(iter([strings[: len(strings) // 4]]), args.vocab_size)
        print(
            f"trained a {bpe.vocab_size}-token byte-level BPE on a quarter of it "
            f"in {time.perf_counter() - started:.1f} s"
        )
        tokenizer_file = root / "tokenizer.json"
        tokenizer_file.write_text(bpe.to_json())

        encoders: dict[str, Callable[[list[Text]], Iterable[Sized]]] = {
            # the byte tokenizer's encode_batch returns zero-copy views; count the cast to the stored
            # dtype too, the least any byte-level tokenizer must do
            "bytes": lambda batch: [ids.astype(np.uint16) for ids in ByteTokenizer().encode_batch(batch)],
            "bpe": lambda batch: bpe.tokenizer.encode_batch_fast(batch, add_special_tokens=False),
        }
        corpora: dict[str, list[Text]] = {"bytes": list(raw_bytes), "bpe": list(strings)}
        specs = {"bytes": "bytes", "bpe": str(tokenizer_file)}
        print(f"best of {args.repeat}, raw and ramp taking turns so that load from elsewhere hits both")
        print(
            f"\n{'tokenizer':<10} {'num_proc':>8} {'tokens':>12} "
            f"{'raw tok/s':>12} {'ramp tok/s':>12} {'ramp/raw':>9}"
        )
        for name in ("bytes", "bpe"):
            for num_proc in args.num_proc:
                raw_seconds, seconds = float("inf"), float("inf")
                for attempt in range(args.repeat):
                    raw_tokens, raw_time = raw_rate(encoders[name], corpora[name])
                    cache = root / f"cache-{name}-{num_proc}-{attempt}"
                    tokens, ramp_time = pipeline_rate(corpus, cache, specs[name], num_proc)
                    raw_seconds, seconds = min(raw_seconds, raw_time), min(seconds, ramp_time)
                # ramp adds one end-of-document token per document to what the tokenizer returns
                assert tokens == raw_tokens + len(raw_bytes), (tokens, raw_tokens)
                raw_speed, speed = raw_tokens / raw_seconds, tokens / seconds
                print(
                    f"{name:<10} {num_proc:>8} {tokens:>12,} "
                    f"{raw_speed:>12,.0f} {speed:>12,.0f} {speed / raw_speed:>9.2f}"
                )


if __name__ == "__main__":
    main()
