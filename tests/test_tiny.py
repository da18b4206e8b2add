"""The in-code tokenizer and tiny components."""

from diffusers_infusion.attention import cross_attention_layers
from diffusers_infusion.tiny import DEFAULT_WORDS, build_clip_tokenizer, tiny_sd_components


def test_every_word_is_one_known_token():
    words = list(DEFAULT_WORDS) + ["photograph", "phot", "to", "toto", "beachball"]
    tokenizer = build_clip_tokenizer(words)
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != tokenizer.unk_token_id, word


def test_unlisted_words_become_characters_not_unknown_tokens():
    tokenizer = build_clip_tokenizer(["cat"])
    ids = tokenizer("dog", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(ids) == ["d", "o", "g</w>"]


def test_components_are_seeded_and_have_cross_attention_at_two_resolutions():
    a, b = tiny_sd_components(seed=3), tiny_sd_components(seed=3)
    for pa, pb in zip(a["unet"].parameters(), b["unet"].parameters()):
        assert (pa == pb).all()
    sizes = {attn.to_v.out_features for attn in cross_attention_layers(a["unet"]).values()}
    assert sizes == {16, 32}
