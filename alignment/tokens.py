"""The special tokens the pipeline relies on: which ids end a response, and which one pads.

Real instruct models declare more than one end: LLaMA-3's tokenizer ends a turn with <|eot_id|> while its
generation_config.json also lists <|end_of_text|> and <|eom_id|>; Qwen2's ends with <|im_end|> and lists
<|endoftext|>. A response ends at the first of any of them, in generation, in the masks that PPO and the held-out
evaluation build, where the reward model reads, and in an exported model's generation config.

The pad token must be none of those ends (the reward model reads a sequence at its last token that is not
padding, and generation never samples the pad), and costs no new embedding row where the tokenizer has a special
token kept for such use (LLaMA-3.1's <|finetune_right_pad_id|>, LLaMA-3.0's reserved tokens, Pythia's
<|padding|>): only a tokenizer with none gets a token of its own, <|pad|>.
"""

from __future__ import annotations

import re
from pathlib import Path

NEW_PAD = "<|pad|>"
# special tokens meant for padding, in the order tried, then reserved tokens a tokenizer keeps unused
PAD_NAMES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>")
RESERVED = re.compile(r"<\|reserved_special_token_\d+\|>|\[control_\d+\]|<unused\d+>")


def declared_end_ids(tokenizer, source: str | Path = "") -> tuple[int, ...]:
    """Every id that ends a response: the tokenizer's EOS, then those of the generation config at source (a model
    folder, a checkpoint, a hub id in the cache), in order, without repeats."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if source:
        from transformers import GenerationConfig

        try:
            declared = GenerationConfig.from_pretrained(str(source)).eos_token_id
        except (OSError, ValueError):  # none there (a tokenizer-only folder, a model without one)
            declared = None
        ids += [declared] if isinstance(declared, int) else list(declared or [])
    return tuple(dict.fromkeys(i for i in ids if i is not None and i < len(tokenizer)))


def end_ids(tokenizer) -> tuple[int, ...]:
    """The ids that end a response for a tokenizer loaded by loading.load_tokenizer (declared_end_ids, kept on it),
    else its EOS alone (none for a tokenizer without one: responses then run to their length limit)."""
    return getattr(tokenizer, "end_ids", None) or tuple(i for i in (tokenizer.eos_token_id,) if i is not None)


def choose_pad(tokenizer, ends: tuple[int, ...]) -> None:
    """Sets a pad token that is none of ends: the tokenizer's own where it is not, else a special token kept for
    padding or reserved (no new embedding row), else a new one, NEW_PAD (loading.fit_vocabulary gives it a row)."""
    if tokenizer.pad_token is not None and tokenizer.pad_token_id not in ends:
        return
    specials = {t.content: i for i, t in tokenizer.added_tokens_decoder.items() if t.special and i not in ends}
    named = [name for name in PAD_NAMES if name in specials]
    reserved = sorted((i, name) for name, i in specials.items() if RESERVED.fullmatch(name))
    choice = named[0] if named else reserved[0][1] if reserved else None
    if choice is None:
        tokenizer.add_special_tokens({"pad_token": NEW_PAD})
    else:
        tokenizer.pad_token = choice
