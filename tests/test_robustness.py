"""Nothing is lost and the run's own settings hold: a full disk, a diverging run, a resume in the middle of a
layer-wise conversion, and the inputs that should simply work (sliced targets, dropout when fine-tuning,
a bare --flag, BOS for LLaMA tokenizers)."""
import contextlib
import errno
import json
import os
import subprocess
import tempfile

import pytest
import torch

from echo.checkpoint import load_checkpoint, save_checkpoint
from conftest import kv_stages, read_log, run
from echo.tokenizer import tokenizer_from_meta
from model import LLaMA, ModelConfig, UsageError, resolve_sources


@contextlib.contextmanager
def small_disk(size_bytes):
    """A real tmpfs of that size if this machine lets us mount one (root), else None."""
    d = tempfile.mkdtemp()
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", d],
                        capture_output=True).returncode == 0
    try:
        yield d if ok else None
    finally:
        if ok:
            subprocess.run(["umount", d], capture_output=True)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch):
    run(data_dir, tmp_path / "probe", max_iters=2, eval_interval=2)
    size = os.path.getsize(tmp_path / "probe" / "ckpt.pt")
    with small_disk(int(1.5 * size) + 64 * 1024) as disk:  # room for one checkpoint and the log, not two
        out = disk or str(tmp_path / "sim")
        if disk is None:  # no tmpfs: the second save fails the way a full disk makes torch.save fail
            real, calls = torch.save, []

            def save(obj, f):
                calls.append(1)
                if len(calls) > 1:
                    f.write(b"partial")
                    raise OSError(errno.ENOSPC, "No space left on device")
                real(obj, f)
            monkeypatch.setattr(torch, "save", save)
        with pytest.raises(UsageError, match=r"could not write checkpoint .*No space left on device.*intact"):
            run(data_dir, out, max_iters=4, eval_interval=2)
        ckpt = load_checkpoint(os.path.join(out, "ckpt.pt"))
        assert ckpt["iter_num"] == 2 and not os.path.exists(os.path.join(out, "ckpt.pt.tmp"))


def test_a_diverging_run_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    run(data_dir, tmp_path, max_iters=10, lr_decay_iters=40)
    with pytest.raises(UsageError, match=r"the loss is (nan|inf) at iteration 1[0-9]: training diverged"):
        run(data_dir, tmp_path, init_from="resume", max_iters=40, learning_rate=1e30, min_lr=1e30, grad_clip=0.0,
            log_interval=1, eval_interval=5, lr_decay_iters=40)
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["iter_num"] == 10 and all(torch.isfinite(t).all() for t in ckpt["model"].values())


def test_stale_temp_file_is_removed_and_save_is_atomic(tmp_path, data_dir):
    os.makedirs(tmp_path / "out")
    (tmp_path / "out" / "ckpt.pt.tmp").write_bytes(b"left by a crash")
    run(data_dir, tmp_path / "out", max_iters=2, eval_interval=2)
    assert not os.path.exists(tmp_path / "out" / "ckpt.pt.tmp")
    save_checkpoint(str(tmp_path / "c.pt"), {"model": {"w": torch.ones(2)}, "model_args": {}})
    assert torch.equal(torch.load(tmp_path / "c.pt", weights_only=True)["model"]["w"], torch.ones(2))


@pytest.fixture(scope="module")
def pretrained(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    run(data_dir, out, n_layer=4, max_iters=10)
    return str(out)


def as_written_before_trainable(path):
    """Rewrite a checkpoint of a stages:layers run as one written when `adapt_freeze=True` said it: the flag in
    its config and a "freeze" flag in each stage instead of what trains."""
    ckpt = load_checkpoint(path)
    config = {k: v for k, v in ckpt["config"].items() if k != "trainable"} | {"adapt_freeze": True}
    stages = [{"kv_sources": st["kv_sources"], "att_sources": st["att_sources"], "freeze": st["trainable"] != "all"}
              for st in ckpt["adapt_stages"]]
    save_checkpoint(path, dict(ckpt, config=config, adapt_stages=stages))


@pytest.mark.parametrize("trainable", ["all", "stages:layers", "adapt_freeze"])
def test_resume_mid_conversion_restores_the_schedule(data_dir, pretrained, tmp_path, trainable):
    """A plain --init_from=resume, without repeating the schedule, continues it exactly; so does a checkpoint
    written before `trainable` ("adapt_freeze": its adapt_freeze=True is stages:layers)."""
    legacy, trainable = trainable == "adapt_freeze", "stages:layers" if trainable == "adapt_freeze" else trainable
    conv = dict(init_from=f"ckpt:{pretrained}", kv_share_target="echo:3", adapt_iters=4, trainable=trainable,
                kv_init="mean", max_iters=16, lr_decay_iters=16, eval_interval=3, dropout=0.1)
    run(data_dir, tmp_path / "full", **conv)
    run(data_dir, tmp_path / "half", **dict(conv, max_iters=6))      # stops inside stage 1
    if legacy:
        as_written_before_trainable(tmp_path / "half" / "ckpt.pt")
    run(data_dir, tmp_path / "half", init_from="resume", max_iters=16, lr_decay_iters=16, eval_interval=3)
    a, b = load_checkpoint(tmp_path / "full" / "ckpt.pt"), load_checkpoint(tmp_path / "half" / "ckpt.pt")
    assert a["stage"] == b["stage"] == 3 and b["config"]["trainable"] == trainable
    assert b["config"]["dropout"] == 0.1  # the run's dropout, not the default
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-6)
    # the log has each eval once, as the uninterrupted run's does
    evals = lambda d: [(r["iter"], r["stage"]) for r in read_log(d) if "val_loss" in r]  # noqa: E731
    assert evals(tmp_path / "half") == evals(tmp_path / "full")
    with pytest.raises(UsageError, match="adapt_iters=5, but the run being resumed has adapt_iters=4"):
        run(data_dir, tmp_path / "half", init_from="resume", max_iters=20, adapt_iters=5)


