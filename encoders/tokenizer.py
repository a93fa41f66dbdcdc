"""CLIP byte-level BPE tokenizer: prompt -> (B, 77) ids for the text towers in encoders/clip.py.

Follows the original tokenizer, openai/CLIP@a1d0717 `clip/simple_tokenizer.py` (OpenCLIP's `tokenizer.py` is the
same algorithm), reading the diffusers `tokenizer/` folder (vocab.json + merges.txt) or OpenCLIP's single merges file
(`bpe_simple_vocab_16e6.txt.gz`, from which the vocabulary is derived). checkpoints.md §10.
Pipeline: clean text -> split into words -> bytes to printable unicode -> BPE merges with `</w>` ending each word ->
ids -> [bos] + at most 75 ids + [eos] -> pad to 77 with the model's pad id.

Text cleanup, and where it differs from the references (no ftfy, no `regex` module: stdlib only):
- HTML-unescape twice, NFC-normalise, fold whitespace runs to one space, strip, then (outside the special tokens,
  below) lower-case, as the original does after
  `ftfy.fix_text`. We do not run ftfy, whose other fixes (mojibake, curly quotes, ligatures, full-width forms,
  terminal escapes) are therefore not applied; ftfy's own NFC is. transformers' CLIPTokenizer (v5) does not unescape
  HTML either, so `&amp;` gives `&` here and `&amp;` there. Python's `str.lower` gives a final sigma (ΣΑΣ -> σας)
  and Python's `\\s` folds U+001C..U+001F, as the original does; transformers lower-cases per character and keeps them.
- The word pattern `'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+` is run
  by a small scanner over `unicodedata` categories (letters L*, numbers N*), since stdlib `re` has no \\p{..}. Only
  characters whose category changed between Unicode versions can split differently from the `regex` module.
- Literal `<|startoftext|>` / `<|endoftext|>` in a prompt become the special ids only when spelled exactly so: they
  are matched on the text before lower-casing, as transformers' CLIPTokenizer does, so `<|ENDOFTEXT|>` is ordinary
  text that BPE splits (as both reference tokenizers do) and never an early eos. OpenCLIP's newer spelling
  `<start_of_text>` is ordinary text here, as in the vocabulary the diffusers folders ship.
- Truncation keeps bos, the first 75 tokens and eos (transformers and `open_clip.tokenize` agree on this).
- Padding per model: SD1.5 and SDXL's first encoder pad with eos (49407); SD2 and SDXL's second encoder were
  trained with `open_clip.tokenize`, which pads with 0 (`!`; their diffusers `tokenizer/` says `pad_token: "!"`).
  The UNet attends to all 77 positions, so the pad id changes the result (controlnext/sd_pipeline.py PADS, §10).
  transformers makes a "!" pad token special, so a "!" typed in an SD2 prompt becomes id 0 there; here it is
  text, as in open_clip.
Left out: decoding, attention masks, prompt weighting and >77-token chunking.
"""

from __future__ import annotations

import gzip
import html
import json
import re
import unicodedata
from pathlib import Path

import torch
from torch import Tensor

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
SPECIAL_TOKENS = re.compile(f"({re.escape(BOS)}|{re.escape(EOS)})")  # split keeps them (capturing group)
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")  # tried in this order, as the original pattern
OPENCLIP_MERGES = 49152 - 256 - 2  # open_clip reads merges lines 1..48894 of its file (vocab minus bytes and specials)


