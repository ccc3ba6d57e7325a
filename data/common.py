"""What every data/*/prepare.py shares: fetching the source text, tokenizers, and writing token memmaps.

A prepared dataset is a folder with train.bin and val.bin (flat arrays of token ids) and meta.json,
which names the tokenizer and the id dtype so train.py and sample.py can rebuild both.
"""
import gzip
import json
import os
import urllib.error
import urllib.request

import numpy as np
from tqdm import tqdm


# Tiny Shakespeare ships with the repository (public domain, 1,115,394 characters, gzip -9), so the main
# job needs no network.
TINY_SHAKESPEARE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinyshakespeare.txt.gz")


def fetch_text(url, input_path, dest, embedded=None):
    """Path of the source text: --input if given, else dest if already there, else the copy embedded in the
    repository (unpacked to dest), else download url to dest."""
    if input_path:
        if not os.path.isfile(input_path):
            raise SystemExit(f"error: --input {input_path}: no such file")
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
        raise SystemExit(f"error: could not download {url} ({getattr(e, 'reason', e)}); "
                         f"fetch it elsewhere and pass --input PATH") from None
    os.replace(dest + ".tmp", dest)
    return dest


# ---------------------------------------------------------------------------------------------------
# Tokenizers: a meta dict describes one; tokenizer_from_meta rebuilds (encode, decode) from it.

def char_meta(text):
    return {"tokenizer": "char", "vocab_size": len(set(text)), "itos": sorted(set(text))}


def gpt2_meta():
    return {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256, "stop": [50256]}


def hf_meta(path):
    """A Hugging Face tokenizer.json (e.g. an imported LLaMA's), embedded whole so checkpoints carry it."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise SystemExit(f"error: no tokenizer.json at {path}")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise SystemExit("error: a Hugging Face tokenizer needs the tokenizers package: pip install tokenizers") from None
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
        tok = Tokenizer.from_str(text)
    except Exception as e:  # not UTF-8, not JSON, or not a tokenizer the library understands
        raise SystemExit(f"error: {file} is not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None

    def first_id(names):
        return next((tok.token_to_id(t) for t in names if tok.token_to_id(t) is not None), None)
    # LLaMA models are trained with a beginning-of-sequence token before every document: give them one
    meta = {"tokenizer": "hf", "vocab_size": tok.get_vocab_size(), "bos": first_id(("<s>", "<|begin_of_text|>")),
            "eot": first_id(("</s>", "<|endoftext|>", "<|end_of_text|>")), "tokenizer_json": text}
    return meta | hf_generation_meta(os.path.dirname(file), meta["eot"])


def hf_generation_meta(folder, eot):
    """What a Hugging Face folder says about generating: the end-of-sequence id(s) generation stops at
    (generation_config.json, else config.json; an int or a list), and the chat template (tokenizer_config.json;
    a list of named templates gives its 'default')."""
    def read(name):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as f:
                found = json.load(f)
            return found if isinstance(found, dict) else {}
        except (OSError, ValueError):
            return {}
    eos = read("generation_config.json").get("eos_token_id", read("config.json").get("eos_token_id", eot))
    eos = eos if isinstance(eos, list) else [eos] if eos is not None else []
    config = read("tokenizer_config.json")
    template = config.get("chat_template")
    # the special tokens a template may name, as transformers hands them to it (a string, or {"content": ...})
    tokens = {k: (lambda t: t.get("content", "") if isinstance(t, dict) else t or "")(config.get(k))
              for k in ("bos_token", "eos_token")}
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if not all(type(t) is int for t in eos) or not isinstance(template, (str, type(None))):
        raise SystemExit(f"error: {folder}: eos_token_id {eos!r} is not a list of ids, or chat_template is not text")
    return {"stop": sorted(set(eos)), "chat_template": template, "chat_tokens": tokens}


def stop_ids(meta):
    """The ids generation stops at; a meta written before they were recorded: GPT-2's <|endoftext|>, else none."""
    return meta.get("stop", [meta["eot"]] if meta.get("tokenizer") == "gpt2" else [])


