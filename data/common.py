"""What every data/*/prepare.py shares: fetching the source text, tokenizers, and writing token memmaps.

A prepared dataset is a folder with train.bin and val.bin (flat arrays of token ids) and meta.json,
which names the tokenizer and the id dtype so train.py and sample.py can rebuild both.
"""
import json
import os
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm


def fetch_text(url, input_path, dest):
    """Path of the source text: --input if given, else dest if already there, else download url to dest."""
    if input_path:
        if not os.path.isfile(input_path):
            raise SystemExit(f"error: --input {input_path}: no such file")
        return input_path
    if os.path.isfile(dest):
        return dest
    print(f"downloading {url}")
    try:
        urllib.request.urlretrieve(url, dest + ".tmp")
    except (urllib.error.URLError, OSError) as e:
        raise SystemExit(f"error: could not download {url} ({getattr(e, 'reason', e)}); "
                         f"fetch it elsewhere and pass --input PATH") from None
    os.replace(dest + ".tmp", dest)
    return dest


# ---------------------------------------------------------------------------------------------------
# Tokenizers: a meta dict describes one; tokenizer_from_meta rebuilds (encode, decode) from it.

def char_meta(text):
    return {"tokenizer": "char", "vocab_size": len(set(text)), "itos": sorted(set(text))}


def gpt2_meta():
    return {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256}


def hf_meta(path):
    """A Hugging Face tokenizer.json (e.g. an imported LLaMA's), embedded whole so checkpoints carry it."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise SystemExit(f"error: no tokenizer.json at {path}")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SystemExit("error: a Hugging Face tokenizer needs the tokenizers package: pip install tokenizers") from None
    with open(file, encoding="utf-8") as f:
        text = f.read()
    tok = Tokenizer.from_str(text)
    eos = next((tok.token_to_id(t) for t in ("</s>", "<|endoftext|>", "<|end_of_text|>") if tok.token_to_id(t) is not None), None)
    return {"tokenizer": "hf", "vocab_size": tok.get_vocab_size(), "eot": eos, "tokenizer_json": text}


def bpe_meta(name):
    """--tokenizer: 'gpt2' (tiktoken) or 'hf:PATH' (the tokenizer.json of an imported model)."""
    if name == "gpt2":
        return gpt2_meta()
    if name.startswith("hf:"):
        return hf_meta(name[3:])
    raise SystemExit(f"error: --tokenizer {name!r}: expected gpt2 or hf:PATH")


def tokenizer_from_meta(meta):
    """(encode: str -> list[int], decode: list[int] -> str) for a dataset's meta."""
    kind = meta.get("tokenizer")
    if kind == "char":
        itos = meta["itos"]
        stoi = {ch: i for i, ch in enumerate(itos)}

        def encode(s):
            unknown = sorted(set(s) - stoi.keys())
            if unknown:
                raise ValueError(f"characters not in the model's vocabulary: {''.join(unknown)!r}")
            return [stoi[c] for c in s]
        return encode, lambda ids: "".join(itos[i] for i in ids)
    if kind == "gpt2":
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
        return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode
    if kind == "hf":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(meta["tokenizer_json"])

        def encode(s):  # documents separated by <|endoftext|> get the tokenizer's end-of-text id
            ids = []
            for i, doc in enumerate(s.split("<|endoftext|>")):
                ids += ([meta["eot"]] if i and meta["eot"] is not None else []) + tok.encode(doc, add_special_tokens=False).ids
            return ids
        return encode, lambda ids: tok.decode(ids, skip_special_tokens=False)
    raise ValueError(f"unknown tokenizer {kind!r} in dataset meta")


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
                raise SystemExit(f"error: token id {ids.max()} does not fit the vocabulary of {vocab_size}")
            f.write(ids.astype(dtype).tobytes())
            n += ids.size
    os.replace(path + ".tmp", path)
    return n


def chunked(text, size=1 << 20):
    return [text[i:i + size] for i in range(0, len(text), size)]


def write_dataset(out_dir, meta, train_chunks, val_chunks):
    """Write train.bin, val.bin and meta.json (with the id dtype) into out_dir."""
    encode, _ = tokenizer_from_meta(meta)
    meta = dict(meta, dtype=np.dtype(id_dtype(meta["vocab_size"])).name)
    for split, chunks in (("train", train_chunks), ("val", val_chunks)):
        n = write_tokens(chunks, encode, os.path.join(out_dir, f"{split}.bin"), meta["vocab_size"])
        print(f"{split}: {n:,} tokens")
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
    print(f"wrote {out_dir}/train.bin, val.bin, meta.json (tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']})")


def prepare_split_text(url, input_path, out_dir, make_meta):
    """Tiny Shakespeare style: one text file, first 90% train, last 10% val."""
    with open(fetch_text(url, input_path, os.path.join(out_dir, "input.txt")), encoding="utf-8") as f:
        text = f.read()
    if not text:
        raise SystemExit("error: the input text is empty")
    print(f"{len(text):,} characters")
    n = int(0.9 * len(text))
    write_dataset(out_dir, make_meta(text), chunked(text[:n]), chunked(text[n:]))


def parse_args(argv, default_out_dir, bpe=False):
    """The prepare scripts' flags: --input PATH (a local copy of the source), --out_dir DIR (where to write),
    and for BPE datasets --tokenizer. Returns (input, out_dir) or, with bpe, (input, out_dir, meta)."""
    import argparse
    p = argparse.ArgumentParser(description="Prepare a dataset (downloads its source unless --input is given).")
    p.add_argument("--input", help="local copy of the source, for offline machines")
    p.add_argument("--out_dir", default=default_out_dir, help="where train.bin, val.bin, meta.json go")
    if bpe:
        p.add_argument("--tokenizer", default="gpt2", help="gpt2, or hf:PATH for an imported model's tokenizer.json")
    args = p.parse_args(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    return (args.input, args.out_dir, bpe_meta(args.tokenizer)) if bpe else (args.input, args.out_dir)
