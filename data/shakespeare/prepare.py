"""Tiny Shakespeare with a BPE tokenizer, GPT-2's (tiktoken) by default: 90/10 split, uint16 memmaps + meta.json.

    python data/shakespeare/prepare.py                 # the text shipped in data/ (tiktoken's GPT-2 files download once)
    python data/shakespeare/prepare.py --input PATH    # offline: a local input.txt; set TIKTOKEN_CACHE_DIR too
    python data/shakespeare/prepare.py --tokenizer=hf:DIR    # an imported model's tokenizer.json instead
    python data/shakespeare/prepare.py --tokenizer=gguf:FILE # the tokenizer inside a GGUF file (e.g. SmolLM2)
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from configurator import run_main  # noqa: E402
from data.common import parse_args, prepare_split_text  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def main(argv):
    input_path, out_dir, meta = parse_args(argv, os.path.dirname(os.path.abspath(__file__)), bpe=True)
    prepare_split_text(URL, input_path, out_dir, lambda text: meta)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
