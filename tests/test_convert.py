"""Importing a Hugging Face LLaMA, converting to K/V sharing, and layer-wise adaptation."""
import json
import os

import pytest
import torch

from echo.checkpoint import load_checkpoint
from echo.pretrained import from_pretrained
from conftest import TEXT, kv_stages, read_log, run, run_script
from echo.conversion import convert_sharing
from model import LLaMA, UsageError
from sample import SampleConfig, sample

transformers = pytest.importorskip("transformers")  # test-only: builds the reference model
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

VOCAB = 300


def make_hf_dir(path, tied, **overrides):
    """A tiny random LlamaForCausalLM (GQA) saved as Hugging Face does, with a byte-level BPE tokenizer."""
    cfg = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=96, rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied,
               max_position_embeddings=64)
    cfg.update(overrides)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    hf.save_pretrained(path)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["</s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(os.path.join(path, "tokenizer.json"))
    return hf


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    make_hf_dir(str(path), tied=False)
    return str(path)


def logits_of(model, idx):
    with torch.no_grad():
        out = model(idx, all_logits=True) if isinstance(model, LLaMA) else model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


@pytest.mark.parametrize("tied", [True, False])
def test_imported_logits_equal_transformers(tmp_path, tied):
    hf = make_hf_dir(str(tmp_path), tied)
    ours = from_pretrained(str(tmp_path)).eval()
    assert ours.config.tie_embeddings == tied and ours.config.rope_theta == 5000.0 and ours.config.n_kv_head == 2
    idx = torch.randint(0, VOCAB, (2, 40))
    torch.testing.assert_close(logits_of(ours, idx), logits_of(hf, idx), atol=1e-5, rtol=1e-5)


def test_bin_and_sharded_checkpoints_load_the_same(tmp_path, hf_dir):
    ref = logits_of(from_pretrained(hf_dir).eval(), idx := torch.randint(0, VOCAB, (1, 16)))
    state = transformers.LlamaForCausalLM.from_pretrained(hf_dir).state_dict()
    for layout in ("bin", "sharded"):
        d = tmp_path / layout
        os.makedirs(d)
        (d / "config.json").write_text(open(os.path.join(hf_dir, "config.json")).read())
        if layout == "bin":
            torch.save(state, d / "pytorch_model.bin")
        else:
            names = sorted(state)
            shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
            for file, keys in shards.items():
                save_file({k: state[k].contiguous() for k in keys}, d / file)
            index = {"weight_map": {k: f for f, keys in shards.items() for k in keys}}
            (d / "model.safetensors.index.json").write_text(json.dumps(index))
        torch.testing.assert_close(logits_of(from_pretrained(str(d)).eval(), idx), ref)


def edited_config(tmp_path, hf_dir, **changes):
    d = tmp_path / "edited"
    os.makedirs(d)
    cfg = json.load(open(os.path.join(hf_dir, "config.json")))
    cfg.update(changes)
    (d / "config.json").write_text(json.dumps(cfg))
    os.symlink(os.path.join(hf_dir, "model.safetensors"), d / "model.safetensors")
    return str(d)


@pytest.mark.parametrize("changes,match", [
    (dict(architectures=["GPT2LMHeadModel"]), "architecture \\['GPT2LMHeadModel'\\] is not supported"),
    (dict(intermediate_size=100), "mlp.(gate|up|down)_proj.weight has shape .*96.*, the config implies .*100"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope scaling .* is not supported"),
    (dict(attention_bias=True), "biases"),
])
def test_import_errors_name_the_problem(tmp_path, hf_dir, changes, match):
    with pytest.raises(UsageError, match=match):
        from_pretrained(edited_config(tmp_path, hf_dir, **changes))


def test_import_missing_files(tmp_path):
    with pytest.raises(UsageError, match="no config.json"):
        from_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "vocab_size": 10,
                                                      "hidden_size": 8, "num_hidden_layers": 1,
                                                      "num_attention_heads": 2, "intermediate_size": 16}))
    with pytest.raises(UsageError, match="no model.safetensors, pytorch_model.bin"):
        from_pretrained(str(tmp_path))


