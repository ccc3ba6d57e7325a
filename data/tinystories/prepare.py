"""TinyStories (Eldan & Li, 2023; the GPT-4 V2 files) with GPT-2 BPE: about 470M train tokens, a good
size for a single-GPU run. Stories end with <|endoftext|>, which becomes GPT-2's end-of-text id.

    python data/tinystories/prepare.py                # downloads both files (about 2.2 GB)
    python data/tinystories/prepare.py --input DIR    # offline: DIR holds the two .txt files named below
    python data/tinystories/prepare.py --tokenizer=hf:DIR    # an imported model's tokenizer (e.g. TinyLlama), or gguf:FILE
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from configurator import run_main  # noqa: E402
from data.common import fetch_text, parse_args, write_dataset  # noqa: E402

BASE = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
FILES = {"train": "TinyStoriesV2-GPT4-train.txt", "val": "TinyStoriesV2-GPT4-valid.txt"}


def read_chunks(path, size=1 << 22):
    """Stream a large text file in ~4 MB pieces cut after a newline, so no word is split."""
    with open(path, encoding="utf-8") as f:
        rest = ""
        while block := f.read(size):
            block, cut = rest + block, (rest + block).rfind("\n") + 1
            rest = block[cut:] if cut else ""
            yield block[:cut] if cut else block
        if rest:
            yield rest


def main(argv):
    local, out_dir, meta = parse_args(argv, os.path.dirname(os.path.abspath(__file__)), bpe=True)
    paths = {split: fetch_text(BASE + name, local and os.path.join(local, name), os.path.join(out_dir, name))
             for split, name in FILES.items()}
    write_dataset(out_dir, meta, {"train": read_chunks(paths["train"]), "val": read_chunks(paths["val"])})


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
