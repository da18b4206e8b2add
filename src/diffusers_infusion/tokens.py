"""Where a class word sits in a tokenized prompt (index 0 is the start token).

A class word (or short phrase) may tokenize into several sub-tokens; the residual goes on the last sub-token of
each occurrence (METHOD.md, "Where the residual goes"). Prompts are tokenized exactly as diffusers'
``encode_prompt`` does (padded and truncated to ``tokenizer.model_max_length``), so positions index the rows of
the text encoder's output.
"""

from __future__ import annotations

from .errors import ClassWordError, InfusionCallError


def class_word_token_ids(tokenizer, class_word: str) -> list[int]:
    """Token ids of a class word without special tokens; raises if it is empty or has unknown tokens."""
    if not isinstance(class_word, str) or not class_word.strip():
        raise ClassWordError(
            f"class_word={class_word!r} is empty. Pass the concept's word, e.g. class_word='cat', "
            "to `load_infusion_concept` or `InfusionConcept`."
        )
    ids = tokenizer(class_word.strip(), add_special_tokens=False).input_ids
    unknown = tokenizer.unk_token_id
    if not ids or (unknown is not None and unknown in ids):
        raise ClassWordError(
            f"class_word={class_word!r} tokenizes to unknown tokens {tokenizer.convert_ids_to_tokens(ids)} in this "
            "pipeline's tokenizer. Use a word the tokenizer knows (the concept's super-class, e.g. 'cat')."
        )
    max_len = tokenizer.model_max_length - 2
    if len(ids) > max_len:
        raise ClassWordError(f"class_word={class_word!r} has {len(ids)} tokens; at most {max_len} fit in a prompt.")
    return ids


def prompt_token_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, padded and truncated as diffusers' ``encode_prompt`` tokenizes it."""
    return tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids


def find_class_word_positions(tokenizer, prompt: str, class_word: str) -> list[int]:
    """Positions of the last sub-token of every occurrence of ``class_word`` in ``prompt`` (may be empty)."""
    word = class_word_token_ids(tokenizer, class_word)
    ids = prompt_token_ids(tokenizer, prompt)
    n = len(word)
    return [start + n - 1 for start in range(1, len(ids) - n + 1) if ids[start : start + n] == word]


def check_token_indices(indices, *, name: str, sequence_length: int) -> tuple[int, ...]:
    """Validate explicit token indices for concept ``name``: integers in ``[1, sequence_length)``."""
    from .validation import check_token_positions

    indices = check_token_positions(indices, name=name)
    bad = [i for i in indices if not 1 <= i < sequence_length]
    if bad:
        raise InfusionCallError(
            f"infusion_token_indices[{name!r}] has positions {bad} outside [1, {sequence_length - 1}] "
            f"(prompts have {sequence_length} tokens; 0 is the start token). Use positions of the tokenized prompt."
        )
    return tuple(dict.fromkeys(indices))
