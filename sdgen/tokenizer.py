"""The CLIP BPE tokenizer, built offline from the vocabulary file that open_clip_torch ships.

SD 1.x's CLIP ViT-L/14 and SD 2.x's OpenCLIP ViT-H/14 use the same 49,408-token vocabulary; they differ only
in the padding id (SD 1.x pads with <|endoftext|>, open_clip.tokenize pads with 0), which the text encoder
chooses. The file is located without importing open_clip (which would import torchvision and more), and the
byte-pair encoding is sdgen's own (CLIP's algorithm: Radford et al., 2021), because importing transformers'
tokenizer alone costs a second of every start-up.
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


def _byte_table() -> dict[int, str]:
    """GPT-2's reversible byte -> printable-unicode table (Radford et al., 2019)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _byte_alphabet() -> list[str]:
    """The byte characters in vocabulary order: printable bytes first, then the remapped ones (as CLIP's
    vocab.json)."""
    table = _byte_table()
    printable = [b for b, c in table.items() if c == chr(b)]
    return [table[b] for b in printable] + [table[b] for b in range(256) if b not in printable]


def bpe_file() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SdgenError("open_clip_torch is not installed; it ships the CLIP vocabulary sdgen needs")
    path = Path(next(iter(spec.submodule_search_locations))) / BPE_FILE
    if not path.is_file():
        raise SdgenError(f"the CLIP vocabulary {path} is missing; reinstall open_clip_torch")
    return path


class BytePairEncoder:
    """CLIP's BPE over its 49,408-token vocabulary (the ids open_clip and transformers' CLIPTokenizer give)."""

    # CLIP's pre-tokenizer: the special tokens, English contractions, letter runs, single digits, and runs
    # of anything else that is not whitespace (applied to lower-cased text)
    PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""

    def __init__(self, merges: list[tuple[str, str]]) -> None:
        import regex  # \p{L} classes; a dependency of open_clip_torch

        alphabet = _byte_alphabet()
        tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges] + [START, END]
        self.ids = {t: i for i, t in enumerate(tokens)}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.bytes = _byte_table()
        self.pattern = regex.compile(self.PATTERN, regex.IGNORECASE)
        self.bpe = functools.lru_cache(maxsize=65536)(self._bpe)

    def _bpe(self, token: str) -> tuple[str, ...]:
        """Merge the pair of lowest rank until none is in the merge list; '</w>' marks the word's end."""
        word = tuple(token[:-1]) + (token[-1] + "</w>",)
        while len(word) > 1:
            pairs = set(zip(word, word[1:], strict=False))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, len(self.ranks)))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
        return word

    def encode(self, text: str) -> list[int]:
        """Ids of cleaned text, without the start and end tokens."""
        out = []
        for piece in self.pattern.findall(text.lower()):
            token = "".join(self.bytes[b] for b in piece.encode("utf-8"))
            out += [self.ids[t] for t in self.bpe(token)]
        return out


@functools.lru_cache(maxsize=1)
def clip_bpe() -> BytePairEncoder:
    """The encoder of openai/clip-vit-large-patch14 (and open_clip), built from the shipped merges file."""
    lines = gzip.open(bpe_file()).read().decode("utf-8").split("\n")
    merges = [(a, b) for a, b in (line.split() for line in lines[1 : N_MERGES + 1])]
    return BytePairEncoder(merges)


def hf_clip_tokenizer():
    """transformers' CLIPTokenizer with the same vocabulary, for parity checks and the diffusers side of
    bench/ (it imports transformers: sdgen itself never calls it)."""
    from transformers import CLIPTokenizer

    bpe = clip_bpe()
    merges = list(bpe.ranks)
    return CLIPTokenizer(vocab=dict(bpe.ids), merges=merges, model_max_length=1_000_000)


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
    bpe = clip_bpe()
    start, end = bpe.ids[START], bpe.ids[END]
    full = [[start, *bpe.encode(clean(p, unescape_html=unescape_html)), end] for p in prompts]
    ids = []
    for seq in full:
        if len(seq) > CONTEXT_LENGTH:
            seq = seq[: CONTEXT_LENGTH - 1] + [seq[-1]]  # keep <|endoftext|> last, as both references do
        ids.append(seq + [pad_id] * (CONTEXT_LENGTH - len(seq)))
    return ids, [len(s) for s in full]
