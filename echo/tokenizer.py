"""Tokenizers, described by a dict (a dataset's meta.json, and every checkpoint's copy of it): a character
vocabulary, GPT-2's BPE (tiktoken), or a Hugging Face tokenizer.json embedded whole (an imported model's, or one
built from a GGUF file's tokenizer.ggml.* by pretrained.gguf_meta). tokenizer_from_meta rebuilds (encode, decode)
from the dict; the data/ scripts write it, train.py, sample.py, chat and eval read it.
"""
import json
import os

from model import UsageError


def char_meta(text):
    return {"tokenizer": "char", "vocab_size": len(set(text)), "itos": sorted(set(text))}


def gpt2_meta():
    return {"tokenizer": "gpt2", "vocab_size": 50257, "eot": 50256, "stop": [50256]}


def hf_meta(path):
    """A Hugging Face tokenizer.json (e.g. an imported LLaMA's), embedded whole so checkpoints carry it."""
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise UsageError(f"no tokenizer.json at {path}")
    try:
        from tokenizers import Tokenizer
    except ImportError:
        raise UsageError("a Hugging Face tokenizer needs the tokenizers package: pip install tokenizers") from None
    try:
        with open(file, encoding="utf-8") as f:
            text = f.read()
        tok = Tokenizer.from_str(text)
    except Exception as e:  # not UTF-8, not JSON, or not a tokenizer the library understands
        raise UsageError(f"{file} is not a valid tokenizer.json ({str(e).splitlines()[0][:120]})") from None

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
        raise UsageError(f"{folder}: eos_token_id {eos!r} is not a list of ids, or chat_template is not text")
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
        return gguf_meta(name[5:])
    raise UsageError(f"--tokenizer {name!r}: expected gpt2, hf:DIR or gguf:FILE")


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
            raise UsageError(f"cannot load tiktoken's GPT-2 BPE files ({type(e).__name__}); on a machine "
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