def test_stages_from_a_model_that_already_shares_are_valid():
    for start, target in [([0, 0, 2, 2], "echo:2"), ([0, 0, 0, 3, 3, 3], "echo:2"), ([0, 0, 2, 2, 4, 4], "cla:3")]:
        stages = kv_stages(start, target)
        for sources in stages:
            assert all(sources[s] == s and s <= i for i, s in enumerate(sources)), (start, target, sources)
        assert stages[-1] == resolve_sources(target, len(start))
    assert kv_stages([0, 0, 2, 2], "echo:2") == [[0, 1, 2, 1], [0, 1, 1, 1]]


def test_finetuning_applies_its_own_dropout(data_dir, pretrained, tmp_path):
    run(data_dir, tmp_path, init_from=f"ckpt:{pretrained}", max_iters=2, dropout=0.25)
    assert load_checkpoint(tmp_path / "ckpt.pt")["model_args"]["dropout"] == 0.25


def test_finetuning_without_kv_share_keeps_the_models_sharing(data_dir, tmp_path):
    run(data_dir, tmp_path / "echo", n_layer=4, kv_share="echo:2", max_iters=2)
    from conftest import tiny_args
    from configurator import configure
    from train import TrainConfig, train
    train(configure(TrainConfig(), tiny_args(data_dir, tmp_path / "ft", init_from=f"ckpt:{tmp_path / 'echo'}",
                                             max_iters=2)))  # no --kv_share: the default 'none' must not undo the sharing
    assert load_checkpoint(tmp_path / "ft" / "ckpt.pt")["model_args"]["kv_share"] == "echo:2"


def test_sliced_targets_work():
    torch.manual_seed(0)
    model = LLaMA(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=16))
    x = torch.randint(0, 50, (3, 17))
    _, sliced, _ = model(x[:, :-1], x[:, 1:])  # non-contiguous targets
    _, copied, _ = model(x[:, :-1].contiguous(), x[:, 1:].contiguous())
    assert torch.equal(sliced, copied)


def test_hf_tokenizer_prepends_bos_to_each_document():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="a"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    from echo.tokenizer import hf_meta
    with tempfile.TemporaryDirectory() as d:
        with open(os.path.join(d, "tokenizer.json"), "w") as f:
            f.write(tok.to_str())
        meta = hf_meta(d)
    assert (meta["bos"], meta["eot"]) == (0, 1)
    encode, decode = tokenizer_from_meta(json.loads(json.dumps(meta)))
    assert encode("a b<|endoftext|>b") == [0, 2, 3, 1, 0, 3]
    assert encode("b") == [0, 3] and "<s>" not in decode(encode("a b"))


def test_trainable_holds_for_the_whole_run_and_on_resume(data_dir, pretrained, tmp_path, capsys):
    """trainable='attention' one-shot (layers 1 and 3 read 0's and 2's K/V): through the whole run and across a
    resume only the consumers' attention and the K/V they read change; every other weight is the pretrained one."""
    conv = dict(init_from=f"ckpt:{pretrained}", kv_share="0,0,2,2", trainable="attention", max_iters=8,
                lr_decay_iters=8, eval_interval=4)
    run(data_dir, tmp_path / "full", **conv)
    said = capsys.readouterr().out
    run(data_dir, tmp_path / "half", **dict(conv, max_iters=4))
    run(data_dir, tmp_path / "half", init_from="resume", max_iters=8, lr_decay_iters=8, eval_interval=4)
    start = load_checkpoint(os.path.join(pretrained, "ckpt.pt"))["model"]
    a, b = load_checkpoint(tmp_path / "full" / "ckpt.pt"), load_checkpoint(tmp_path / "half" / "ckpt.pt")
    assert a["iter_num"] == b["iter_num"] == 8 and b["config"]["trainable"] == "attention"
    trained = {f"layers.{i}.attention.{w}.weight" for i, w in [(1, "wq"), (1, "wo"), (3, "wq"), (3, "wo"), (0, "wk"),
                                                                  (0, "wv"), (2, "wk"), (2, "wv")]}
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-6)
        assert torch.equal(a["model"][k], start[k]) == (k not in trained), k
    assert f"; {sum(start[k].numel() for k in trained):,} of them train" in said  # the run says how many
    with pytest.raises(UsageError, match="trainable='all', but the run being resumed has trainable='attention'"):
        run(data_dir, tmp_path / "half", init_from="resume", max_iters=12, trainable="all")
