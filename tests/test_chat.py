"""Generation that stops at the model's end token, and chat: the model's own template, the KV cache kept between
turns (equal to a fresh prefill of the whole conversation, plain and sharing), turns dropped when the context
fills, one line for every bad input; on the real SmolLM2 (when installed), against transformers."""
import sys

import pytest
import torch

from echo.chat import Chat, load_template
from conftest import CHATML, bpe_tokenizer, run_script, tiny_gguf
from echo.tokenizer import tokenizer_from_meta
from echo.generate import generate_tokens, until_stop
from model import LLaMA, ModelConfig, UsageError
from echo.pretrained import gguf_meta, import_pretrained

@pytest.fixture(scope="module")
def tokenizer():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def gguf_chat(tokenizer, tmp_path_factory):
    return tiny_gguf(tmp_path_factory.mktemp("chat") / "tiny.gguf", tokenizer)


def greedy(model, ids, n, stop=()):
    return [t.item() for t in generate_tokens(model, torch.tensor([ids]), n, temperature=0, stop=stop)]


def test_each_row_stops_at_its_own_end_token():
    torch.manual_seed(1)
    model = LLaMA(ModelConfig(vocab_size=37, block_size=40, n_layer=3, n_head=6, n_kv_head=2, n_embd=36)).eval()
    idx = torch.randint(0, 37, (3, 5))
    free = torch.cat(list(generate_tokens(model, idx, 20, temperature=0)), 1).tolist()  # no end token
    stop = {free[0][4], free[1][2]}  # rows 0 and 1 end where these first appear; row 2 maybe never
    rows = torch.cat(list(generate_tokens(model, idx, 20, temperature=0, stop=stop)), 1).tolist()
    cut = [until_stop(row, stop) for row in rows]
    assert cut == [until_stop(row, stop) for row in free]  # stopping changes no token before the end
    assert len(cut[0]) <= 4 and len(cut[1]) <= 2 and not set(sum(cut, [])) & stop
    # generation ends as soon as every row has ended, not at max_new_tokens
    ends = [next((i for i, t in enumerate(row) if t in stop), None) for row in free]
    assert len(rows[0]) == (max(ends) + 1 if None not in ends else 20)


def test_sample_stops_at_the_files_end_token(tmp_path, tokenizer):
    """The GGUF's eos id ends the sample (not printed, not counted); --stop=False runs to max_new_tokens."""
    model_file = tiny_gguf(tmp_path / "probe.gguf", tokenizer)
    encode, _ = tokenizer_from_meta(gguf_meta(model_file))
    free = greedy(import_pretrained(f"gguf:{model_file}").eval(), encode("hello"), 12)
    end = free[5]  # the id greedy decoding reaches at its 6th token: make it the model's end token
    stopping = tiny_gguf(tmp_path / "stops.gguf", tokenizer, eos=end)  # the same weights
    args = ["sample.py", f"--init_from=gguf:{stopping}", "--start=hello", "--num_samples=1", "--max_new_tokens=12",
            "--temperature=0", "--dtype=float32"]  # the greedy tokens above are fp32's
    r = run_script(*args)
    assert r.returncode == 0, r.stderr
    n = len(until_stop(free, {end}))
    assert f"{n} tokens (1 x at most 12, {min(n + 1, 12)} steps)" in r.stdout, r.stdout
    r = run_script(*args, "--stop=False")
    assert "12 tokens (1 x at most 12, 12 steps)" in r.stdout, r.stdout


@pytest.mark.parametrize("sharing", [{}, {"kv_share": "0,1,1,3,1"}, {"att_share": "0,1,2,2,1"},
                                     {"kv_share": "0,0,2,3,4", "att_share": "0,1,2,1,1"}],
                         ids=["plain", "kv", "att", "att-source-reads-kv"])
def test_a_turn_prefills_only_its_own_tokens_and_equals_a_fresh_prefill(gguf_chat, sharing):
    model = import_pretrained(f"gguf:{gguf_chat}", **sharing).eval()
    meta = gguf_meta(gguf_chat)
    chat = Chat(model, meta, system="Be brief.")
    replies = [chat.reply(turn, 9, temperature=0) for turn in ("Give me the", "Speak of")]
    ids, start, _ = chat.prompt("Where is the", 9)
    assert 0 < start and ids[:start] == chat.in_cache[:start] and start >= len(chat.in_cache) - 9  # only its own turn
    with torch.no_grad():
        kept = model(torch.tensor([ids[start:]]), input_pos=torch.arange(start, len(ids)), all_logits=True)[0]
        fresh = model(torch.tensor([ids]), all_logits=True)[0]
    torch.testing.assert_close(kept, fresh[:, start:], atol=1e-5, rtol=1e-5)
    # the same conversation with the cache thrown away before every turn gives the same greedy replies
    again = Chat(model, meta, system="Be brief.")
    rebuilt = []
    for turn in ("Give me the", "Speak of"):
        again.in_cache, model.kv_cache = [], None
        rebuilt.append(again.reply(turn, 9, temperature=0))
    assert rebuilt == replies and again.messages == chat.messages[:-1]


