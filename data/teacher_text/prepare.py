"""General text the teacher writes itself, for distilling a converted model back to what it was (as LLM-QAT keeps
a compressed model's general ability with no outside data): the model continues many varied openings with its
own sampling, plain-text starts across topics and, for a model with a chat template, requests in that template.

    python data/teacher_text/prepare.py --teacher=gguf:$SMOL --tokens=155000 --out_dir=data/teacher_smollm2
    python data/teacher_text/prepare.py --teacher=gguf:$SMOL --tokens=320000 --out_dir=data/teacher_smollm2_320k
    python data/teacher_text/prepare.py --teacher=gguf:$SMOL --tokens=30000000 --batch_size=256 --device=cuda \
        --out_dir=data/teacher_smollm2_30m   # for config/convert_smollm2.py, on a GPU

Each batch of --batch_size documents is written to out_dir/chunks/ as soon as it is done (atomically), so an
interrupted run, started again with the same settings, skips what it has and loses nothing; the same seed writes
the same text on the same kind of device and dtype (a GPU samples with its own random numbers; bf16 rounds other
logits than fp32). The teacher writes in the machine's dtype (bf16 where the CPU has bf16 dot products), a batch
at a time through one compiled decode step. SmolLM2-135M-Instruct's corpus at the default settings ships in this
folder (smollm2.npz: 134 batches, 966,662 tokens, 1.3 MB; the first 44 written in fp32 by an earlier sampler at
75-106 tokens/s, the other 90 in bf16 by this one at 291): a run with that teacher and those settings takes as
many of its batches as --tokens asks for (the first 22, 159,952 tokens, for 155000; the first 44 for 320000; all
for 966662), and writes only what more --tokens asks for. A document is its opening and what the model wrote
after it, up to and including its first end token (or, cut at --max_new_tokens, followed by one). Every 10th batch
goes to val.bin, the rest to train.bin.
"""
import argparse
import json
import os
import random
import sys

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from configurator import DTYPE, DTYPE_WHY, check_device, keep_freed_memory, precision, run_main  # noqa: E402
from data.common import id_dtype  # noqa: E402
from echo.generate import compile_decode_step, sample_logits  # noqa: E402
from echo.tokenizer import bpe_meta, stop_ids, text_encoder  # noqa: E402
from model import UsageError  # noqa: E402

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "smollm2.npz")
PLAIN = [  # starts of ordinary prose across topics, none of them from a held-out set
    "The history of", "Scientists have found that", "In the small town of", "The most important thing about",
    "A recipe for", "The river flows", "During the war,", "Music is", "The company announced", "In mathematics,",
    "The old house", "Children learn", "The government of", "Plants need", "The first time I",
    "An engine works by", "The museum opened", "According to the report,", "The city council", "Stars are",
    "The football season", "A good teacher", "The village was", "Doctors recommend", "The novel tells the story of",
    "Computers", "The mountain", "In the morning,", "The king of", "Water is", "The team", "Farmers in",
    "The election", "Researchers at the university", "The painting", "In 1850,", "The bridge was built",
    "Many people believe", "The album was released", "The species is found in", "The law requires",
    "Early in his career,", "The economy of", "The church", "The film", "Bread is made", "The island",
    "The experiment showed", "The school was founded", "The population of", "The language spoken in",
    "The disease", "The railway", "Her first book", "The temperature", "The battle of", "The song",
    "The program was designed to", "The castle", "The treaty", "Birds migrate", "The hospital",
    "The festival is held", "The theory of", "The ship", "The newspaper reported", "The road", "The planet",
]
REQUESTS = [  # what users ask an instruct model, in its own chat template
    "Write a short story about a lighthouse keeper.", "Explain how photosynthesis works.",
    "What are the main causes of inflation?", "Give me three tips for learning a new language.",
    "Summarize the plot of a famous novel.", "How does a refrigerator keep food cold?",
    "Write a poem about autumn.", "What is the difference between weather and climate?",
    "Describe the water cycle.", "Why is exercise good for the brain?", "Write an email asking for a day off.",
    "Explain what a computer program is to a child.", "What should I pack for a week of hiking?",
    "Tell me about the history of the printing press.", "How do vaccines work?",
    "What is a black hole?", "Write a recipe for a simple vegetable soup.", "Give me a plan to save money.",
    "Explain the rules of chess briefly.", "What makes a good leader?", "Describe a busy market in the morning.",
    "How do airplanes stay in the air?", "What are prime numbers?", "Write a thank-you note to a teacher.",
    "Why do leaves change colour in the fall?", "Explain supply and demand.", "What is the capital of Japan?",
    "Write a dialogue between a cat and a dog.", "How can I sleep better?", "What was the Industrial Revolution?",
    "Describe how to plant a tree.", "What is machine learning?", "Write a short speech for a graduation.",
    "How do bees make honey?", "List some famous inventions of the twentieth century.",
    "Explain why the sky is blue.", "What are the benefits of reading?", "How does the heart pump blood?",
    "Write a haiku about the sea.", "What is democracy?",
]


