"""WikiText-2's valid split (shipped here, CC BY-SA 3.0: see README.md) as an evaluation-only dataset: the whole
split becomes val.bin, in the tokenizer of the model it will judge; there is no train.bin.

    python data/wikitext2/prepare.py --tokenizer=gguf:FILE --out_dir=data/wikitext2_smollm2   # SmolLM2's tokens
    python data/wikitext2/prepare.py                                                          # GPT-2's (tiktoken)
"""
import gzip
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from configurator import run_main  # noqa: E402
from data.common import chunked, parse_args, read_text, write_dataset  # noqa: E402

SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "valid.txt.gz")


def main(argv):
    input_path, out_dir, meta = parse_args(argv, os.path.dirname(os.path.abspath(__file__)), bpe=True)
    if input_path:
        text = read_text(input_path)
    else:
        with gzip.open(SHIPPED, "rt", encoding="utf-8") as f:
            text = f.read()
    print(f"{len(text):,} characters")
    write_dataset(out_dir, meta, {"val": chunked(text)})


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
