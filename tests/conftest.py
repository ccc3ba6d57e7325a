import json
import os
import sys

import pytest

# tests import the top-level scripts (model.py, train.py, ...) as modules
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from data.common import char_meta, chunked, write_dataset  # noqa: E402
from configurator import configure
from train import TrainConfig, train

TEXT = "".join(f"{w} the {v} of {n};\n" for w in ("Where is", "Give me", "Speak")
               for v in ("king", "queen", "fool", "night") for n in ("Rome", "France", "Verona")) * 60


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    os.makedirs(root / "tiny")
    n = int(0.9 * len(TEXT))
    write_dataset(str(root / "tiny"), char_meta(TEXT), chunked(TEXT[:n]), chunked(TEXT[n:]))
    return str(root)


def tiny_args(data_dir, out_dir, **kw):
    args = dict(data_dir=data_dir, dataset="tiny", out_dir=str(out_dir), n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                block_size=32, batch_size=4, max_iters=30, lr_decay_iters=30, warmup_iters=5, eval_interval=10,
                eval_iters=4, log_interval=10, learning_rate=3e-3, device="cpu", dtype="float32", compile=False)
    args.update(kw)
    return [f"--{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="session")
def pretrained(data_dir, tmp_path_factory):
    """A 4-layer model trained 20 iterations on the tiny data: the model conversion tests start from."""
    out = tmp_path_factory.mktemp("pretrained")
    run(data_dir, out, n_layer=4, max_iters=20, lr_decay_iters=20)
    return str(out)


def run(data_dir, out_dir, **kw):
    return train(configure(TrainConfig(), tiny_args(data_dir, out_dir, **kw)))


def read_log(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def kv_stages(start, target):
    """The kv_sources of each adaptation stage; the final full fine-tuning must repeat the last one."""
    from train import adaptation_stages
    stages = adaptation_stages({"kv_sources": start, "att_sources": list(range(len(start)))}, target)
    assert stages[-1] == dict(stages[-2], freeze=False) and all(st["att_sources"] == list(range(len(start)))
                                                               for st in stages)
    return [st["kv_sources"] for st in stages[:-1]]
