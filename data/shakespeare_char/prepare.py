"""Character-level Tiny Shakespeare: 65 symbols, 90/10 split, uint16 memmaps + meta.json.

    python data/shakespeare_char/prepare.py                 # the copy shipped in data/, no network
    python data/shakespeare_char/prepare.py --input PATH    # offline: a local copy of input.txt
"""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from configurator import run_main  # noqa: E402
from data.common import parse_args, prepare_split_text  # noqa: E402
from echo.tokenizer import char_meta  # noqa: E402

URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"


def main(argv):
    input_path, out_dir = parse_args(argv, os.path.dirname(os.path.abspath(__file__)))
    prepare_split_text(URL, input_path, out_dir, char_meta)


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
