"""Class-word positions in tokenized prompts."""

import pytest

from diffusers_infusion import ClassWordError
from diffusers_infusion.tiny import build_clip_tokenizer
from diffusers_infusion.tokens import check_token_indices, class_word_token_ids, find_class_word_positions


@pytest.fixture(scope="module")
def tokenizer():
    return build_clip_tokenizer()


@pytest.mark.parametrize(
    "prompt, word, expected",
    [
        ("a photo of a cat", "cat", [5]),  # 0 is the start token
        ("a cat and a cat", "cat", [2, 5]),  # every occurrence
        ("A Photo of a CAT, on snow", "cat", [5]),  # CLIP lowercases; punctuation is its own token
        ("a teddy bear on the moon", "teddy bear", [3]),  # a phrase: its last sub-token
        ("a bear and a teddy", "teddy bear", []),  # the words, but not the phrase
        ("a photo of a dog", "cat", []),
        ("a catalogue", "cat", []),  # a different word is not the class word
    ],
)
def test_positions(tokenizer, prompt, word, expected):
    assert find_class_word_positions(tokenizer, prompt, word) == expected


def test_multi_token_word_uses_last_sub_token(tokenizer):
    ids = class_word_token_ids(tokenizer, "zq")  # not in the vocabulary as a word: two character tokens
    assert len(ids) == 2
    assert find_class_word_positions(tokenizer, "a zq here", "zq") == [3]


def test_truncated_prompts_lose_late_occurrences(tokenizer):
    prompt = "a " * 80 + "cat"
    assert find_class_word_positions(tokenizer, prompt, "cat") == []


def test_bad_class_words(tokenizer):
    with pytest.raises(ClassWordError, match="is empty"):
        class_word_token_ids(tokenizer, " ")
    with pytest.raises(ClassWordError, match="at most 75 fit"):
        class_word_token_ids(tokenizer, "cat " * 80)


def test_check_token_indices():
    assert check_token_indices([3, 3, 5], name="c", sequence_length=77) == (3, 5)
    assert check_token_indices(4, name="c", sequence_length=77) == (4,)
