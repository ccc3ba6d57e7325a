"""What every data/*/prepare.py shares: fetching the source text, its flags, and writing token memmaps.

A prepared dataset is a folder with train.bin and val.bin (flat arrays of token ids) and meta.json,
which names the tokenizer (echo/tokenizer.py) and the id dtype so train.py and sample.py can rebuild both.
Each prepare.py runs its main through configurator.run_main: bad input is one line.
"""
import gzip
import json
import os
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm

from echo.tokenizer import bpe_meta, tokenizer_from_meta
from model import UsageError


# Tiny Shakespeare ships with the repository (public domain, 1,115,394 characters, gzip -9), so the main
# job needs no network.
TINY_SHAKESPEARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinyshakespeare.txt.gz")


def fetch_text(url, input_path, dest, embedded=None):
    """Path of the source text: --input if given, else dest if already there, else the copy embedded in the
    repository (unpacked to dest), else download url to dest."""
    if input_path:
        if not os.path.isfile(input_path):
            raise UsageError(f"--input {input_path}: no such file")
        return input_path
    if os.path.isfile(dest):
        return dest
    if embedded and os.path.isfile(embedded):
        with gzip.open(embedded, "rb") as f, open(dest + ".tmp", "wb") as out:
            out.write(f.read())
        os.replace(dest + ".tmp", dest)
        return dest
    print(f"downloading {url}")
    try:
        urllib.request.urlretrieve(url, dest + ".tmp")
    except (urllib.error.URLError, OSError) as e:
        raise UsageError(f"could not download {url} ({getattr(e, 'reason', e)}); "
                         f"fetch it elsewhere and pass --input PATH") from None
    os.replace(dest + ".tmp", dest)
    return dest


# ---------------------------------------------------------------------------------------------------
# Writing tokens

def id_dtype(vocab_size):
    """The smallest unsigned dtype that holds every id of the vocabulary."""
    return np.uint16 if vocab_size <= 2 ** 16 else np.uint32


def write_tokens(chunks, encode, path, vocab_size):
    """Encode text chunks one by one (a progress bar over them) and append the ids to a flat file.
    Returns the number of tokens. An id outside the vocabulary is an error, never a wrap-around."""
    dtype = id_dtype(vocab_size)
    n = 0
    with open(path + ".tmp", "wb") as f:
        for chunk in tqdm(chunks, desc=os.path.basename(path), unit="chunk", leave=False):
            ids = np.asarray(encode(chunk), dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise UsageError(f"token id {ids.max()} does not fit the vocabulary of {vocab_size}")
            f.write(ids.astype(dtype).tobytes())
            n += ids.size
    os.replace(path + ".tmp", path)
    return n


def chunked(text, size=1 << 20):
    return [text[i:i + size] for i in range(0, len(text), size)]


def write_dataset(out_dir, meta, splits):
    """Write {split}.bin for each of splits ({"train": text chunks, "val": ...}; an evaluation-only dataset
    has only "val") and meta.json (with the id dtype) into out_dir."""
    encode, _ = tokenizer_from_meta(meta)
    meta = dict(meta, dtype=np.dtype(id_dtype(meta["vocab_size"])).name, splits=list(splits))
    try:
        for split, chunks in splits.items():
            n = write_tokens(chunks, encode, os.path.join(out_dir, f"{split}.bin"), meta["vocab_size"])
            if n < 2:
                raise UsageError(f"the {split} split has {n} tokens: the text is too short to train on")
            print(f"{split}: {n:,} tokens")
        with open(os.path.join(out_dir, "meta.json"), "w") as f:
            json.dump(meta, f)
    except OSError as e:
        raise UsageError(f"cannot write to {out_dir} ({e.strerror})") from None
    print(f"wrote {out_dir}/{'.bin, '.join(splits)}.bin, meta.json (tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']})")


def read_text(path):
    """A UTF-8 text file, or one clear line."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (byte {e.start}); convert it first, "
                         f"e.g. iconv -t utf-8") from None
    except OSError as e:
        raise UsageError(f"cannot read {path} ({e.strerror})") from None


def prepare_split_text(url, input_path, out_dir, make_meta):
    """Tiny Shakespeare style: one text file, first 90% train, last 10% val."""
    text = read_text(fetch_text(url, input_path, os.path.join(out_dir, "input.txt"), TINY_SHAKESPEARE))
    if not text:
        raise UsageError("the input text is empty")
    print(f"{len(text):,} characters")
    n = int(0.9 * len(text))
    write_dataset(out_dir, make_meta(text), {"train": chunked(text[:n]), "val": chunked(text[n:])})


def parse_args(argv, default_out_dir, bpe=False):
    """The prepare scripts' flags: --input PATH (a local copy of the source), --out_dir DIR (where to write),
    and for BPE datasets --tokenizer. Returns (input, out_dir) or, with bpe, (input, out_dir, meta)."""
    import argparse
    p = argparse.ArgumentParser(description="Prepare a dataset (downloads its source unless --input is given).")
    p.add_argument("--input", help="local copy of the source, for offline machines")
    p.add_argument("--out_dir", default=default_out_dir, help="where train.bin, val.bin, meta.json go")
    if bpe:
        p.add_argument("--tokenizer", default="gpt2", help="gpt2, hf:DIR (an imported model's tokenizer.json) or gguf:FILE")
    args = p.parse_args(argv)
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UsageError(f"--out_dir {args.out_dir} exists and is not a folder")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create --out_dir {args.out_dir} ({e.strerror})") from None
    return (args.input, args.out_dir, bpe_meta(args.tokenizer)) if bpe else (args.input, args.out_dir)
