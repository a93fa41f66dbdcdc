"""T5 v1.1 encoder, its loader and its SentencePiece tokenizer (SD3's third text encoder, issue 19).

transformers (T5EncoderModel, T5Tokenizer), diffusers (the SD3 single-file converter) and sentencepiece (to train a
tiny tokenizer model; protobuf lets transformers convert it) are test-only oracles from requirements-dev.txt: these
tests run, never skip. Tiny configs, CPU. Tolerances: fp32 1e-5 (issue 19): the same math in another operation order
(SDPA vs transformers' attention, F.gelu's tanh form vs transformers' "gelu_new" formula) agrees to ~2e-6 at unit-scale
activations. Loads through our key map are exact (renames move bits). Token ids and bucket indices are integers:
compared exactly.
"""

import json
import sys
from dataclasses import replace

import pytest
import sentencepiece
import torch
import transformers
from diffusers.loaders.single_file_utils import convert_sd3_t5_checkpoint_to_diffusers, is_t5_in_single_file
from transformers.models.t5.modeling_t5 import T5Attention as HFT5Attention

from controlnext.checkpoint import save_state
from controlnext.t5_weights import load_t5
from encoders.t5 import T5_BASE, T5_XXL, TINY, T5Encoder, count_parameters, relative_position_bucket
from encoders.t5_tokenizer import SD3_MAX_LENGTH, T5Tokenizer

TOL = 1e-5
LENGTH = 150  # > relative_attention_max_distance (128): the exact, logarithmic and last buckets all occur


# ---------------------------------------------------------------------------------------------------------------------
# Helpers: a tiny random transformers T5 with the TINY shapes
# ---------------------------------------------------------------------------------------------------------------------


def hf_config(**overrides) -> transformers.T5Config:
    fields = dict(vocab_size=200, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                  feed_forward_proj="gated-gelu", dropout_rate=0.0)
    return transformers.T5Config(**{**fields, **overrides})


def hf_encoder(attention: str = "sdpa") -> transformers.T5EncoderModel:
    config = hf_config()
    config._attn_implementation = attention
    model = transformers.T5EncoderModel(config).eval()
    with torch.no_grad():  # T5 initialises the RMS-norm scales to 1: make them matter
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def ids_and_mask() -> tuple[torch.Tensor, torch.Tensor]:
    """Batch 2: a full row, and a row of 40 tokens followed by padding (id 0, mask 0)."""
    ids = torch.randint(3, 200, (2, LENGTH))
    mask = torch.ones(2, LENGTH, dtype=torch.long)
    ids[1, 40:], mask[1, 40:] = 0, 0
    return ids, mask


def assert_same_weights(ours: T5Encoder, reference: torch.nn.Module) -> None:
    theirs = reference.state_dict()
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs[key]), key


# ---------------------------------------------------------------------------------------------------------------------
# The encoder against transformers
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("buckets, distance", [(32, 128), (8, 16), (32, 20), (6, 40)])
def test_relative_position_buckets_match_transformers(buckets, distance):
    relative = torch.arange(-400, 401)[None, :]
    expected = HFT5Attention._relative_position_bucket(relative, True, buckets, distance)
    assert torch.equal(relative_position_bucket(relative, buckets, distance), expected)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_encoder_matches_transformers(attention):
    reference = hf_encoder(attention)
    ours = load_t5(reference.state_dict())  # in-memory: both embedding names, one tensor; config read off shapes
    assert ours.config == TINY
    ids, mask = ids_and_mask()
    with torch.no_grad():
        for attention_mask in (None, mask):  # SD3 (no mask: padding attended) and a padding mask
            expected = reference(input_ids=ids, attention_mask=attention_mask).last_hidden_state
            torch.testing.assert_close(ours(ids, attention_mask), expected, atol=TOL, rtol=0)
        # the mask is real: without it, the padded row's tokens see the padding and change
        assert (ours(ids)[1, :40] - ours(ids, mask)[1, :40]).abs().max() > 1e-3