def bpe_meta(name):
    """--tokenizer: 'gpt2' (tiktoken), 'hf:DIR' (the tokenizer.json of an imported model) or 'gguf:FILE' (the
    tokenizer inside a GGUF file)."""
    if name == "gpt2":
        return gpt2_meta()
    if name.startswith("hf:"):
        return hf_meta(name[3:])
    if name.startswith("gguf:"):
        from echo.pretrained import gguf_meta  # the GGUF reader lives with the model import
        from model import UsageError
        try:
            return gguf_meta(name[5:])
        except UsageError as e:
            raise SystemExit(f"error: {e}") from None
    raise SystemExit(f"error: --tokenizer {name!r}: expected gpt2, hf:DIR or gguf:FILE")


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
        try:
            enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline, with no cached copy of the BPE files
            raise SystemExit(f"error: cannot load tiktoken's GPT-2 BPE files ({type(e).__name__}); on a machine "
                             f"without network point TIKTOKEN_CACHE_DIR at a local copy") from None
        return (lambda s: enc.encode(s, allowed_special={"<|endoftext|>"})), enc.decode
    if kind == "hf":
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(meta["tokenizer_json"])

        bos, eot = meta.get("bos"), meta.get("eot")

        def encode(s):  # each document starts with BOS (if the tokenizer has one); <|endoftext|> between them
            ids = []
            for i, doc in enumerate(s.split("<|endoftext|>")):
                ids += ([eot] if i and eot is not None else []) + ([bos] if bos is not None else [])
                ids += tok.encode(doc, add_special_tokens=False).ids
            return ids
        # the BOS that encode adds is not part of the text: decoding leaves it out
        return encode, lambda ids: tok.decode([i for i in ids if i != bos], skip_special_tokens=False)
    raise ValueError(f"unknown tokenizer {kind!r} in dataset meta")


def text_encoder(meta):
    """encode: str -> list[int] for text as it is, as a chat template renders it or a benchmark gives it: special
    tokens written in it (<|im_start|>) kept whole, no BOS added and no document split."""
    if meta.get("tokenizer") != "hf":
        return tokenizer_from_meta(meta)[0]
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(meta["tokenizer_json"])
    return lambda s: tok.encode(s, add_special_tokens=False).ids


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


def write_dataset(out_dir, meta, splits):
    """Write {split}.bin for each of splits ({"train": text chunks, "val": ...}; an evaluation-only dataset
    has only "val") and meta.json (with the id dtype) into out_dir."""
    encode, _ = tokenizer_from_meta(meta)
    meta = dict(meta, dtype=np.dtype(id_dtype(meta["vocab_size"])).name, splits=list(splits))
    try:
        for split, chunks in splits.items():
            n = write_tokens(chunks, encode, os.path.join(out_dir, f"{split}.bin"), meta["vocab_size"])
            if n < 2:
                raise SystemExit(f"error: the {split} split has {n} tokens: the text is too short to train on")
            print(f"{split}: {n:,} tokens")
        with open(os.path.join(out_dir, "meta.json"), "w") as f:
            json.dump(meta, f)
    except OSError as e:
        raise SystemExit(f"error: cannot write to {out_dir} ({e.strerror})") from None
    print(f"wrote {out_dir}/{'.bin, '.join(splits)}.bin, meta.json (tokenizer {meta['tokenizer']}, vocab {meta['vocab_size']})")


def read_text(path):
    """A UTF-8 text file, or one clear line."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise SystemExit(f"error: {path} is not UTF-8 text (byte {e.start}); convert it first, "
                         f"e.g. iconv -t utf-8") from None
    except OSError as e:
        raise SystemExit(f"error: cannot read {path} ({e.strerror})") from None


def prepare_split_text(url, input_path, out_dir, make_meta):
    """Tiny Shakespeare style: one text file, first 90% train, last 10% val."""
    text = read_text(fetch_text(url, input_path, os.path.join(out_dir, "input.txt"), TINY_SHAKESPEARE))
    if not text:
        raise SystemExit("error: the input text is empty")
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
        raise SystemExit(f"error: --out_dir {args.out_dir} exists and is not a folder")
    try:
        os.makedirs(args.out_dir, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot create --out_dir {args.out_dir} ({e.strerror})") from None
    return (args.input, args.out_dir, bpe_meta(args.tokenizer)) if bpe else (args.input, args.out_dir)
