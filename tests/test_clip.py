"""CLIP towers, SVD preprocessing, key maps and tokenizer (encoders/, issue 9) against transformers / diffusers.

transformers and diffusers are test-only oracles (requirements-dev.txt): these tests run, never skip. Tiny configs,
CPU, fp32. Tolerance 1e-5 (issue 9): the same fp32 math in a different operation order (SDPA vs transformers'
attention path) agrees to ~1e-7 at these sizes; loads through our own key maps are exact (the split and transpose
move bits, they do not round).
"""

import collections
from dataclasses import replace
import gzip
import json
import re

import pytest
import torch
import transformers
from diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion import _resize_with_antialiasing

from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_open_clip_checkpoint

from controlnext.checkpoint import KeyMap, check_state, save_json, save_state
from controlnext.loaders import ORIGINAL_PREFIXES, load_clip, original_state, save_clip
from encoders import keymap
from encoders.clip import (CLIP_MEAN, CLIP_STD, OPENCLIP_BIGG_TEXT, OPENCLIP_H_TEXT, OPENCLIP_H_VISION, PRESETS, TINY,
                           TINY_VISION, CLIPConfig, CLIPTextModel, CLIPVisionModel, build_clip, count_parameters,
                           preprocess_image)
from encoders.tokenizer import BOS, EOS, CLIPTokenizer, bytes_to_unicode, clean_text, split_words

TOL = 1e-5

# ---------------------------------------------------------------------------------------------------------------------
# Helpers: tiny HF models, OpenCLIP naming written by hand, a vocabulary trained on a small corpus
# ---------------------------------------------------------------------------------------------------------------------


def hf_text_config(**overrides) -> transformers.CLIPTextConfig:
    fields = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=77, projection_dim=16, hidden_act="quick_gelu", bos_token_id=998,
                  eos_token_id=999, pad_token_id=1)
    return transformers.CLIPTextConfig(**{**fields, **overrides})


def text_ids(eos: int = 999, pad: int = 999) -> torch.Tensor:
    """Three prompts of different lengths: bos, tokens, eos, padding (with eos as SD1.5, or 0 as open_clip)."""
    rows = []
    for n in (5, 20, 75):
        ids = [eos - 1, *torch.randint(1, eos - 1, (n,)).tolist(), eos]
        rows.append(ids + [pad] * (77 - len(ids)))
    return torch.tensor(rows)


def to_openclip(state: dict, vision: bool) -> dict:
    """HF-layout tensors -> OpenCLIP names (fused in_proj, x @ W projections): the test-side oracle of the layout."""
    tower = "vision_model." if vision else "text_model."
    out, pre = {}, "visual." if vision else ""
    simple = {"embeddings.token_embedding.weight": "token_embedding.weight",
              "embeddings.position_embedding.weight": "positional_embedding",
              "embeddings.patch_embedding.weight": "conv1.weight", "embeddings.class_embedding": "class_embedding",
              "final_layer_norm.": "ln_final.", "pre_layrnorm.": "ln_pre.", "post_layernorm.": "ln_post.",
              "layer_norm1.": "ln_1.", "layer_norm2.": "ln_2.", "self_attn.out_proj.": "attn.out_proj.",
              "mlp.fc1.": "mlp.c_fc.", "mlp.fc2.": "mlp.c_proj.", "encoder.layers.": "transformer.resblocks."}
    for key, value in state.items():
        if key in ("text_projection.weight", "visual_projection.weight"):
            out["visual.proj" if vision else "text_projection"] = value.t().contiguous()
            continue
        name = key.removeprefix(tower)
        if re.search(r"self_attn\.[kv]_proj", name):
            continue
        if m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", name):
            fused = torch.cat([state[key.replace("q_proj", p)] for p in ("q_proj", "k_proj", "v_proj")])
            out[f"{pre}transformer.resblocks.{m[1]}.attn.in_proj_{m[2]}"] = fused
            continue
        for old, new in simple.items():
            name = name.replace(old, new)
        out[pre + name] = value
    return out


def build_vocab(folder, pad_token: str, corpus: str, num_merges: int = 250) -> None:
    """A small vocab.json + merges.txt with the real file structure: 256 byte symbols, the same with </w>, merges
    learned greedily on `corpus`, then <|startoftext|>, <|endoftext|> (checkpoints.md §10)."""
    symbols = list(bytes_to_unicode().values())
    words = collections.Counter()
    for word in split_words(clean_text(corpus)):
        s = "".join(bytes_to_unicode()[b] for b in word.encode())
        words[(*s[:-1], s[-1] + "</w>")] += 1
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        merged = collections.Counter()
        for word, n in words.items():
            w, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    w, i = w + [word[i] + word[i + 1]], i + 2
                else:
                    w, i = w + [word[i]], i + 1
            merged[tuple(w)] += n
        words = merged
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({"pad_token": pad_token}))