def test_parameter_counts_at_full_size():
    assert count_parameters(T5_XXL) == 4_762_310_656  # issue 19
    assert count_parameters(T5_BASE) == 109_628_544
    released = hf_config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)
    with torch.device("meta"):
        reference = transformers.T5EncoderModel(released)
        ours = T5Encoder(T5_XXL)
    assert reference.num_parameters() == count_parameters(T5_XXL)  # transformers counts the tied embedding once
    # the full-size key table: ours is transformers' on-disk layout (save_pretrained drops the tied alias)
    on_disk = {k: v.shape for k, v in reference.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert {k: v.shape for k, v in ours.state_dict().items()} == on_disk
    assert len(on_disk) == 219  # 24 blocks x 9 tensors + the bucket table, the final norm and the embedding


# ---------------------------------------------------------------------------------------------------------------------
# Loading: folders, the SD3 single file, other layouts, dtypes
# ---------------------------------------------------------------------------------------------------------------------


def test_sharded_folder_in_an_sd3_pipeline_folder(tmp_path):
    reference = hf_encoder()
    reference.save_pretrained(tmp_path / "sd3" / "text_encoder_3", max_shard_size="20KB")
    assert (tmp_path / "sd3" / "text_encoder_3" / "model.safetensors.index.json").is_file()
    ours = load_t5(tmp_path / "sd3")  # the pipeline folder: text_encoder_3/ found, config.json read
    assert ours.config == TINY and not ours.training
    index = json.loads((tmp_path / "sd3" / "text_encoder_3" / "model.safetensors.index.json").read_text())
    assert set(ours.state_dict()) == set(index["weight_map"])  # our state dict is the on-disk layout
    assert_same_weights(ours, reference)


def test_sd3_single_file_and_other_layouts(tmp_path):
    reference = hf_encoder()
    hf_state = {k: v.clone() for k, v in reference.state_dict().items()}  # both embedding names, as separate tensors
    prefix = "text_encoders.t5xxl.transformer."
    single = {prefix + k: v for k, v in hf_state.items()}
    single |= {"model.diffusion_model.x_embedder.proj.weight": torch.zeros(2, 2),  # other components: ignored
               "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.zeros(2),
               "first_stage_model.decoder.conv_in.weight": torch.zeros(2)}
    # our prefix is the one diffusers' single-file loader detects and strips
    assert is_t5_in_single_file(single)
    assert set(convert_sd3_t5_checkpoint_to_diffusers(single)) == set(hf_state)
    save_state(single, tmp_path / "sd3_medium_incl_clips_t5.safetensors")
    assert_same_weights(load_t5(tmp_path / "sd3_medium_incl_clips_t5.safetensors"), reference)
    # the embedding under the stack's name only (Stability's sd3 reference T5 names it so), or under `shared` only
    assert_same_weights(load_t5({k: v for k, v in hf_state.items() if k != "shared.weight"}), reference)
    assert_same_weights(load_t5({k: v for k, v in hf_state.items() if k != "encoder.embed_tokens.weight"}), reference)
    # a whole T5ForConditionalGeneration (google/t5-v1_1-* as released): the encoder half
    seq2seq = transformers.T5ForConditionalGeneration(hf_config()).eval()
    ours = load_t5(seq2seq.state_dict())
    ids, mask = ids_and_mask()
    with torch.no_grad():
        expected = seq2seq.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(ours(ids, mask), expected, atol=TOL, rtol=0)


def test_fp16_keeps_wo_in_fp32_as_transformers(tmp_path):
    reference = hf_encoder()
    reference.save_pretrained(tmp_path)
    half = transformers.T5EncoderModel.from_pretrained(tmp_path, dtype=torch.float16).eval()
    ours = load_t5(tmp_path, dtype=torch.float16)
    theirs = dict(half.named_parameters())
    assert {k: v.dtype for k, v in ours.named_parameters()} == {k: theirs[k].dtype for k, _ in ours.named_parameters()}
    assert ours.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    ids, _ = ids_and_mask()
    with torch.no_grad():
        got = ours(ids)
        assert got.dtype == torch.float16  # the final norm's fp16 weight brings the fp32 stream back to fp16
        # fp16 weights and activations (~3 significant digits): the two differ by 6e-3 at outputs of ~4, as each
        # does against the fp32 model; they round at different points (SDPA kernels, GELU form)
        torch.testing.assert_close(got, half(input_ids=ids).last_hidden_state, atol=2e-2, rtol=1e-2)
    # bf16: transformers keeps `wo` in fp32 for fp16 only; so do we
    assert {p.dtype for p in load_t5(tmp_path, dtype=torch.bfloat16).parameters()} == {torch.bfloat16}


def test_fp16_stream_does_not_overflow():
    # FF outputs beyond fp16's 65504 (wo scaled up): an all-fp16 T5 gives inf/nan, ours (fp32 wo -> fp32 stream) not
    model = T5Encoder(TINY).eval()
    with torch.no_grad():
        for block in model.encoder.block:
            block.layer[1].DenseReluDense.wo.weight.mul_(3e4)
    ids, _ = ids_and_mask()
    with torch.no_grad():
        exact = model(ids)
        all_half = T5Encoder(TINY).half().eval()
        all_half.load_state_dict(model.state_dict())
        mirrored = T5Encoder(TINY).cast(torch.float16).eval()
        mirrored.load_state_dict(model.state_dict())
        assert not all_half(ids).isfinite().all()
        got = mirrored(ids)
    assert got.isfinite().all()
    torch.testing.assert_close(got.float(), exact, atol=2e-2, rtol=1e-2)  # fp16 attention and norms: 1.1e-2 here


def test_stored_dtype_and_float8(tmp_path):
    reference = hf_encoder()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    save_state({k: v.half() for k, v in state.items()}, tmp_path / "t5xxl_fp16.safetensors")
    ours = load_t5(tmp_path / "t5xxl_fp16.safetensors")  # no dtype: the stored fp16, with wo in fp32
    assert ours.shared.weight.dtype == torch.float16
    assert ours.encoder.block[2].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    fp8 = {k: v.to(torch.float8_e4m3fn) for k, v in state.items()}
    with pytest.raises(ValueError, match="float8_e4m3fn, a storage-only type; pass dtype="):
        load_t5(fp8)
    loaded = load_t5(fp8, dtype=torch.float32)
    assert torch.equal(loaded.shared.weight, fp8["shared.weight"].float())


def test_bad_input_gives_one_clear_error(tmp_path):
    reference = hf_encoder()
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    with pytest.raises(ValueError, match="no T5 encoder weights found"):
        load_t5({"text_model.embeddings.token_embedding.weight": torch.zeros(2, 2)})
    with pytest.raises(ValueError, match="shared.weight and encoder.embed_tokens.weight differ"):
        load_t5(state | {"shared.weight": state["shared.weight"] + 1})
    with pytest.raises(ValueError, match=r"1 missing[\s\S]*encoder.block.1.layer.0.layer_norm.weight"):
        load_t5({k: v for k, v in state.items() if k != "encoder.block.1.layer.0.layer_norm.weight"}, TINY)
    with pytest.raises(ValueError, match=r"wrong shape[\s\S]*shared.weight: file \(200, 32\) vs model \(300, 32\)"):
        load_t5(state, replace(TINY, vocab_size=300))
    with pytest.raises(ValueError, match="unknown T5 preset 't5_xl'"):
        load_t5(state, "t5_xl")
    with pytest.raises(ValueError, match="dtype must be one of"):
        load_t5(state, dtype=torch.int8)
    reference.save_pretrained(tmp_path / "te")
    with pytest.raises(ValueError, match="does not match config.json .*num_layers: config.json 3 vs given 24"):
        load_t5(tmp_path / "te", "t5_xxl")
    v10 = json.loads((tmp_path / "te" / "config.json").read_text()) | {"feed_forward_proj": "relu"}
    (tmp_path / "te" / "config.json").write_text(json.dumps(v10))
    with pytest.raises(ValueError, match="feed_forward_proj 'relu' is not T5 v1.1"):
        load_t5(tmp_path / "te")
    (tmp_path / "te" / "config.json").write_text(json.dumps({"hidden_size": 32, "num_hidden_layers": 3}))  # CLIP's
    with pytest.raises(ValueError, match="not a T5 config .no vocab_size, d_model, num_layers"):
        load_t5(tmp_path / "te")
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 5\), input_ids \(2, 6\)"):
        T5Encoder(TINY)(torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 5))