def test_keep_and_mean_conversions(hf_dir):
    base = from_pretrained(hf_dir).eval()
    old = base.state_dict()
    kv = lambda sd, i, w="wk": sd[f"layers.{i}.attention.{w}.weight"]  # noqa: E731
    for init in ("keep", "mean"):
        model = convert_sharing(base, "echo:2", kv_init=init).eval()  # layers 2 and 3 read layer 1
        new = model.state_dict()
        assert model.kv_sources == [0, 1, 1, 1] and not any(".2.attention.wk" in k or ".3.attention.wv" in k for k in new)
        for w in ("wk", "wv"):
            expect = kv(old, 1, w) if init == "keep" else (kv(old, 1, w) + kv(old, 2, w) + kv(old, 3, w)) / 3
            torch.testing.assert_close(kv(new, 1, w), expect)
            assert torch.equal(kv(new, 0, w), kv(old, 0, w))
        for k in new:  # everything else is carried over untouched
            if ".wk." not in k and ".wv." not in k:
                assert torch.equal(new[k], old[k]), k
        idx = torch.randint(0, VOCAB, (2, 12))
        full = logits_of(model, idx)
        model.setup_cache(2, 12)
        prefill = model(idx[:, :7], input_pos=torch.arange(7), all_logits=True)[0]
        steps = [model(idx[:, t:t + 1], input_pos=torch.tensor([t]))[0] for t in range(7, 12)]
        torch.testing.assert_close(torch.cat([prefill] + steps, dim=1), full, atol=1e-5, rtol=1e-5)
    # converting an already-shared model: a new producer starts from the K/V its layer actually used
    cla = convert_sharing(base, "cla:2", kv_init="keep")                      # [0, 0, 2, 2]
    again = convert_sharing(cla, "0,1,1,1", kv_init="keep").state_dict()      # layer 1 becomes a producer
    assert torch.equal(kv(again, 1), kv(old, 0))
    with pytest.raises(ValueError, match="kv_init='median'"):
        convert_sharing(base, "echo:1", kv_init="median")


def test_from_pretrained_converts_when_asked(hf_dir):
    model = from_pretrained(hf_dir, kv_share="echo:3", kv_init="mean", block_size=32)
    assert model.kv_sources == [0, 0, 0, 0] and model.config.block_size == 32
    with pytest.raises(UsageError, match="unknown model config key"):
        from_pretrained(hf_dir, n_layers=2)


def test_adaptation_stages_convert_top_down():
    assert kv_stages(list(range(6)), "echo:3") == [[0, 1, 2, 3, 4, 2], [0, 1, 2, 3, 2, 2], [0, 1, 2, 2, 2, 2]]
    stages = kv_stages(list(range(8)), "echo:5")  # 1, 2, 4, then all 5 consumers of layer 2
    assert [sum(s != i for i, s in enumerate(st)) for st in stages] == [1, 2, 4, 5]
    assert kv_stages(list(range(4)), "cla:2") == [[0, 1, 2, 2], [0, 0, 2, 2]]


def test_adaptation_freezes_the_unconverted_layers(data_dir, pretrained, tmp_path):
    # stage 0 of echo:3 on 4 layers: only layer 3 reads layer 0; train 4 iterations, frozen
    run(data_dir, tmp_path, n_layer=4, init_from=f"ckpt:{pretrained}", kv_share_target="echo:3", adapt_iters=4,
        trainable="stages:layers", max_iters=4, eval_interval=4)
    before = load_checkpoint(os.path.join(pretrained, "ckpt.pt"))["model"]
    after = load_checkpoint(os.path.join(tmp_path, "ckpt.pt"))
    assert after["model_args"]["kv_share"] == "0,1,2,0" and after["stage"] == 0
    trains = lambda k: k.startswith("layers.3.") or k.startswith(("layers.0.attention.wk", "layers.0.attention.wv"))  # noqa: E731
    for k, v in after["model"].items():
        assert torch.equal(v, before[k]) != trains(k), k
    assert "layers.3.attention.wk.weight" not in after["model"]