def bytes_to_unicode() -> dict[int, str]:
    """A printable character for each byte: printable Latin-1 bytes map to themselves, the rest to 256 + n.

    The order is the vocabulary's: the printable bytes first (so "!" is id 0), then the remapped ones.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


def clean_text(text: str) -> str:
    """HTML-unescape (twice), NFC, fold whitespace, strip (the original, minus ftfy's other fixes); not lower-cased:
    special tokens are matched on this text, the rest is lower-cased after (see CLIPTokenizer.encode)."""
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text)
    return re.sub(r"\s+", " ", text).strip()


def split_words(text: str) -> list[str]:
    """The CLIP word pattern (see the module docstring) as a scanner; whitespace separates and is dropped."""
    def kind(ch: str) -> str:  # "L" letter, "N" number, " " whitespace, "P" anything else
        major = unicodedata.category(ch)[0]
        return " " if ch.isspace() else major if major in "LN" else "P"

    words, i = [], 0
    while i < len(text):
        special = next((s for s in CONTRACTIONS if text.startswith(s, i)), None)
        k = kind(text[i])
        if special:
            j = i + len(special)
        elif k == " ":
            i += 1
            continue
        elif k == "N":
            j = i + 1  # one digit per word
        else:  # a run of letters, or a run of "other" characters (which may swallow ' and <)
            j = i + 1
            while j < len(text) and kind(text[j]) == k:
                j += 1
        words.append(text[i:j])
        i = j
    return words


def merge_pair(parts: list[str], pair: tuple[str, str]) -> list[str]:
    """Every occurrence of `pair` in `parts` merged into one symbol, left to right (one BPE merge)."""
    merged, i = [], 0
    while i < len(parts):
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == pair:
            merged.append(parts[i] + parts[i + 1])
            i += 2
        else:
            merged.append(parts[i])
            i += 1
    return merged


class CLIPTokenizer:
    """vocab (token -> id) + ranked merges -> ids. Call it on a prompt or a list of prompts to get (B, length) ids."""

    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], pad_token: str = EOS,
                 length: int = 77):
        for token in (BOS, EOS, pad_token):
            if token not in vocab:
                raise ValueError(f"tokenizer vocabulary has no {token!r}")
        self.vocab = vocab
        self.merges = list(merges)
        self.ranks = {pair: rank for rank, pair in enumerate(merges)}  # lower rank merges first
        self.pad_token = pad_token
        self.byte_encoder = bytes_to_unicode()
        self.bos_id, self.eos_id, self.pad_id = vocab[BOS], vocab[EOS], vocab[pad_token]
        self.length = length  # 77 positions: bos + 75 tokens + eos
        self.cache: dict[str, list[str]] = {}

    @classmethod
    def from_folder(cls, folder: str | Path, pad_token: str | None = None) -> CLIPTokenizer:
        """A diffusers/transformers `tokenizer/` folder; the pad token comes from its special_tokens_map.json or
        tokenizer_config.json (SD2 / SDXL tokenizer_2 say "!"), unless given."""
        folder = Path(folder)
        for name in ("vocab.json", "merges.txt"):
            if not (folder / name).is_file():
                raise ValueError(f"{folder}: not a CLIP tokenizer folder (no {name})")
        vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
        lines = (folder / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
        if pad_token is None:
            for name in ("special_tokens_map.json", "tokenizer_config.json"):
                if (folder / name).is_file() and pad_token is None:
                    pad = json.loads((folder / name).read_text(encoding="utf-8")).get("pad_token")
                    pad_token = pad["content"] if isinstance(pad, dict) else pad
        return cls(vocab, _check_merges(merges, folder / "merges.txt"), pad_token or EOS)

    @classmethod
    def from_bpe_file(cls, path: str | Path, pad_token: str = "!", num_merges: int = OPENCLIP_MERGES) -> CLIPTokenizer:
        """OpenCLIP's merges file (.txt or .txt.gz). The vocabulary is derived from it: the 256 byte symbols, the
        same with `</w>`, each merge concatenated in order, then bos (49406) and eos (49407). Pads with 0 by default."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"BPE merges file not found: {path}")
        raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
        lines = raw.decode("utf-8").split("\n")[1:1 + num_merges]  # line 0 is a version header
        merges = _check_merges([tuple(line.split()) for line in lines if line], path)
        symbols = list(bytes_to_unicode().values())
        tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [BOS, EOS]
        return cls({token: i for i, token in enumerate(tokens)}, merges, pad_token)

    def bpe(self, word: str) -> list[str]:
        """Byte-level BPE of one word (already mapped to byte symbols); the last symbol carries `</w>`."""
        if word in self.cache:
            return self.cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(a, b) for a, b in zip(parts, parts[1:])}
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            parts = merge_pair(parts, best)
        self.cache[word] = parts
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, without bos/eos, padding or truncation."""
        ids = []
        for piece in SPECIAL_TOKENS.split(clean_text(text)):  # case-sensitive, before lower-casing (docstring)
            if piece in (BOS, EOS):
                ids.append(self.vocab[piece])
                continue
            for word in split_words(piece.lower()):
                symbols = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
                ids.extend(self.vocab[token] for token in self.bpe(symbols))
        return ids

    def __call__(self, prompts: str | list[str]) -> Tensor:
        """Prompt(s) -> (B, length) int64: bos, up to length-2 tokens, eos, then pad ids."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        rows = []
        for prompt in prompts:
            ids = [self.bos_id, *self.encode(prompt)[:self.length - 2], self.eos_id]
            rows.append(ids + [self.pad_id] * (self.length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)  # (B, length)


    def save(self, folder: str | Path) -> None:
        """Write vocab.json, merges.txt and the special-token files of a diffusers/transformers `tokenizer/` folder."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(self.vocab, ensure_ascii=False), encoding="utf-8")
        lines = ["#version: 0.2", *(" ".join(pair) for pair in self.merges)]
        (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": self.pad_token}
        (folder / "special_tokens_map.json").write_text(json.dumps(specials), encoding="utf-8")
        config = {**specials, "model_max_length": self.length, "do_lower_case": True,
                  "tokenizer_class": "CLIPTokenizer"}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def learn_bpe(texts: list[str], num_merges: int, pad_token: str = EOS) -> CLIPTokenizer:
    """A small CLIP tokenizer learned on `texts`: greedy BPE (Sennrich et al. 2016, Alg. 1) over CLIP's byte symbols.

    The vocabulary has the real file structure (checkpoints.md §10): the 256 byte symbols, the same with `</w>`, the
    merged pairs in order, then bos and eos, so every CLIP tokenizer (ours, transformers', open_clip's) reads it.
    Ties between equally frequent pairs go to the lexicographically largest pair, so the result is deterministic.
    """
    table = bytes_to_unicode()
    words: dict[tuple[str, ...], int] = {}
    for text in texts:
        for word in split_words(clean_text(text)):
            if word in (BOS, EOS):
                continue
            symbols = "".join(table[b] for b in word.encode("utf-8"))
            key = (*symbols[:-1], symbols[-1] + "</w>")
            words[key] = words.get(key, 0) + 1
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: dict[tuple[str, str], int] = {}
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + count
        if not pairs:
            break  # every word is one symbol: nothing left to merge
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for word, count in words.items():
            out = tuple(merge_pair(list(word), best))
            merged[out] = merged.get(out, 0) + count
        words = merged
    symbols = list(table.values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [BOS, EOS]
    return CLIPTokenizer({token: i for i, token in enumerate(tokens)}, merges, pad_token)


def _check_merges(merges: list[tuple[str, ...]], path: Path) -> list[tuple[str, str]]:
    """Every merges line is two symbols; anything else means the wrong file."""
    bad = [" ".join(m) for m in merges if len(m) != 2]
    if bad:
        raise ValueError(f"{path}: not a BPE merges file (line {bad[0]!r} is not two symbols)")
    return merges  # type: ignore[return-value]