# ---------------------------------------------------------------------------------------------------------------------
# Tokenizer: a tiny SentencePiece unigram model, ours against transformers' T5Tokenizer (T5TokenizerFast is the
# same class in transformers 5: the `tokenizers` conversion of spiece.model that SD3's diffusers pipeline runs)
# ---------------------------------------------------------------------------------------------------------------------

CORPUS = ["a photo of an astronaut riding a horse on the moon", "highly detailed, 4k, trending on artstation",
          "the quick brown fox jumps over the lazy dog's back", "it's a cat's life! portrait of a woman",
          "oil painting, 8k uhd, sharp focus, photograph", "cinematic lighting, café naïve über straße",
          "東京 日本 привет мир"]
PROMPTS = [
    "a photo of an astronaut riding a horse",  # plain
    "", "   ",  # empty: </s> then padding
    "  Leading,   inner   and trailing spaces  ",  # whitespace folded by the model's normaliser
    "tab\tnew\nline\r\nnbsp\u00a0em\u2003ideographic\u3000x",  # other whitespace
    "Hello, World!!! (masterpiece:1.2), [bad hands] {x} $100 & 50% #tag @user a/b\\c ^^ ~~",  # punctuation
    "café naïve e\u0301 über straße 東京 привет 🐱🐶 ｆｕｌｌ ① ½ ² ﬁ … “quotes”",  # unicode: NFKC, unknown pieces
    "\x00\x01 control \u200b zero width",  # control characters
    "a </s> b<pad>c <unk> x<extra_id_0>y <extra_id_99> <extra_id_7>",  # literal special tokens
    "<s> and </S> are text",  # not T5 special tokens
    " ".join(["photograph of a horse"] * 80),  # over 256 tokens: truncated, </s> kept last
    "a" * 300,  # one long word
]