def openings(batch, batch_size, seed, encode, chat_tokens):
    """The token ids of batch `batch`'s openings, chosen by (seed, batch) only: plain starts on even batches, chat
    requests on odd ones when the model has a chat template (chat_tokens renders one request)."""
    rng = random.Random(seed * 1_000_003 + batch)
    if chat_tokens is not None and batch % 2:
        return [chat_tokens(r) for r in rng.choices(REQUESTS, k=batch_size)]
    return [encode(s) for s in rng.choices(PLAIN, k=batch_size)]


@torch.no_grad()
def write_documents(model, prompts, max_new_tokens, stop, eot, vocab_limit, top_p, step=None, cache_len=None):
    """Sample up to max_new_tokens after each prompt, all rows in one batch through the KV cache, and return each
    row's document. Prompts differ in length: the shared prefix is prefilled, then a row still inside its prompt
    is fed its own next token instead of a sampled one (no padding, so nothing changes what the model sees).
    step: the decode step (a compiled one, made for a cache of cache_len positions: the same for every batch)."""
    lengths = [len(p) for p in prompts]
    B, start, total = len(prompts), min(lengths), max(lengths) + max_new_tokens
    device = model.tok_embeddings.weight.device  # every tensor below lives where the model does
    ids = torch.zeros(B, total, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, :len(p)] = torch.tensor(p)
    ids = ids.to(device)
    in_prompt = torch.arange(total, device=device)[None] < torch.tensor(lengths, device=device)[:, None]  # (B,total)
    model.setup_cache(B, cache_len or total)
    step = model if step is None else step
    stop_t, done = torch.tensor(stop or [-1], device=device), torch.zeros(B, dtype=torch.bool, device=device)
    logits = model(ids[:, :start], input_pos=torch.arange(start, device=device))[0][:, -1]  # (B, V)
    for t in range(start, total):
        token = torch.where(in_prompt[:, t], ids[:, t], sample_logits(logits, 1.0, None, top_p, vocab_limit)[:, 0])
        ids[:, t] = token
        done |= ~in_prompt[:, t] & torch.isin(token, stop_t)
        if bool(done.all()) or t == total - 1:  # one host sync a token: a batch of 256 rows amortises it
            break
        logits = step(token[:, None], input_pos=torch.tensor([t], device=device))[0][:, -1]
    docs = []
    ids = ids.cpu()
    for i, n in enumerate(lengths):
        row = ids[i, :n + max_new_tokens].tolist()
        end = next((j + 1 for j in range(n, len(row)) if row[j] in stop), None)
        docs.append(row[:end] if end else row + [eot])
    return docs


def fingerprint(source):
    """What identifies a teacher across machines: its weight files' names and sizes (the GGUF file; a Hugging Face
    folder's files)."""
    kind, path = source.split(":", 1)
    if kind == "gguf":
        from echo.pretrained import gguf_file
        files = [gguf_file(path)]
    else:
        files = [os.path.join(path, f) for f in sorted(os.listdir(path)) if os.path.isfile(os.path.join(path, f))]
    return ", ".join(f"{os.path.basename(f)}:{os.path.getsize(f)}" for f in files)


