"""Tiny Shakespeare with GPT-2 BPE (tiktoken): 90/10 split, uint16 memmaps + meta.json.

    python data/shakespeare/prepare.py                 # downloads input.txt (and tiktoken's GPT-2 files)
    python data/shakespeare/prepare.py --input PATH    # offline: a local input.txt; set TIKTOKEN_CACHE_DIR too
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from data.common import gpt2_meta, parse_args, prepare_split_text  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"

if __name__ == "__main__":
    input_path, out_dir = parse_args(sys.argv[1:], os.path.dirname(os.path.abspath(__file__)))
    prepare_split_text(URL, input_path, out_dir, lambda text: gpt2_meta())