def test_a_full_context_drops_the_oldest_turns(tmp_path, tokenizer):
    path = tiny_gguf(tmp_path / "short.gguf", tokenizer, block_size=60)
    chat = Chat(import_pretrained(f"gguf:{path}").eval(), gguf_meta(path))
    notes = []

    class Out:
        write = notes.append
        flush = staticmethod(lambda: None)

    for turn in ("Give me the", "Speak the", "Where is the love of"):
        chat.reply(turn, 10, temperature=0, out=Out())
    assert chat.dropped > 0 and any(n.startswith("note: the conversation would pass the context of 60") for n in notes)
    kept = [m["content"] for m in chat.messages]
    assert "Give me the" not in kept and kept[-2] == "Where is the love of"  # the oldest went, the newest stayed
    assert len(chat.tokens(chat.messages[:-1])) < 60
    before = (list(chat.messages), chat.dropped, list(chat.ids))
    with pytest.raises(UsageError, match=r"the prompt is \d+ tokens, longer than the model's context of 60"):
        chat.reply("the " * 80, 10)
    assert (chat.messages, chat.dropped, chat.ids) == before  # a turn that cannot be taken changes nothing


@pytest.mark.parametrize("template,match", [
    (None, "this model has no chat template"),
    ("{{ raise_exception('roles must alternate') }}", "fails to render this conversation (roles must alternate)"),
    ("{% for m in messages %}", "does not compile"),
])
def test_bad_templates_are_one_line(tmp_path, tokenizer, template, match):
    path = tiny_gguf(tmp_path / "t.gguf", tokenizer, template=template)
    r = run_script("sample.py", f"--init_from=gguf:{path}", "--chat", "--start=hello")
    assert r.returncode == 1 and "Traceback" not in r.stderr and match in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_piped_chat_answers_each_line_and_rejects_an_empty_turn(gguf_chat):
    args = ["sample.py", f"--init_from=gguf:{gguf_chat}", "--chat", "--temperature=0", "--max_new_tokens=6",
            "--system=Be brief.", "--dtype=float32"]  # compared below with the reply of an fp32 model
    r = run_script(*args, input="Give me\nSpeak\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count(" tokens in ") == 2
    model, meta = import_pretrained(f"gguf:{gguf_chat}").eval(), gguf_meta(gguf_chat)
    chat = Chat(model, meta, system="Be brief.")
    assert r.stdout.startswith(chat.reply("Give me", 6, temperature=0))  # the same reply in process
    r = run_script(*args, input="Give me\n\nSpeak\n")
    assert r.returncode == 1 and r.stderr.strip() == ("error: turn 2 is empty: each input line is one turn for "
                                                      "the model to answer")
    r = run_script(*args, "--start=" + "the " * 400)
    assert r.returncode == 1 and "longer than the model's context of 200" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_chat_needs_a_template_tokenizer_and_jinja2(monkeypatch):
    with pytest.raises(UsageError, match="no chat template"):
        load_template({"tokenizer": "hf"})
    monkeypatch.setitem(sys.modules, "jinja2", None)  # as if it were not installed
    with pytest.raises(UsageError, match="pip install jinja2"):
        load_template({"chat_template": CHATML})


def test_a_hugging_face_folder_gives_its_end_tokens_and_template(tmp_path, tokenizer):
    """generation_config.json's eos_token_id (an int or a list) wins over config.json's; tokenizer_config.json
    gives the chat template (a list of named templates: its 'default') and the special tokens it may name."""
    import json
    from echo.tokenizer import hf_meta, stop_ids
    tokenizer.save(str(tmp_path / "tokenizer.json"))

    def write(name, content):
        (tmp_path / name).write_text(json.dumps(content))

    write("config.json", {"eos_token_id": 7})
    assert hf_meta(str(tmp_path))["stop"] == [7] and hf_meta(str(tmp_path))["chat_template"] is None
    write("generation_config.json", {"eos_token_id": [9, 2, 9]})
    write("tokenizer_config.json", {"chat_template": [{"name": "tool_use", "template": "x"},
                                                      {"name": "default", "template": CHATML}],
                                    "eos_token": {"content": "<|im_end|>"}, "bos_token": "<|endoftext|>"})
    meta = hf_meta(str(tmp_path))
    assert stop_ids(meta) == [2, 9] and meta["chat_template"] == CHATML
    assert meta["chat_tokens"] == {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}
    assert stop_ids({"tokenizer": "gpt2", "eot": 50256}) == [50256] and stop_ids({"tokenizer": "char"}) == []
    write("generation_config.json", {"eos_token_id": "two"})
    with pytest.raises(UsageError, match="eos_token_id \\['two'\\] is not a list of ids"):
        hf_meta(str(tmp_path))


def test_every_row_ended_is_asked_every_check_every_tokens(monkeypatch):
    """The GPU's interval, run on the CPU: once every row has ended, generation runs on to the next ask (the
    16th token), not one token further; asked every token, it ends at the end token itself."""
    import echo.generate as generate
    torch.manual_seed(1)
    model = LLaMA(ModelConfig(vocab_size=37, block_size=64, n_layer=2, n_head=6, n_kv_head=2, n_embd=36)).eval()
    idx = torch.randint(0, 37, (1, 5))
    free = torch.cat(list(generate_tokens(model, idx, 40, temperature=0)), 1)[0].tolist()
    end = free[2]
    first = free.index(end)
    assert len(list(generate_tokens(model, idx, 40, temperature=0, stop={end}))) == first + 1
    monkeypatch.setitem(generate.STOP_CHECK_EVERY, "cpu", 16)
    assert len(list(generate_tokens(model, idx, 40, temperature=0, stop={end}))) == 16 * (first // 16 + 1)