def save_atomic(path, array):
    """Write an array's bytes to path durably: a temporary file, flushed to disk, then renamed over path."""
    with open(path + ".tmp", "wb") as f:
        f.write(array.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="gguf:FILE or hf:DIR: the model (and tokenizer) that writes")
    p.add_argument("--tokens", type=int, required=True, help="write batches until at least this many tokens")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--batch_size", type=int, default=32, help="documents sampled together")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--top_p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--ship", default="", help="also write every batch, with the settings, to this .npz file")
    p.add_argument("--device", default="cpu", help="where the teacher writes: cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", default=DTYPE, help=f"the teacher's dtype (default here: {DTYPE}, {DTYPE_WHY})")
    p.add_argument("--compile", default="True", help="compile the decode step (True/False): ~1 minute, paid back "
                                                     "within a few thousand tokens")
    args = p.parse_args(argv)
    if args.tokens < 1 or args.batch_size < 1 or args.max_new_tokens < 1 or not 0 < args.top_p <= 1:
        raise UsageError("--tokens, --batch_size and --max_new_tokens must be at least 1, --top_p in (0, 1]")
    if args.compile not in ("True", "False"):
        raise UsageError(f"--compile={args.compile}: expected True or False")
    check_device(args.device)
    ptdtype = precision(args.device, args.dtype)[0]
    keep_freed_memory(args.device)
    meta = bpe_meta(args.teacher)
    from echo.pretrained import import_pretrained  # after the arguments are checked: loading takes seconds
    model = import_pretrained(args.teacher).eval().to(args.device, ptdtype)
    chat_tokens = None
    if meta.get("chat_template"):
        from echo.chat import Chat
        chat = Chat(model, meta)
        chat_tokens = lambda request: chat.tokens([{"role": "user", "content": request}], extend=False)  # noqa: E731
    stop, eot, dtype = stop_ids(meta), meta.get("eot"), id_dtype(meta["vocab_size"])
    if eot is None and not stop:
        raise UsageError(f"{args.teacher}'s tokenizer has no end token to end a document with")
    eot = eot if eot is not None else stop[0]
    chunks = os.path.join(args.out_dir, "chunks")
    os.makedirs(chunks, exist_ok=True)
    settings = {k: getattr(args, k) for k in ("batch_size", "max_new_tokens", "top_p", "seed")}
    settings["teacher"], settings["chat"] = fingerprint(args.teacher), chat_tokens is not None
    settings_file = os.path.join(chunks, "settings.json")
    if os.path.exists(settings_file):
        with open(settings_file) as f:
            if json.load(f) != settings:
                raise UsageError(f"{chunks} holds batches written with other settings or another teacher: "
                                 f"give another --out_dir, or delete it")
    else:
        with open(settings_file, "w") as f:
            json.dump(settings, f)

    def chunk(b):
        return os.path.join(chunks, f"{b:05d}.bin")

    def wants_more(have, b):  # when to stop, restoring or writing: --tokens reached, and a batch for each split
        return have < args.tokens or b < 2

    shipped = np.load(SHIPPED) if os.path.isfile(SHIPPED) else None
    if shipped is not None and not os.path.exists(chunk(0)) and json.loads(str(shipped["settings"])) == settings:
        have, b = 0, 0  # only the batches --tokens asks for: the same --tokens gives the same corpus, shipped or not
        for name in sorted(k for k in shipped.files if k != "settings"):
            if not wants_more(have, b):
                break
            save_atomic(chunk(b), shipped[name])
            have, b = have + len(shipped[name]), b + 1
        print(f"starting from {b} of the batches shipped in {os.path.relpath(SHIPPED)} (the same teacher and settings)")

    have, b = 0, 0
    while os.path.exists(chunk(b)):  # the batches an earlier run finished
        have, b = have + os.path.getsize(chunk(b)) // np.dtype(dtype).itemsize, b + 1
    encode, step, cache_len = text_encoder(meta), None, None
    if wants_more(have, b):  # one cache size for every batch (the longest opening and max_new_tokens), so that one
        longest = max([len(encode(s)) for s in PLAIN] + [len(chat_tokens(r)) for r in REQUESTS if chat_tokens])
        cache_len = min(model.config.block_size, longest + args.max_new_tokens)  # compiled decode step serves all
        step = compile_decode_step(model, args.batch_size, cache_len) if args.compile == "True" else None
    bar = tqdm(total=args.tokens, initial=min(have, args.tokens), unit="tok", desc="teacher text", smoothing=0.1)
    while wants_more(have, b):
        torch.manual_seed(args.seed * 1_000_003 + b)
        prompts = openings(b, args.batch_size, args.seed, encode, chat_tokens)
        docs = write_documents(model, prompts, args.max_new_tokens, stop, eot, meta["vocab_size"], args.top_p, step,
                               cache_len)
        save_atomic(chunk(b), np.asarray([t for d in docs for t in d], dtype=dtype))
        n = sum(map(len, docs))
        have, b = have + n, b + 1
        bar.update(max(0, min(n, args.tokens - bar.n)))
    bar.close()
    splits = {"train": [], "val": []}
    for i in range(b):  # every batch written so far (a rerun with a larger --tokens keeps them all)
        splits["val" if i % 10 == 9 else "train"].append(np.fromfile(chunk(i), dtype=dtype))
    if not splits["val"]:  # fewer than 10 batches: the last one is val
        splits["val"].append(splits["train"].pop())
    for split, parts in splits.items():
        save_atomic(os.path.join(args.out_dir, f"{split}.bin"), np.concatenate(parts))
        print(f"{split}: {sum(map(len, parts)):,} tokens from {len(parts)} batches")
    with open(os.path.join(args.out_dir, "meta.json"), "w") as f:
        json.dump(dict(meta, dtype=np.dtype(dtype).name, splits=list(splits)), f)
    if args.ship:
        np.savez_compressed(args.ship, settings=json.dumps(settings),
                            **{f"b{i:05d}": np.fromfile(chunk(i), dtype=dtype) for i in range(b)})
        print(f"wrote {args.ship} ({os.path.getsize(args.ship):,} bytes)")


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
