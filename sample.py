"""Sample from a checkpoint written by train.py, through the layer-aware KV cache, or talk to a chat model.

    python sample.py --out_dir=out-shakespeare-char-cpu --start="ROMEO:" --num_samples=1
    python sample.py --out_dir=out-shakespeare-char --start=FILE:prompt.txt --temperature=0 --compile=True
    python sample.py --init_from=gguf:$SMOL --chat --temperature=0            # a conversation, in its template

One prefill pass over the prompt, then one cached decode step per token (all samples decode together).
"""
import itertools
import sys
import time
from dataclasses import dataclass, replace

import torch

from echo.chat import Chat
from echo.checkpoint import load_checkpoint, model_from_checkpoint
from configurator import DEVICE, DTYPE, check_device, configure, precision, run_main
from echo.generate import cache_len, compile_decode_step, generate_tokens, inference_layout, until_stop
from model import UsageError
from echo.costs import kv_cache_bytes
from echo.pretrained import IMPORTS, import_pretrained
from echo.tokenizer import bpe_meta, stop_ids, tokenizer_from_meta


@dataclass
class SampleConfig:
    out_dir: str = "out"             # the checkpoint is {out_dir}/ckpt.pt ...
    init_from: str = "resume"        # ... or 'hf:DIR' / 'gguf:FILE': an imported LLaMA and its tokenizer
    start: str = "\n"                # the prompt, or FILE:path to read it from a file
    num_samples: int = 3
    max_new_tokens: int = 500
    temperature: float = 0.8         # 0 = greedy
    top_k: int = 200                 # 0 = off
    top_p: float = 1.0               # nucleus sampling; 1.0 = off
    seed: int = 1337
    device: str = DEVICE
    dtype: str = DTYPE
    compile: bool = False            # compile the decode step once (worth it for long or repeated runs)
    stop: bool = True                # each sample ends at the model's end token (False: always max_new_tokens)
    chat: bool = False               # talk to a chat model through its chat template; --start is the first turn
    system: str = ""                 # --chat: the system turn (not given: the template's default, if any)


def load_model(cfg):
    """Model (eval mode, on cfg.device in cfg.dtype), its data meta, and (encode, decode)."""
    if cfg.init_from.startswith(IMPORTS):
        model, meta = import_pretrained(cfg.init_from), bpe_meta(cfg.init_from)
    elif cfg.init_from == "resume":
        ckpt = load_checkpoint(f"{cfg.out_dir}/ckpt.pt", map_location="cpu")
        if not isinstance(ckpt.get("meta"), dict):
            raise UsageError(f"checkpoint in {cfg.out_dir} has no data meta: cannot rebuild its tokenizer")
        model, meta = model_from_checkpoint(ckpt, f"{cfg.out_dir}/ckpt.pt"), ckpt["meta"]
    else:
        raise UsageError(f"init_from={cfg.init_from!r}: expected resume, hf:DIR or gguf:FILE")
    inference_layout(model.eval().to(device=cfg.device, dtype=precision(cfg.device, cfg.dtype)[0]))
    try:
        return model, meta, tokenizer_from_meta(meta)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UsageError(f"the checkpoint's data meta cannot rebuild its tokenizer ({type(e).__name__}: {e})") from None


def prompt_ids(cfg, encode, block_size):
    text = cfg.start
    if text.startswith("FILE:"):
        try:
            with open(text[5:], encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise UsageError(f"--start={cfg.start}: cannot read the prompt file ({e.strerror})") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"--start={cfg.start}: the prompt file is not UTF-8 text (byte {e.start})") from None
    try:
        ids = encode(text)
    except ValueError as e:  # a char-level vocabulary names the characters it lacks
        raise UsageError(str(e)) from None
    if not ids:
        raise UsageError("the prompt is empty: give --start some text")
    if len(ids) > block_size:
        raise UsageError(f"the prompt is {len(ids)} tokens, longer than the model's context window "
                         f"block_size={block_size}; shorten it")
    return ids


def check_sample_settings(cfg):
    """Every sampling setting in its range, or one line naming the first that is not."""
    if cfg.max_new_tokens < 1 or cfg.num_samples < 1:
        raise UsageError("max_new_tokens and num_samples must be at least 1")
    if not 0 <= cfg.temperature < float("inf"):
        raise UsageError(f"temperature={cfg.temperature}: expected >= 0 (0 = greedy); a negative one would "
                         f"invert the distribution")
    if cfg.top_k < 0:
        raise UsageError(f"top_k={cfg.top_k}: expected >= 0 (0 = off)")
    if not 0 < cfg.top_p <= 1:
        raise UsageError(f"top_p={cfg.top_p}: expected 0 < top_p <= 1 (1 = off)")
    check_device(cfg.device)
    precision(cfg.device, cfg.dtype)


