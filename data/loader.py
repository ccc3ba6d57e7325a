"""Reading a prepared dataset (train.bin, val.bin, meta.json from data/*/prepare.py): the token memmaps,
checked, and random batches drawn from them. train.py, analyze.py and bench.py read data through here."""
import os

import numpy as np
import torch

from configurator import read_json
from model import UsageError


def load_dataset(cfg, splits=("train", "val"), optional=()):
    """The token memmaps of these splits and the dataset's meta (tokenizer, vocab size, id dtype), checked.
    cfg: data_dir, dataset and block_size. A split in `optional` that the dataset lacks is left out (eval_only
    on a set prepared for evaluation only, e.g. WikiText-2, evaluates the val split it has)."""
    folder = os.path.join(cfg.data_dir, cfg.dataset)
    meta_path = os.path.join(folder, "meta.json")
    redo = f"re-run python data/{cfg.dataset}/prepare.py"
    if not os.path.isfile(meta_path):
        raise UsageError(f"dataset '{cfg.dataset}' is not prepared: run python data/{cfg.dataset}/prepare.py")
    meta = read_json(meta_path, "the dataset's meta")
    if not isinstance(meta, dict) or not {"tokenizer", "vocab_size", "dtype"} <= set(meta):
        raise UsageError(f"{meta_path} lacks tokenizer, vocab_size or dtype: {redo}")
    if meta["dtype"] not in ("uint16", "uint32") or type(meta["vocab_size"]) is not int or meta["vocab_size"] < 1:
        raise UsageError(f"{meta_path}: dtype {meta['dtype']!r} / vocab_size {meta['vocab_size']!r} are not "
                         f"uint16|uint32 / a positive whole number: {redo}")
    data = {}
    for split in splits:
        path = os.path.join(folder, f"{split}.bin")
        if not os.path.isfile(path) and split in optional:
            continue
        if not os.path.isfile(path) and split not in meta.get("splits", [split]):
            raise UsageError(f"dataset '{cfg.dataset}' is prepared for evaluation only (it has no {split} split): "
                             f"evaluate it with --eval_only=True, or beside a run with --eval_datasets={cfg.dataset}")
        if not os.path.isfile(path):
            raise UsageError(f"{path} is missing: {redo}")
        size, item = os.path.getsize(path), np.dtype(meta["dtype"]).itemsize
        if size % item:
            raise UsageError(f"{path} has {size} bytes, not a whole number of {meta['dtype']} ids: "
                             f"truncated or damaged; {redo}")
        if size // item <= cfg.block_size:
            raise UsageError(f"{path} has {size // item} tokens, fewer than block_size+1 = {cfg.block_size + 1}")
        data[split] = np.memmap(path, dtype=meta["dtype"], mode="r")
        top = int(data[split].max())  # one pass over the file: an id the model has no row for is an error
        if top >= meta["vocab_size"]:
            raise UsageError(f"{path} holds token id {top}, outside the vocabulary of {meta['vocab_size']}: {redo}")
    return data, meta


def get_batch(data, batch_size, block_size, generator, rows=slice(None)):
    """batch_size random windows: inputs x and next-token targets y, each (batch_size, block_size); with
    rows, only those rows of the draw (a DDP rank's share of the global batch)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)[rows].tolist()
    x = torch.from_numpy(np.stack([data[i:i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([data[i + 1:i + 1 + block_size] for i in ix]).astype(np.int64))
    return x, y


def batch_generator(seed, iter_num):
    """Each iteration draws its global batch from its own seed, so a resumed run sees exactly the batches it
    would have, and N processes see the same rows as one process accumulating N times as many micro-steps."""
    return torch.Generator().manual_seed((seed * 1_000_003 + iter_num) * 1009)
