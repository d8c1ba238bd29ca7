"""The offline CLIP tokenizer against open_clip.tokenize (the SD 2.x reference) on awkward prompts."""

from __future__ import annotations

import pytest

from sdgen.families.base import CLIP, OPENCLIP
from sdgen.tokenizer import tokenize

PROMPTS = [
    "a hamster painting with a brush",
    "Hello, World!! café naïve 123 don't",
    "  multiple   spaces\tand\nnewlines ",
    "emoji 🐹 &amp; <b>bold</b> &lt;3",
    "mojibake: cafÃ©",
    "word " * 100,
    "",
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_ids_as_open_clip(prompt):
    import open_clip

    ids, _ = tokenize([prompt], OPENCLIP.pad_id, OPENCLIP.unescape_html)
    assert ids[0] == open_clip.tokenize([prompt])[0].tolist()


def test_sd1_pads_with_end_of_text():
    ids, lengths = tokenize(["a cat"], CLIP.pad_id, CLIP.unescape_html)
    assert ids[0][:4] == [49406, 320, 2368, 49407] and set(ids[0][4:]) == {49407}
    assert lengths == [4]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_same_ids_as_transformers_clip_tokenizer(prompt):
    """SD 1.x's reference tokenizer is transformers' CLIPTokenizer after ftfy (the reference's clean-up; the
    fast tokenizer of transformers 5 skips it): sdgen's own BPE gives its ids."""
    from sdgen.tokenizer import clean, hf_clip_tokenizer

    ids, lengths = tokenize([prompt], CLIP.pad_id, CLIP.unescape_html)
    expected = hf_clip_tokenizer()(clean(prompt, CLIP.unescape_html), truncation=False)["input_ids"]
    assert lengths == [len(expected)]
    if len(expected) > 77:
        expected = expected[:76] + expected[-1:]
    assert ids[0] == expected + [CLIP.pad_id] * (77 - len(expected))
