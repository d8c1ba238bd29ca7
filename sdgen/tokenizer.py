"""The CLIP BPE tokenizer, built offline from the vocabulary file that open_clip_torch ships.

SD 1.x's CLIP ViT-L/14 and SD 2.x's OpenCLIP ViT-H/14 use the same 49,408-token vocabulary; they differ only
in the padding id (SD 1.x pads with <|endoftext|>, open_clip.tokenize pads with 0), which the text encoder
chooses. The file is located without importing open_clip (which would import torchvision and more).
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from pathlib import Path

from sdgen.errors import SdgenError

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
N_MERGES = 49152 - 256 - 2  # the merges open_clip and OpenAI CLIP use; the rest of the file is unused
CONTEXT_LENGTH = 77
START, END = "<|startoftext|>", "<|endoftext|>"


def _byte_alphabet() -> list[str]:
    """GPT-2's reversible byte -> printable-unicode table (Radford et al., 2019), in byte order."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    # vocabulary order: printable bytes first, then the remapped ones (as CLIP's vocab.json)
    return [table[b] for b in printable] + [table[b] for b in range(256) if b not in printable]


def bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SdgenError("open_clip_torch is not installed; it ships the CLIP vocabulary sdgen needs")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise SdgenError(f"the CLIP vocabulary {path} is missing; reinstall open_clip_torch")
    return path


@functools.lru_cache(maxsize=1)
def clip_tokenizer():
    """A transformers CLIPTokenizer equal to openai/clip-vit-large-patch14's, built without the network."""
    from transformers import CLIPTokenizer

    lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    alphabet = _byte_alphabet()
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges] + [START, END]
    vocab = {t: i for i, t in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=1_000_000)  # we cut to 77 ourselves


def clean(text: str, unescape_html: bool) -> str:
    """The references' text clean-up before BPE: ftfy's fix_text (both), HTML entities unescaped twice
    (open_clip, SD 2.x), whitespace runs collapsed; lower-casing is the tokenizer's own."""
    try:
        import ftfy  # a dependency of open_clip_torch

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    if unescape_html:
        text = html.unescape(html.unescape(text))
    return " ".join(text.split())


def tokenize(prompts: list[str], pad_id: int, unescape_html: bool) -> tuple[list[list[int]], list[int]]:
    """Token ids padded/cut to 77 (start ... end, pad), and each prompt's untruncated length. The pad id and
    the HTML clean-up are the family's (SD 1.x's HF CLIP tokenizer, SD 2.x's open_clip.tokenize)."""
    tok = clip_tokenizer()
    cleaned = [clean(p, unescape_html=unescape_html) for p in prompts]
    full = tok(cleaned, add_special_tokens=True, truncation=False)["input_ids"]
    ids = []
    for seq in full:
        if len(seq) > CONTEXT_LENGTH:
            seq = seq[: CONTEXT_LENGTH - 1] + [seq[-1]]  # keep <|endoftext|> last, as both references do
        ids.append(seq + [pad_id] * (CONTEXT_LENGTH - len(seq)))
    return ids, [len(s) for s in full]
