"""A fine-tuning set that keeps a model's general ability: a prepared dataset (e.g. Tiny Shakespeare) mixed with
text the teacher writes itself. The teacher needs no labels and no outside data: it continues short, generic
openings (below) with its own sampling, so distilling on that text asks the student to stay the model it was.

    python data/teacher_mix/prepare.py --teacher=gguf:$SMOL --mix=data/shakespeare_smollm2 --out_dir=data/mix_smollm2

train.bin: the dataset's train tokens and the teacher's text, repeated so that it is --share of the tokens;
val.bin and meta.json: the dataset's own (val loss stays the dataset's). No held-out text is used.
"""
import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from data.common import bpe_meta, text_encoder, tokenizer_from_meta  # noqa: E402
from generate import generate_tokens, until_stop  # noqa: E402
from pretrained import import_pretrained  # noqa: E402

OPENINGS = ["The history of", "Scientists have found that", "In the small town of", "The most important thing about",
            "A recipe for", "The river flows", "During the war,", "Music is", "The company announced",
            "In mathematics,", "The old house", "Children learn", "The government of", "Plants need",
            "The first time I", "An engine works by", "The museum opened", "According to the report,",
            "The city council", "Stars are", "The football season", "A good teacher", "The village was",
            "Doctors recommend", "The novel tells the story of", "Computers", "The mountain", "In the morning,",
            "The king of", "Water is", "The team", "Farmers in"]


def main(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", required=True, help="gguf:FILE or hf:DIR: the model (and tokenizer) that writes")
    p.add_argument("--mix", required=True, help="the prepared dataset folder to mix with (its tokens must match)")
    p.add_argument("--out_dir", required=True)
    p.add_argument("--tokens", type=int, default=32768, help="how many tokens the teacher writes")
    p.add_argument("--share", type=float, default=0.5, help="the teacher's share of train.bin")
    p.add_argument("--max_new_tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    meta = bpe_meta(args.teacher)
    with open(os.path.join(args.mix, "meta.json")) as f:
        mixed = json.load(f)
    if mixed.get("tokenizer_json") != meta.get("tokenizer_json"):
        raise SystemExit(f"error: {args.mix} is not tokenized with {args.teacher}'s tokenizer")
    if not 0 < args.share < 1 or args.tokens < 1:
        raise SystemExit("error: --share must be between 0 and 1, --tokens at least 1")
    torch.manual_seed(args.seed)
    model, encode = import_pretrained(args.teacher).eval(), text_encoder(meta)
    stop, written, batches = meta.get("stop", []), [], 0
    while len(written) < args.tokens:  # 16 openings a batch, in turn
        batch = [encode(OPENINGS[(16 * batches + i) % len(OPENINGS)]) for i in range(16)]
        batches += 1
        width = min(map(len, batch))  # one prompt length per batch: the openings, cut to the shortest
        idx = torch.tensor([b[:width] for b in batch])
        rows = torch.cat(list(generate_tokens(model, idx, args.max_new_tokens, temperature=1.0, top_p=0.95,
                                              vocab_limit=meta["vocab_size"], stop=stop)), 1).tolist()
        for prompt, row in zip(idx.tolist(), rows):
            written += prompt + until_stop(row, stop) + ([meta["eot"]] if meta.get("eot") is not None else [])
        print(f"{len(written):,} / {args.tokens:,} tokens written")
    print(tokenizer_from_meta(meta)[1](written[:200]).replace("\n", " ")[:300], "...")
    train = np.fromfile(os.path.join(args.mix, "train.bin"), dtype=mixed["dtype"])
    repeats = max(1, round(args.share * len(train) / (1 - args.share) / len(written)))
    os.makedirs(args.out_dir, exist_ok=True)
    np.concatenate([train] + [np.asarray(written, dtype=mixed["dtype"])] * repeats).tofile(
        os.path.join(args.out_dir, "train.bin"))
    for name in ("val.bin", "meta.json"):
        shutil.copy(os.path.join(args.mix, name), os.path.join(args.out_dir, name))
    print(f"wrote {args.out_dir}: {len(train):,} tokens of {args.mix} + {repeats} x {len(written):,} of the teacher's")


if __name__ == "__main__":
    main(sys.argv[1:])