def test_adaptation_runs_all_stages_and_resumes_mid_schedule(data_dir, pretrained, tmp_path):
    common = dict(n_layer=4, init_from=f"ckpt:{pretrained}", kv_share_target="echo:3", adapt_iters=4,
                  trainable="stages:layers", max_iters=16, lr_decay_iters=16, eval_interval=4, kv_init="mean")
    run(data_dir, tmp_path / "full", **common)
    evals = [r for r in read_log(tmp_path / "full") if "val_loss" in r]
    assert [(r["iter"], r["stage"]) for r in evals] == [(0, 0), (4, 0), (8, 1), (12, 2), (16, 3)]
    assert evals[-1]["kv_sources"] == [0, 0, 0, 0]
    run(data_dir, tmp_path / "split", **{**common, "max_iters": 6})  # stops inside stage 1
    run(data_dir, tmp_path / "split", **{**common, "init_from": "resume"})
    a, b = load_checkpoint(tmp_path / "full" / "ckpt.pt"), load_checkpoint(tmp_path / "split" / "ckpt.pt")
    assert a["stage"] == b["stage"] == 3 and a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], atol=1e-6, rtol=1e-6)


def test_finetune_imported_model_on_its_own_tokens_then_sample(hf_dir, tmp_path):
    (tmp_path / "in.txt").write_text(TEXT)
    data = tmp_path / "data"
    r = run_script("data/shakespeare/prepare.py", f"--input={tmp_path / 'in.txt'}", f"--out_dir={data / 'hfdata'}",
                   f"--tokenizer=hf:{hf_dir}")
    assert r.returncode == 0, r.stderr
    run(str(data), tmp_path / "ft", dataset="hfdata", init_from=f"hf:{hf_dir}", kv_share="echo:2", max_iters=4)
    ckpt = load_checkpoint(tmp_path / "ft" / "ckpt.pt")
    assert ckpt["model_args"]["n_embd"] == 64 and ckpt["model_args"]["kv_share"] == "echo:2"
    texts, stats = sample(SampleConfig(out_dir=str(tmp_path / "ft"), device="cpu", dtype="float32", num_samples=1,
                                       max_new_tokens=8, start="Give me"))
    assert texts[0].startswith("Give me") and stats["v_slots"] == 2
    texts, _ = sample(SampleConfig(init_from=f"hf:{hf_dir}", device="cpu", dtype="float32", num_samples=2,
                                   max_new_tokens=5, start="Speak"))
    assert len(texts) == 2 and texts[0].startswith("Speak")


def test_imported_model_rejects_data_in_other_tokens(data_dir, hf_dir, tmp_path):
    with pytest.raises(UsageError, match="prepare it with --tokenizer=hf:"):
        run(data_dir, tmp_path, init_from=f"hf:{hf_dir}")


def test_the_schedules_worked_example_and_its_stage_lines():
    """conversion.py's docstring example: echo:7 on 30 layers converts 1, 2, 4, then all 7 readers from the top,
    and train.py says per stage which layers convert and what they read, not two 30-entry lists."""
    from echo.conversion import adaptation_stages, describe_stage
    plain = {"kv_sources": list(range(30)), "att_sources": list(range(30))}
    stages = adaptation_stages(plain, "echo:7")
    readers = [sum(s != i for i, s in enumerate(st["kv_sources"])) for st in stages]
    assert readers == [1, 2, 4, 7, 7] and stages[-1] == dict(stages[-2], trainable="all")
    lines = [describe_stage(st, before) for st, before in zip(stages[:-1], [plain] + stages)]
    assert lines == ["29<-22 K/V", "28<-22 K/V", "26,27<-22 K/V", "23,24,25<-22 K/V"]
    five = {"kv_sources": [0, 1, 2, 3, 4], "att_sources": [0, 1, 2, 3, 4]}
    both = adaptation_stages(five, "0,0,2,3,4", "0,1,2,2,1")  # both kinds: each stage names its kind
    assert [describe_stage(st, b) for st, b in zip(both[:-1], [five] + both)] == [
        "4<-1 attention", "3<-2 attention", "1<-0 K/V"]
    assert describe_stage(both[-1], five) == "1<-0 K/V; 3<-2 attention; 4<-1 attention"
    assert describe_stage(plain, plain) == "no layer"
