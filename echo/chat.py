"""Talking to a chat model as its authors meant: the conversation rendered with the model's own chat template
(jinja2, the engine those templates are written for), each reply stopping at the model's end token, and the
KV cache kept between turns, so that a new turn prefills only the tokens that follow what the cache holds.

    chat = Chat(model, meta, system="You are terse.")
    print(chat.reply("What is the capital of France?", max_new_tokens=60, temperature=0))
"""
import torch

from echo.generate import generate_tokens, regrow_cache, until_stop
from echo.tokenizer import stop_ids, text_encoder, tokenizer_from_meta
from model import UsageError


def load_template(meta):
    """The model's chat template, compiled as transformers compiles it (a sandbox, trim_blocks, lstrip_blocks,
    loop controls, tojson and raise_exception), or one clear error."""
    if not meta.get("chat_template"):
        raise UsageError("this model has no chat template (GGUF tokenizer.chat_template, or tokenizer_config.json's "
                         "chat_template): sample it without --chat")
    try:
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise UsageError("--chat renders the model's chat template with jinja2: pip install jinja2") from None
    import json

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(meta["chat_template"])
    except jinja2.exceptions.TemplateError as e:
        raise UsageError(f"the model's chat template does not compile ({e})") from None


class Chat:
    """A conversation with a model: its messages, the text and tokens they make (the replies as the model
    generated them), and the token ids its KV cache holds (positions 0..n-1)."""

    def __init__(self, model, meta, system=None):
        if meta.get("tokenizer") != "hf":  # chat templates come with Hugging Face (or GGUF) tokenizers
            raise UsageError("--chat needs a model with a Hugging Face or GGUF tokenizer and a chat template")
        self.model, self.meta, self.template = model, meta, load_template(meta)
        self.encode, self.decode = text_encoder(meta), tokenizer_from_meta(meta)[1]
        self.stop = stop_ids(meta)
        self.messages = [{"role": "system", "content": system}] if system is not None else []
        self.text, self.ids = "", []  # the conversation so far, rendered, and its tokens
        self.in_cache = []  # the token ids whose keys and values the cache holds, in order
        self.dropped = 0  # turns dropped so far because the conversation outgrew the context
        self.reply_tokens = 0  # how many tokens the last reply had (its end token not counted)

    def render(self, messages):
        """The conversation with the prompt for the assistant's next reply, as text."""
        import jinja2
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.meta.get("chat_tokens", {}))
        except jinja2.exceptions.TemplateError as e:
            raise UsageError(f"the model's chat template fails to render this conversation ({e})") from None

    def tokens(self, messages, extend=True):
        """The token ids of render(messages). What extends the conversation so far is encoded on its own after
        its tokens, so the replies keep the tokens the model generated (decoding and encoding them again may
        split them otherwise); a template that renders earlier turns differently (or extend=False: turns were
        dropped) is encoded whole."""
        text = self.render(messages)
        if extend and self.text and text.startswith(self.text):
            return self.ids + self.encode(text[len(self.text):])  # special tokens in the text stay whole
        return self.encode(text)

    def prompt(self, user, max_new_tokens):
        """(ids, start, max_new_tokens) for the next turn: the conversation's ids with the user's turn, how many
        of them the cache already holds (only the rest is prefilled), and how many tokens the reply may have.
        When the conversation would pass the context, the oldest turns are dropped (the cache is rebuilt).
        A turn that cannot be taken is an error that leaves the conversation as it was."""
        if not user.strip():
            raise UsageError("an empty turn: type something for the model to answer")
        block, first = self.model.config.block_size, int(bool(self.messages) and self.messages[0]["role"] == "system")
        messages, dropped = self.messages + [{"role": "user", "content": user}], 0
        ids = self.tokens(messages)
        while len(ids) + max_new_tokens > block and len(messages) - first > 1:  # drop the oldest user/assistant pair
            del messages[first:first + 2]
            dropped += 1
            ids = self.tokens(messages, extend=False)  # the start changed: encode it all again
        if len(ids) >= block:
            raise UsageError(f"the prompt is {len(ids)} tokens, longer than the model's context of {block}: shorten it")
        self.messages, self.dropped = messages, self.dropped + dropped
        start = next((i for i, (a, b) in enumerate(zip(self.in_cache, ids)) if a != b), min(len(self.in_cache), len(ids)))
        start = min(start, len(ids) - 1)  # the last prompt token is always run: its logits give the first reply token
        needed, old = min(block, len(ids) + max_new_tokens), self.model.kv_cache
        if old is None or old.batch_size != 1:  # no cache of ours yet
            self.model.kv_cache, start = None, 0
            self.model.setup_cache(1, needed)
        elif old.max_len < needed:  # grow it (doubling), keeping what it holds
            regrow_cache(self.model, 1, min(block, max(needed, 2 * old.max_len)))
        return ids, start, min(max_new_tokens, block - len(ids))

    @torch.no_grad()
    def reply(self, user, max_new_tokens, temperature=0.8, top_k=None, top_p=None, out=None):
        """The model's answer to the user's turn, streamed to `out` if given, up to its end token."""
        dropped = self.dropped
        ids, start, max_new_tokens = self.prompt(user, max_new_tokens)
        if self.dropped > dropped and out:
            out.write(f"note: the conversation would pass the context of {self.model.config.block_size} tokens: "
                      f"dropped the oldest {self.dropped - dropped} turn(s)\n")
        device = self.model.tok_embeddings.weight.device
        idx = torch.tensor([ids], dtype=torch.long, device=device)
        new, printed = [], 0
        for token in generate_tokens(self.model, idx, max_new_tokens, temperature, top_k, top_p,
                                     self.meta["vocab_size"], stop=self.stop, keep_cache=True, start_pos=start):
            new.append(token.item())
            if new[-1] in self.stop:
                break
            if out:  # what decodes cleanly so far (a BPE token can end mid-character)
                text = self.decode(new)
                if not text.endswith("\ufffd"):
                    out.write(text[printed:])
                    out.flush()
                    printed = len(text)
        self.in_cache = ids + new[:-1]  # every token but the last was fed back through the cache
        reply = until_stop(new, self.stop)  # the end token comes back as the template's own text next turn
        text = self.decode(reply)
        self.messages.append({"role": "assistant", "content": text})
        self.text, self.ids = self.render(self.messages[:-1]) + text, ids + reply
        self.reply_tokens = len(reply)
        return text
