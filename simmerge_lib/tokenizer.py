"""A character-level tokenizer built with the ``tokenizers`` library and saved with every checkpoint.

Every character of :data:`simmerge_lib.tasks.ALPHABET` is one token; ``<pad>``, ``<bos>``, ``<eos>`` and ``<unk>``
come first. The tokenizer is wrapped in :class:`transformers.PreTrainedTokenizerFast`, so
``AutoTokenizer.from_pretrained(folder)`` loads it back from any catalogue checkpoint.
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .tasks import ALPHABET

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def build_tokenizer(alphabet: str = ALPHABET) -> PreTrainedTokenizerFast:
    """The kit's tokenizer: one id per character, ``<bos>`` prepended, decoding joins characters without spaces."""
    if len(set(alphabet)) != len(alphabet):
        raise ValueError("alphabet has repeated characters")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(alphabet))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    core.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",  # generation pads on the left so every prompt ends where decoding starts
        model_max_length=64,
        clean_up_tokenization_spaces=False,
    )