CORPUS = ("a photo of an astronaut riding a horse on the moon, highly detailed, 4k, trending on artstation. the quick "
          "brown fox jumps over the lazy dog's back; it's a cat's life! portrait of a woman, oil painting, 8k uhd, "
          "sharp focus, photograph, cinematic lighting, café naïve über straße 東京 日本 привет мир")
PROMPTS = [
    "a photo of an astronaut riding a horse",  # plain
    "", "   ",  # empty: bos, eos, padding
    "Hello, World!!! (masterpiece:1.2), [bad hands] {x} 3.14 -- a/b\\c",  # punctuation runs
    "4k 8k uhd 1920x1080 2024 ½ ² Ⅻ",  # numbers: one digit per word; other numerals
    "it's the dog's; don't, I'm, you're, we've, they'll, he'd  x'sy ''s !'s",  # contractions
    "café naïve e\u0301 Über STRASSE 東京タワー привет 🤖🚀 ﬁ ＡＢＣ İstanbul",  # unicode, NFC, wide forms
    "tab\tnew\nline\u00a0nbsp\u2003em  ",  # whitespace folding
    "<|endoftext|> a <|startoftext|>",  # literal special tokens
    "<|ENDOFTEXT|> b <|StartOfText|> c<|endoftext|>d",  # specials match case-sensitively: other spellings are text
    " ".join(["photograph"] * 100),  # over-length: truncated to bos + 75 + eos
    "a" * 300,  # one very long word
]


# ---------------------------------------------------------------------------------------------------------------------
# Towers against transformers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, act, eos, pad", [
    ("CLIPTextModel", "quick_gelu", 2, 999),  # SD1.5-style: legacy eos_token_id 2 (argmax pooling), pad with eos
    ("CLIPTextModelWithProjection", "gelu", 999, 0),  # SDXL bigG-style: projection, GELU, pad with 0
])
def test_text_tower_matches_transformers(tmp_path, cls, act, eos, pad):
    reference = getattr(transformers, cls)(hf_text_config(hidden_act=act, eos_token_id=eos)).eval()
    reference.save_pretrained(tmp_path)  # on-disk HF layout + config.json
    ours = load_clip(tmp_path)
    ids = text_ids(pad=pad)
    with torch.no_grad():
        expected = reference(input_ids=ids, output_hidden_states=True)
        got = ours(ids)
    assert len(got.hidden_states) == len(expected.hidden_states) == 4
    for mine, theirs in zip(got.hidden_states, expected.hidden_states):
        torch.testing.assert_close(mine, theirs, atol=TOL, rtol=0)
    torch.testing.assert_close(got.hidden_states[-2], expected.hidden_states[-2], atol=TOL, rtol=0)  # clip skip
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=TOL, rtol=0)
    if cls == "CLIPTextModel":
        torch.testing.assert_close(got.pooled, expected.pooler_output, atol=TOL, rtol=0)
        assert got.embeds is None
    else:
        torch.testing.assert_close(got.embeds, expected.text_embeds, atol=TOL, rtol=0)


def test_vision_tower_matches_transformers(tmp_path):
    config = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, image_size=32, patch_size=8, projection_dim=16,
                                           hidden_act="gelu")
    reference = transformers.CLIPVisionModelWithProjection(config).eval()
    reference.save_pretrained(tmp_path)
    ours = load_clip(tmp_path)
    assert ours.config == TINY_VISION
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = reference(pixel_values=pixels, output_hidden_states=True)
        got = ours(pixels)
    for mine, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, atol=TOL, rtol=0)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=TOL, rtol=0)
    torch.testing.assert_close(got.embeds, expected.image_embeds, atol=TOL, rtol=0)


