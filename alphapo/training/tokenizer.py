"""Tokenizers for the trainer: a built-in character tokenizer, or any local Hugging Face one.

The built-in tokenizer needs no download: one token per printable ASCII character (plus
newline) and four special tokens, built in memory as a ``tokenizers`` WordLevel model and
wrapped in :class:`transformers.PreTrainedTokenizerFast`, so it has the usual surface
(``__call__``, ``decode``, ``apply_chat_template``, ``save_pretrained``) and a checkpoint
reloads with ``AutoTokenizer.from_pretrained``. Characters outside the alphabet map to
``<unk>``. Its small chat template lets conversational preference files train the
built-in model too::

    <|user|>What is 2+2?
    <|assistant|>4
"""

from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")
ALPHABET = tuple(chr(c) for c in range(32, 127)) + ("\n",)

# Jinja, as Hugging Face chat templates are: one "<|role|>content\n" line per message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer():
    """The built-in character tokenizer: V = 4 special + 96 characters = 100 tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + ALPHABET)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    # Every character is its own pre-token ("." alone would skip newlines).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"\n|."), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join characters back without spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def load_tokenizer(path: str = "", trust_remote_code: bool = False):
    """A local Hugging Face tokenizer, or the built-in one when ``path`` is empty.

    A tokenizer without a pad token pads with its eos token (TRL does the same); padded
    positions never reach the loss, whose targets there are ``ignore_index``.
    """
    if not path:
        return build_char_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path!r} has neither a pad nor an eos token: set one before training")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
