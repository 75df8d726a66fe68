"""Tokenizer throughput: ours against tiktoken and Hugging Face `tokenizers`, one thread each.

    python bench/tokenizer.py            # about 10 MB of the test corpus
    python bench/tokenizer.py --mb 3 --repeat 5

All three encode the same text with the same vocabulary (ours saves it to a
temporary folder, HF loads it with GPT2TokenizerFast.from_pretrained, tiktoken
builds its encoding from the same encoder.json and vocab.bpe) and must agree
on every id. Timings are the best of --repeat runs, so a busy machine hurts
less; ours is also timed on its first pass, with an empty word cache.
"""

from __future__ import annotations

import os

# One thread each: set before tokenizers (Rust, rayon) is imported.
os.environ["RAYON_NUM_THREADS"] = "1"
os.environ["RAYON_RS_NUM_CPUS"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("TIKTOKEN_CACHE_DIR", "")  # read the local files, write no cache

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def build_oracles(folder: Path):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers import GPT2TokenizerFast

    ranks = data_gym_to_mergeable_bpe_ranks(str(folder / "vocab.bpe"),
                                            str(folder / "encoder.json"))
    tik = tiktoken.Encoding("gpt2-local", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                            special_tokens={"<|endoftext|>": 50256}, explicit_n_vocab=50257)
    hf = GPT2TokenizerFast.from_pretrained(folder).backend_tokenizer
    return tik, hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=10.0, help="corpus size in MB of UTF-8")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best)")
    args = parser.parse_args()

    from corpus import build_corpus
    from gpt2.tokenizer import Tokenizer

    text = build_corpus(int(args.mb * 1e6 / 1.39))  # the corpus averages ~1.39 bytes/char
    # HF would read this text as the special token; the others as plain text
    text = text.replace("<|endoftext|>", "<|end of text|>")
    mb = len(text.encode("utf-8")) / 1e6
    lines = text.splitlines(keepends=True)
    print(f"corpus: {mb:.1f} MB, {len(text):,} characters, {len(lines):,} lines; "
          f"best of {args.repeat}; one thread each")

    with tempfile.TemporaryDirectory() as tmp:
        Tokenizer.from_pretrained().save_pretrained(tmp)
        tik, hf = build_oracles(Path(tmp))

    ours = Tokenizer.from_pretrained()
    start = time.perf_counter()
    ids = ours.encode(text)
    cold = time.perf_counter() - start
    assert ids == tik.encode_ordinary(text), "ours and tiktoken disagree"
    hf_ids = hf.encode(text, add_special_tokens=False).ids
    assert ids == hf_ids, "ours and HF tokenizers disagree"

    encoders = {
        "ours": (lambda: ours.encode(text), lambda: [ours.encode(s) for s in lines]),
        "tiktoken": (lambda: tik.encode_ordinary(text),
                     lambda: [tik.encode_ordinary(s) for s in lines]),
        "hf tokenizers": (lambda: hf.encode(text, add_special_tokens=False),
                          lambda: [hf.encode(s, add_special_tokens=False) for s in lines]),
    }
    decoders = {
        "ours": lambda: ours.decode(ids),
        "tiktoken": lambda: tik.decode(ids),
        "hf tokenizers": lambda: hf.decode(ids, skip_special_tokens=False),
    }
    rows = {}
    for name, (whole, per_line) in encoders.items():
        rows[name] = (mb / best_time(whole, args.repeat), mb / best_time(per_line, args.repeat),
                      mb / best_time(decoders[name], args.repeat))

    print(f"\n{'MB/s':<16}{'whole text':>12}{'short lines':>13}{'decode':>10}")
    for name, (w, s, d) in rows.items():
        print(f"{name:<16}{w:>12.2f}{s:>13.2f}{d:>10.1f}")
    print(f"{'ours, cold':<16}{mb / cold:>12.2f}   (first pass, empty word cache)")
    ow, os_, od = rows["ours"]
    for ref in ("tiktoken", "hf tokenizers"):
        w, s, d = rows[ref]
        print(f"ours / {ref:<14} whole {ow / w:5.0%}   lines {os_ / s:5.0%}   "
              f"decode {od / d:5.0%}")


if __name__ == "__main__":
    main()