def test_svd_preprocessing_matches_diffusers():
    # SVD pipeline `_encode_image`: kornia-style antialiased resize to 224, [-1,1] -> [0,1], CLIP mean/std
    image = torch.rand(2, 3, 320, 576) * 2 - 1  # a 16:9 frame, squashed to a square
    expected = (_resize_with_antialiasing(image, (224, 224)) + 1) / 2
    expected = (expected - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(preprocess_image(image), expected, atol=1e-6, rtol=0)


def test_parameter_counts_at_full_size():
    assert count_parameters(PRESETS["clip_l"]) == 123_060_480
    assert count_parameters(OPENCLIP_H_TEXT) == 340_387_840
    assert count_parameters(OPENCLIP_BIGG_TEXT) == 694_659_840
    assert count_parameters(OPENCLIP_H_VISION) == 632_076_800


# ---------------------------------------------------------------------------------------------------------------------
# Key maps: OpenCLIP naming and the original single-file prefixes
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", [TINY, TINY_VISION], ids=["text", "vision"])
def test_openclip_layout_reproduces_hf_layout(config):
    source = build_clip(config).eval()
    hf_state = source.state_dict()
    openclip = to_openclip(hf_state, config.vision)
    openclip["logit_scale"] = torch.tensor(4.6)
    assert any("in_proj_weight" in k for k in openclip)
    ours = load_clip(openclip)  # layout and preset detected
    assert ours.config == config
    x = torch.randn(2, 3, 32, 32) if config.vision else text_ids()
    with torch.no_grad():
        expected, got = source(x), ours(x)
    assert torch.equal(got.last_hidden_state, expected.last_hidden_state)
    assert torch.equal(got.embeds, expected.embeds)


def test_single_files_sd2_sdxl_svd(tmp_path):
    # SD2: 24 OpenCLIP resblocks + projection -> the 23-layer HF tower; its output is the penultimate layer + ln_final
    h24 = build_clip(replace(TINY, num_hidden_layers=24, quick_gelu=False)).eval()
    sd2 = {"cond_stage_model.model." + k: v for k, v in to_openclip(h24.state_dict(), vision=False).items()}
    sd2 |= {"cond_stage_model.model.logit_scale": torch.tensor(4.6),
            "model.diffusion_model.conv_in.weight": torch.ones(1)}  # other models' keys are left alone
    config = replace(TINY, num_hidden_layers=23, quick_gelu=False, projection_dim=None)
    save_state(sd2, tmp_path / "sd2.safetensors")
    ours = load_clip(tmp_path / "sd2.safetensors", config)
    ids = text_ids()
    with torch.no_grad():
        full = h24(ids)
        torch.testing.assert_close(ours(ids).last_hidden_state,
                                   h24.text_model.final_layer_norm(full.hidden_states[-2]), atol=0, rtol=0)
    # SDXL: two text towers in one file; the config picks one
    clip_l, bigg = build_clip(replace(TINY, projection_dim=None)), build_clip(TINY)
    sdxl = {"conditioner.embedders.0.transformer." + k: v for k, v in clip_l.state_dict().items()}
    sdxl |= {"conditioner.embedders.1.model." + k: v for k, v in to_openclip(bigg.state_dict(), False).items()}
    sdxl["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    with pytest.raises(ValueError, match="several CLIP towers"):
        load_clip(sdxl)
    assert torch.equal(load_clip(sdxl, TINY).text_projection.weight, bigg.text_projection.weight)
    assert torch.equal(load_clip(sdxl, clip_l.config).text_model.final_layer_norm.bias,
                       clip_l.text_model.final_layer_norm.bias)
    # SVD: the image tower plus the text leftovers that SGM kept (dropped by explicit rows)
    vision = build_clip(TINY_VISION)
    svd = {"conditioner.embedders.0.open_clip.model." + k: v for k, v in to_openclip(vision.state_dict(), True).items()}
    for leftover in ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
                     "text_projection", "logit_scale"):
        svd["conditioner.embedders.0.open_clip.model." + leftover] = torch.zeros(1)
    assert torch.equal(load_clip(svd).visual_projection.weight, vision.visual_projection.weight)


def meta_openclip(config: CLIPConfig, prefix: str, layers: int | None = None) -> dict:
    """Full-size original key set (meta tensors) written through the test-side OpenCLIP converter."""
    with torch.device("meta"):
        model = build_clip(replace(config, num_hidden_layers=layers or config.num_hidden_layers,
                                   projection_dim=config.projection_dim or config.hidden_size))
    return {prefix + k: v for k, v in to_openclip(model.state_dict(), config.vision).items()}


@pytest.mark.parametrize("config, prefix, layers, extra, count", [
    (OPENCLIP_H_TEXT, "cond_stage_model.model.", 24, ("logit_scale",), 294),  # SD2
    (OPENCLIP_BIGG_TEXT, "conditioner.embedders.1.model.", None, ("logit_scale",), 390),  # SDXL embedder 1
    (OPENCLIP_H_VISION, "conditioner.embedders.0.open_clip.model.", None,  # SVD, with the text leftovers
     ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias", "text_projection",
      "logit_scale"), 398),
], ids=["sd2", "sdxl_bigg", "svd_vision"])
def test_full_size_tables_account_for_every_key(config, prefix, layers, extra, count):
    state = meta_openclip(config, prefix, layers) | {prefix + k: torch.empty(1, device="meta") for k in extra}
    assert len(state) == count  # key counts of the released files (checkpoints.md §2.1)
    renamed, origin = KeyMap(keymap.SINGLE_FILE[prefix]).apply({k[len(prefix):]: v for k, v in state.items()})
    with torch.device("meta"):
        check_state(build_clip(config), renamed, origin, what=prefix)  # raises on any unmapped / missing / shape


