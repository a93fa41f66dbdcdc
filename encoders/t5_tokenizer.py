"""T5's SentencePiece tokenizer, as SD3 uses it: prompt -> (B, max_length) ids and mask for encoders/t5.py.

T5 (Raffel et al. 2020 §3.1.3) tokenizes with a 32,000-piece SentencePiece unigram model (Kudo & Richardson 2018),
`spiece.model` (tokenizer_3/ of a diffusers SD3 folder, google/t5-v1_1-*). Its fixed ids: <pad> 0, </s> 1, <unk> 2;
no bos. The model file does the text normalisation itself (NFKC-based `nmt_nfkc` rules, whitespace runs folded, a
"▁" word prefix), so the pieces come from the `sentencepiece` package, which reads that file exactly.
`sentencepiece` is an OPTIONAL runtime dependency, needed for SD3 only: it is imported when a tokenizer is built, and
its absence is one error that says what to install (`pip install sentencepiece`).
What SD3 does (diffusers@0.42 `StableDiffusion3Pipeline._get_t5_prompt_embeds`): `tokenizer_3(prompt,
padding="max_length", max_length=256, truncation=True)`; the encoder then sees all 256 positions, padding included
(no mask). We reproduce transformers' T5Tokenizer / T5TokenizerFast (in transformers 5 one class, backed by the
`tokenizers` conversion of the same spiece.model) on top of the SentencePiece pieces:
- the special tokens typed literally in a prompt (`</s>`, `<pad>`, `<unk>`, the sentinels `<extra_id_0>` ...
  `<extra_id_99>`) become their ids; each stretch of text between them is encoded on its own (its own "▁" prefix);
- the sentinels take the ids after the SentencePiece vocabulary, in reverse: `<extra_id_0>` is the last (32099);
- truncation keeps the first max_length - 1 ids, then </s> is appended; padding appends <pad> (0) to max_length.
The mask is 1 on the ids and the </s>, 0 on the padding (a literal "<pad>" in a prompt is a token: mask 1).
Left out: decoding, pairs of sequences, and prompts longer than max_length (truncated, as diffusers; SD3's reference
sd3_infer.py instead pads to at least 77 and never truncates).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import Tensor

SD3_MAX_LENGTH = 256  # diffusers StableDiffusion3Pipeline `max_sequence_length` default (T5 tokens of SD3)
SGM_MAX_LENGTH = 77  # Stability-AI/generative-models FrozenT5Embedder default; SD3's reference pads to >= 77
T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # SentencePiece ids 0, 1, 2 of every T5 vocabulary
T5_EXTRA_IDS = 100  # T5's sentinel tokens <extra_id_0..99> (tokenizer_config.json `extra_ids`)


class T5Tokenizer:
    """SentencePiece model + T5's special tokens. Call it on a prompt or a list of prompts."""

    def __init__(self, model_file: str | Path, max_length: int = SD3_MAX_LENGTH, extra_ids: int = T5_EXTRA_IDS):
        # Imported here, not at the top: sentencepiece is an optional dependency that only SD3's T5 needs, and the
        # rest of the package (and every other model) must import and run without it.
        try:
            import sentencepiece
        except ImportError:
            raise ImportError("the T5 tokenizer (SD3's third text encoder) needs the optional package sentencepiece: "
                              "pip install sentencepiece") from None
        model_file = Path(model_file)
        if not model_file.is_file():
            raise ValueError(f"SentencePiece model not found: {model_file}")
        if max_length < 1:
            raise ValueError(f"max_length must be at least 1 (room for </s>), got {max_length}")
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:  # sentencepiece's own parse errors
            raise ValueError(f"{model_file}: not a SentencePiece model ({e})") from None
        pieces = self.sp.get_piece_size()
        for i, token in enumerate(T5_SPECIALS):
            if pieces <= i or self.sp.id_to_piece(i) != token:
                raise ValueError(f"{model_file}: not a T5 SentencePiece model (id {i} is not {token!r})")
        self.pad_id, self.eos_id, self.unk_id = 0, 1, 2
        self.max_length = max_length
        # literal special tokens: T5's three, then the sentinels after the pieces in reverse order (transformers
        # T5Converter: <extra_id_99> is `pieces`, <extra_id_0> is `pieces + extra_ids - 1`)
        self.specials = {token: i for i, token in enumerate(T5_SPECIALS)}
        self.specials |= {f"<extra_id_{n}>": pieces + extra_ids - 1 - n for n in range(extra_ids)}
        # longest first, so that no special token is cut short by another that is its prefix
        self.split_pattern = re.compile("(" + "|".join(re.escape(t) for t in sorted(self.specials, key=len,
                                                                                     reverse=True)) + ")")

    @classmethod
    def from_folder(cls, folder: str | Path, max_length: int = SD3_MAX_LENGTH) -> T5Tokenizer:
        """`spiece.model` of a tokenizer folder (tokenizer_3/), or of a diffusers SD3 folder's tokenizer_3/."""
        folder = Path(folder)
        if (folder / "tokenizer_3" / "spiece.model").is_file():
            folder = folder / "tokenizer_3"  # a whole SD3 pipeline folder
        if not (folder / "spiece.model").is_file():
            raise ValueError(f"{folder}: not a T5 tokenizer folder (no spiece.model)")
        return cls(folder / "spiece.model", max_length)

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt: no </s>, no padding, no truncation."""
        ids: list[int] = []
        for part in self.split_pattern.split(text):  # odd positions hold the special tokens found
            if part in self.specials:
                ids.append(self.specials[part])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def __call__(self, prompts: str | list[str]) -> tuple[Tensor, Tensor]:
        """Prompt(s) -> input_ids (B, max_length) int64, attention_mask (B, max_length) int64 (0 on padding)."""
        prompts = [prompts] if isinstance(prompts, str) else prompts
        rows, masks = [], []
        for prompt in prompts:
            ids = [*self.encode(prompt)[:self.max_length - 1], self.eos_id]
            padding = self.max_length - len(ids)
            rows.append(ids + [self.pad_id] * padding)
            masks.append([1] * len(ids) + [0] * padding)
        shape = (len(prompts), self.max_length)
        return torch.tensor(rows, dtype=torch.long).view(shape), torch.tensor(masks, dtype=torch.long).view(shape)