@pytest.fixture(scope="module")
def spiece_folder(tmp_path_factory):
    """tokenizer_3/ with a small unigram spiece.model laid out like T5's (<pad> 0, </s> 1, <unk> 2, no bos)."""
    folder = tmp_path_factory.mktemp("sd3") / "tokenizer_3"
    folder.mkdir()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(folder / "spiece"), model_type="unigram",
        vocab_size=120, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        character_coverage=0.98, minloglevel=2)  # coverage < 1: rare characters become <unk>
    return folder


@pytest.mark.parametrize("max_length", [SD3_MAX_LENGTH, 77, 8])
def test_tokenizer_matches_transformers(spiece_folder, max_length):
    reference = transformers.T5Tokenizer.from_pretrained(spiece_folder)
    ours = T5Tokenizer.from_folder(spiece_folder.parent, max_length)  # the pipeline folder: tokenizer_3/ found
    expected = reference(PROMPTS, padding="max_length", max_length=max_length, truncation=True)
    ids, mask = ours(PROMPTS)
    assert ids.shape == mask.shape == (len(PROMPTS), max_length) and ids.dtype == mask.dtype == torch.long
    for prompt, mine, theirs in zip(PROMPTS, ids.tolist(), expected["input_ids"], strict=True):
        assert mine == theirs, prompt
    assert mask.tolist() == expected["attention_mask"]
    assert ids[PROMPTS.index("")].tolist()[:2] == [1, 0]  # </s>, then <pad>
    assert ids[-2, -1] == 1  # truncated: </s> is the last id
    assert ours.unk_id in ours.encode(PROMPTS[6])  # characters outside the tiny vocabulary: <unk>, as transformers
    sentinels = [f"<extra_id_{n}>" for n in (0, 7, 99)]
    assert [ours.specials[t] for t in sentinels] == reference.convert_tokens_to_ids(sentinels)  # pieces + 99, + 92, + 0


def test_tokenizer_errors(spiece_folder, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="not a T5 tokenizer folder"):
        T5Tokenizer.from_folder(tmp_path)
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        T5Tokenizer(tmp_path / "spiece.model")
    sentencepiece.SentencePieceTrainer.train(  # sentencepiece's default layout: <unk> 0, <s> 1, </s> 2
        sentence_iterator=iter(CORPUS * 20), model_prefix=str(tmp_path / "other"), vocab_size=90,
        hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(ValueError, match="not a T5 SentencePiece model"):
        T5Tokenizer(tmp_path / "other.model")
    with pytest.raises(ValueError, match="max_length must be at least 1"):
        T5Tokenizer(spiece_folder / "spiece.model", max_length=0)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # as if not installed: `import` raises ImportError
    with pytest.raises(ImportError, match="pip install sentencepiece"):
        T5Tokenizer(spiece_folder / "spiece.model")