# ---------------------------------------------------------------------------------------------------------------------
# Exports: the transformers folder layout and the original single-file layouts (issue 13)
# ---------------------------------------------------------------------------------------------------------------------


def outputs(model, x) -> dict:
    """The outputs a pipeline uses, from ours or from a transformers tower."""
    with torch.no_grad():
        out = model(x) if isinstance(model, (CLIPTextModel, CLIPVisionModel)) else model(x, output_hidden_states=True)
    embeds = getattr(out, "embeds", None)
    if embeds is None:
        embeds = getattr(out, "text_embeds", getattr(out, "image_embeds", None))
    return {"last": out.last_hidden_state, "penultimate": out.hidden_states[-2], "embeds": embeds}


@pytest.mark.parametrize("config, cls", [
    (replace(TINY, projection_dim=None), "CLIPTextModel"),  # SD1.5 / SD2 text_encoder/, SDXL text_encoder/
    (TINY, "CLIPTextModelWithProjection"),  # SDXL text_encoder_2/
    (TINY_VISION, "CLIPVisionModelWithProjection"),  # SVD image_encoder/
    (replace(TINY_VISION, projection_dim=None), "CLIPVisionModel"),
], ids=["text", "text_projection", "vision_projection", "vision"])
def test_save_clip_writes_a_folder_transformers_loads(tmp_path, config, cls):
    ours = build_clip(config).eval()
    save_clip(ours, tmp_path / "tower")
    theirs = getattr(transformers, cls).from_pretrained(tmp_path / "tower").eval()
    x = torch.randn(2, 3, 32, 32) if config.vision else text_ids()
    for name, value in outputs(ours, x).items():
        if value is not None:  # same fp32 maths, another attention path: ~1e-7 (module docstring)
            torch.testing.assert_close(value, outputs(theirs, x)[name], atol=TOL, rtol=0, msg=name)
    back = load_clip(tmp_path / "tower")
    assert back.config == config and all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items())


@pytest.mark.parametrize("part, config", [
    ("sd15_text", replace(TINY, projection_dim=None)),
    ("sdxl_text_l", replace(TINY, projection_dim=None)),
    ("sd2_text", replace(TINY, projection_dim=None, quick_gelu=False)),
    ("sdxl_text_g", replace(TINY, quick_gelu=False)),
])
def test_original_text_exports_read_by_diffusers_converters(tmp_path, part, config):
    # our single-file export -> diffusers' own single-file converter -> a transformers tower: the same outputs
    ours = build_clip(config).eval()
    state = original_state(ours, part)
    assert all(k.startswith(ORIGINAL_PREFIXES[part]) for k in state)
    hf = keymap.clip_config_to_hf(config)
    if part in ("sd15_text", "sdxl_text_l"):  # transformers names under the prefix
        converted = convert_ldm_clip_checkpoint(state)
    else:  # OpenCLIP names, fused in_proj, x @ W projection
        assert any(k.endswith("attn.in_proj_weight") for k in state)
        shell = getattr(transformers, hf["architectures"][0])(transformers.CLIPTextConfig(**hf))
        converted = convert_open_clip_checkpoint(shell, state, prefix=ORIGINAL_PREFIXES[part])
    save_state(converted, tmp_path / "converted" / "model.safetensors")
    save_json(hf, tmp_path / "converted" / "config.json")
    theirs = getattr(transformers, hf["architectures"][0]).from_pretrained(tmp_path / "converted").eval()
    ids = text_ids()
    for name, value in outputs(ours, ids).items():
        if value is not None:
            torch.testing.assert_close(value, outputs(theirs, ids)[name], atol=TOL, rtol=0, msg=name)
    save_state(state, tmp_path / "single.safetensors")  # and our loader reads the export back exactly
    back = load_clip(tmp_path / "single.safetensors", config)
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in back.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: one clear error
# ---------------------------------------------------------------------------------------------------------------------