def sample(cfg, out=None):
    """Generate cfg.num_samples continuations. Streams to `out` when there is one sample.
    Returns (texts, stats) where stats holds the token counts, timings and cache sizes."""
    check_sample_settings(cfg)
    torch.manual_seed(cfg.seed)
    model, meta, (encode, decode) = load_model(cfg)
    block = model.config.block_size
    ids = prompt_ids(cfg, encode, block)
    if len(ids) + cfg.max_new_tokens > block and out:
        out.write(f"note: prompt + max_new_tokens = {len(ids) + cfg.max_new_tokens} exceeds the context window "
                  f"({block}); past it the window slides: the last {block // 2} tokens are re-encoded\n")
    idx = torch.tensor([ids] * cfg.num_samples, dtype=torch.long, device=cfg.device)  # (B, T)
    sync = torch.cuda.synchronize if "cuda" in cfg.device else (lambda: None)
    step = None
    if cfg.compile:  # compile and warm up the decode step now (on a GPU: record its CUDA graph), so it is not timed
        t = time.perf_counter()
        step = compile_decode_step(model, cfg.num_samples, cache_len(model, len(ids), cfg.max_new_tokens))
        sync()
        if out:
            out.write(f"note: compiled and warmed up the decode step in {time.perf_counter() - t:.1f} s\n")
    stream = out if cfg.num_samples == 1 else None
    stop = stop_ids(meta) if cfg.stop else []
    new, printed = [], 0
    if stream:
        stream.write(decode(ids))
    t0 = time.perf_counter()
    for n, token in enumerate(generate_tokens(model, idx, cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                                              cfg.top_p, vocab_limit=meta["vocab_size"], step=step, stop=stop)):
        new.append(token)
        if n == 0:
            sync()
            t_first = time.perf_counter()
        if stream:  # print what decodes cleanly so far (a BPE token can end mid-character), never the end token
            text = decode(until_stop(torch.cat(new, dim=1)[0].tolist(), stop))
            if not text.endswith("\ufffd"):
                stream.write(text[printed:])
                stream.flush()
                printed = len(text)
    sync()
    t_end = time.perf_counter()
    rows = [until_stop(row, stop) for row in torch.cat(new, dim=1).tolist()]  # each cut at its first end token
    texts = [decode(ids + row) for row in rows]
    elem = model.kv_cache.dtype.itemsize
    stats = {
        "samples": cfg.num_samples, "prompt_tokens": len(ids), "new_tokens": sum(map(len, rows)), "steps": len(new),
        "max_new_tokens": cfg.max_new_tokens, "prefill_tokens_per_s": cfg.num_samples * len(ids) / (t_first - t0),
        # every row computes at every step, done or not: this is the steps' throughput
        "decode_tokens_per_s": cfg.num_samples * (len(new) - 1) / max(t_end - t_first, 1e-9),
        "kv_cache_bytes": model.kv_cache.nbytes,
        "kv_cache_bytes_unshared": kv_cache_bytes(replace(model.config, kv_share="none", att_share="none"),
                                                  cfg.num_samples, model.kv_cache.max_len, elem),
        "k_slots": model.kv_cache.n_slots["k"], "v_slots": model.kv_cache.n_slots["v"], "n_layer": model.config.n_layer,
    }
    return texts, stats


def summary(s):
    """The report line: tokens generated (end tokens not counted; at most samples x max_new_tokens), speeds,
    and the KV cache: how many layers cache keys and values, beside what the model would need without sharing."""
    return (f"{s['new_tokens']} tokens ({s['samples']} x at most {s['max_new_tokens']}, {s['steps']} steps) | prefill "
            f"{s['prefill_tokens_per_s']:,.0f} tok/s | decode {s['decode_tokens_per_s']:,.1f} tok/s | KV cache "
            f"{s['kv_cache_bytes'] / 2**20:.2f} MiB ({s['k_slots']} of {s['n_layer']} layers cache K, "
            f"{s['v_slots']} cache V; "
            f"without sharing {s['kv_cache_bytes_unshared'] / 2**20:.2f} MiB)")


def chat(cfg, lines, out, interactive):
    """--chat: --start (if given) is the first user turn, then each line read is the next. On a terminal each
    reply streams and an empty line is asked again; piped, one reply per line, and an empty one is an error."""
    check_sample_settings(cfg)
    torch.manual_seed(cfg.seed)
    model, meta, _ = load_model(cfg)
    conversation = Chat(model, meta, system=cfg.system if "system" in cfg.explicit else None)
    turns = ([cfg.start] if "start" in cfg.explicit else []) + ([] if interactive else lines)
    if interactive:
        out.write("chat: type a message, Enter to send, Ctrl-D to end\n")
    typed = iter(lambda: read_turn(out), None) if interactive else iter(())  # lines typed, until Ctrl-D
    for n, user in enumerate(itertools.chain(turns, typed)):
        if interactive and not user.strip():
            out.write("(an empty turn: type something)\n")
            continue
        if not user.strip():
            raise UsageError(f"turn {n + 1} is empty: each input line is one turn for the model to answer")
        if interactive:
            out.write("assistant: ")
        t = time.perf_counter()
        try:
            text = conversation.reply(user.rstrip("\n"), cfg.max_new_tokens, cfg.temperature, cfg.top_k or None,
                                      cfg.top_p, out=out if interactive else None)
        except UsageError as e:
            if not interactive:  # piped: the process ends, with the one line
                raise
            out.write(f"error: {e}\n")  # on a terminal: say so and take the next turn
            continue
        if not interactive:
            out.write(text)
        out.write(f"\n[{conversation.reply_tokens} tokens in {time.perf_counter() - t:.1f} s]\n")
        out.flush()


def read_turn(out):
    """The next line typed on the terminal, or None at its end (Ctrl-D)."""
    out.write("you: ")
    out.flush()
    try:
        return input()
    except EOFError:
        return None


def main(argv):
    cfg = configure(SampleConfig(), argv)
    if cfg.chat:
        interactive = sys.stdin.isatty()
        return chat(cfg, [] if interactive else sys.stdin.read().splitlines(), sys.stdout, interactive)
    texts, stats = sample(cfg, out=sys.stdout)
    if cfg.num_samples == 1:
        print()
    else:
        for text in texts:
            print(text, "\n" + "-" * 60)
    print(summary(stats))


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