def test_bad_input_gives_one_clear_error(tmp_path):
    save_state({"model.diffusion_model.conv_in.weight": torch.zeros(4, 4, 3, 3)}, tmp_path / "unet.safetensors")
    with pytest.raises(ValueError, match="no CLIP text or vision tower"):
        load_clip(tmp_path / "unet.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown weight file type"):
        load_clip(tmp_path / "notes.txt")
    transformers.CLIPTextModel(hf_text_config()).save_pretrained(tmp_path / "te")
    with pytest.raises(ValueError, match="does not match config.json.*hidden_size"):
        load_clip(tmp_path / "te", replace(load_clip(tmp_path / "te").config, hidden_size=64))
    state = build_clip(TINY).state_dict()
    with pytest.raises(ValueError, match=r"wrong shape\)[\s\S]*text_model.embeddings.token_embedding.weight"):
        load_clip(state, replace(TINY, vocab_size=2000))
    with pytest.raises(ValueError, match="no preset .* fits"):
        load_clip(build_clip(replace(TINY, hidden_size=48)).state_dict())
    with pytest.raises(ValueError, match="not a CLIP tokenizer folder"):
        CLIPTokenizer.from_folder(tmp_path)


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer against transformers.CLIPTokenizer
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad_token", [EOS, "!"], ids=["pad_eos_sd15", "pad_zero_sd2"])
def test_tokenizer_matches_transformers(tmp_path, pad_token):
    build_vocab(tmp_path, pad_token, CORPUS)
    reference = transformers.CLIPTokenizer.from_pretrained(tmp_path, pad_token=pad_token)
    ours = CLIPTokenizer.from_folder(tmp_path)  # pad token read from special_tokens_map.json
    assert ours.pad_id == (ours.eos_id if pad_token == EOS else 0)
    expected = reference(PROMPTS, padding="max_length", max_length=77, truncation=True)["input_ids"]
    got = ours(PROMPTS)
    assert got.shape == (len(PROMPTS), 77)
    for prompt, mine, theirs in zip(PROMPTS, got.tolist(), expected):
        if pad_token == "!" and "!" in prompt:
            # transformers makes the pad token special, so a "!" typed in the prompt becomes id 0; open_clip.tokenize
            # (which SD2 / SDXL-bigG used) tokenizes it as text. We follow open_clip: same ids as with the eos pad.
            assert theirs.count(0) > mine.count(0)
            plain = transformers.CLIPTokenizer.from_pretrained(tmp_path, pad_token=EOS)(prompt)["input_ids"]
            theirs = plain + [0] * (77 - len(plain))
        assert mine == theirs, prompt
    assert got[PROMPTS.index("")].tolist()[:3] == [ours.bos_id, ours.eos_id, ours.pad_id]
    assert got[-1, -1] == ours.eos_id  # truncated: eos kept at position 76


def test_tokenizer_from_openclip_bpe_file_and_documented_differences(tmp_path):
    build_vocab(tmp_path, EOS, CORPUS)
    folder = CLIPTokenizer.from_folder(tmp_path)
    merges = (tmp_path / "merges.txt").read_bytes()
    with gzip.open(tmp_path / "bpe.txt.gz", "wb") as f:
        f.write(merges)
    single = CLIPTokenizer.from_bpe_file(tmp_path / "bpe.txt.gz")  # vocab derived from the merges; pads with 0
    assert single.vocab == folder.vocab and single.pad_id == 0
    assert all(single.encode(prompt) == folder.encode(prompt) for prompt in PROMPTS)
    # Where we follow the original CLIP tokenizer and transformers does not (module docstring of tokenizer.py):
    assert folder.encode("salt &amp; pepper") == folder.encode("salt & pepper")  # HTML unescaped (twice)
    assert folder.encode("&amp;lt;") == folder.encode("<")
    assert folder.eos_id not in folder.encode("<|ENDOFTEXT|>")  # only the exact spelling is special (issue 15.14)
    assert folder.encode("a<|endoftext|>b") == [*folder.encode("a"), folder.eos_id, *folder.encode("b")]
    assert folder.encode("x\x1cy") == folder.encode("x y")  # Python's \s folds U+001C like the original
    assert folder.encode("ΣΑΣ") == folder.encode("σας")  # str.lower: final sigma (transformers: per character)
    assert clean_text(" A  <|ENDOFTEXT|> ") == "A <|ENDOFTEXT|>"  # not lower-cased: specials are matched on this text
