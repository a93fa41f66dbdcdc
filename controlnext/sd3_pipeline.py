"""Stable Diffusion 3 as one object: MMDiT + SD3 VAE + CLIP-L, CLIP-G and (optionally) T5-XXL + tokenizers + the flow
schedule; prompt encoding, latents, export in both layouts, and text (+ control) to image with the flow samplers.

Paper: Esser et al. 2024, "Scaling Rectified Flow Transformers" (arXiv 2403.03206) §5.2 (three frozen text
encoders; the pooled CLIP vector c_vec and the token context c_ctxt) and §2 (rectified flow, schedulers/flow.py).
Reference: Stability-AI/sd3.5@8df03ab3 sd3_infer.py / sd3_impls.py (ClipL with return_projected_pooled=False, ClipG,
T5XXL, SD3LatentFormat) and huggingface/diffusers@v0.42.1 StableDiffusion3Pipeline (encode_prompt, __call__), which
`text_to_image` equals (tests/test_sd3_pipeline.py: latents and images to 1e-4, with and without T5).

    pipe = load_sd3("sd3_medium_incl_clips_t5xxlfp16.safetensors", tokenizer="tokenizer/")   # or a diffusers folder
    context, pooled = pipe.encode_prompt(["a red circle"])      # (B, 77 + 256, 4096), (B, 2048)
    images = text_to_image(pipe, ["a red circle"], height=1024, width=1024, sampler="euler", steps=28,
                           guidance_scale=7.0, generator=torch.Generator().manual_seed(0))

Conditioning, as SD3 does it: each CLIP tower's penultimate hidden state (no final LayerNorm), CLIP-L and CLIP-G
concatenated on channels (768 + 1280) and zero-padded to the T5 width 4096, then the T5 tokens appended on the token
axis: context (B, 77 + 256, 4096). T5-less (SD3 allows it; diffusers `text_encoder_3=None`): zeros where the T5
tokens go. T5 sees all 256 positions, padding included (no mask). pooled = [CLIP-L pooled, CLIP-G projected pooled]
(B, 2048). The reference never projects CLIP-L's pooled output and single files carry no CLIP-L projection; diffusers
folders hold a CLIPTextModelWithProjection for it and its pipeline pools through that projection (its single-file
loader sets it to the identity). So: a tower's projection if it has one. The negative prompt "" is encoded like any
prompt (SD3 has no force_zeros_for_empty_prompt). Latents: latent_scale * (z - latent_shift) (1.5305, 0.0609).
Sampling: pure noise at sigma = 1, the Euler or Heun flow sampler (schedulers/flow.py) on a velocity under CFG (CFG
on the MMDiT output, as diffusers; the same step as CFG on x0_hat, but better conditioned near sigma = 0).
Single files (sd3_medium_incl_clips*.safetensors, SD3.5): `model.diffusion_model.`, `first_stage_model.`,
`text_encoders.clip_l.transformer.`, `text_encoders.clip_g.transformer.` (transformers names), optionally
`text_encoders.t5xxl.transformer.`; they carry no tokenizers: the CLIP vocabulary comes from `tokenizer=` or a
`tokenizer/` folder beside the file, T5's spiece.model from `t5_tokenizer=` or `tokenizer_3/` beside it. A file
written here carries its SD3Config in the metadata (`controlnext.sd3_config`).
Left out: skip-layer guidance and dynamic shifting (SD3.5 options), prompt weighting, > 77 CLIP tokens, one prompt
per encoder (prompt_2 / prompt_3), IP adapters, several controls at once, LoRA.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from controlnext import cli
from controlnext.checkpoint import read_header, read_metadata, read_state, save_json, save_state, write_folder
from controlnext.loaders import load_clip, original_state, save_diffusers_folder
from controlnext.sampling import Control, windowed
from controlnext.sd3_weights import load_mmdit, load_sd3_vae, original_mmdit_state
from controlnext.t5_weights import load_t5
from encoders.clip import CLIP_L, OPENCLIP_BIGG_TEXT, CLIPConfig, CLIPTextModel, build_clip
from encoders.keymap import T5_SINGLE_FILE_PREFIX, clip_config_to_hf
from encoders.t5 import T5_XXL, T5Config, T5Encoder
from encoders.t5_tokenizer import SD3_MAX_LENGTH, T5Tokenizer
from encoders.tokenizer import EOS, CLIPTokenizer
from mmdit.keymap import config_to_diffusers
from mmdit.mmdit import SD3_MEDIUM, TINY as TINY_MMDIT, MMDiT, MMDiTConfig
from schedulers import samplers
from schedulers.flow import SD3 as SD3_FLOW, FlowConfig, FlowDenoiser, flow_sigmas
from schedulers.guidance import cfg_combine
from vae.autoencoder import SD3 as SD3_VAE, AutoencoderKL, VAEConfig
from vae.keymap import vae_config_to_diffusers

FLOW_SAMPLERS = {"euler": samplers.sample_euler, "heun": samplers.sample_heun}  # the samplers valid on the flow path
METADATA_KEY = "controlnext.sd3_config"  # where a single file written here keeps its SD3Config (JSON)
PIPELINE_CLASS = "StableDiffusion3Pipeline"  # model_index.json _class_name
CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "text_encoders.clip_g.transformer.")
CLIP_L_PROJECTION = CLIP_PREFIXES[0] + "text_projection.weight"  # never applied by the reference (see module doc)
PADS = (EOS, "!")  # tokenizer (CLIP-L) pads with eos, tokenizer_2 (CLIP-G) with "!" (sd3_infer.py, as SDXL)
# scheduler_config.json fields that would change the flow sigmas; ours is the static shift of FlowConfig
UNSUPPORTED_SCHEDULER = ("use_dynamic_shifting", "shift_terminal", "use_karras_sigmas", "use_exponential_sigmas",
                         "use_beta_sigmas", "invert_sigmas", "stochastic_sampling")


@dataclass(frozen=True)
class SD3Config:
    mmdit: MMDiTConfig
    vae: VAEConfig
    clip: tuple[CLIPConfig, CLIPConfig]  # CLIP-L, CLIP-G; a tower pools through its projection if it has one
    t5: T5Config | None                  # None: T5-less (zeros where the T5 tokens go)
    flow: FlowConfig = SD3_FLOW          # the training schedule (shift 3.0)
    t5_length: int = SD3_MAX_LENGTH      # T5 tokens in the context (diffusers max_sequence_length 256)
    resolution: int = 1024               # native sampling size in pixels

    def __post_init__(self):
        m = self.mmdit
        if len(self.clip) != 2:
            raise ValueError(f"SD3 has two CLIP towers (L, G), got {len(self.clip)}")
        width = sum(c.hidden_size for c in self.clip)
        if width > m.context_dim:
            raise ValueError(f"CLIP features ({width} wide) do not fit the MMDiT context width {m.context_dim}")
        if self.t5 is not None and self.t5.d_model != m.context_dim:
            raise ValueError(f"T5 width {self.t5.d_model} differs from the MMDiT context width {m.context_dim}")
        pooled = sum(c.projection_dim or c.hidden_size for c in self.clip)
        if pooled != m.pooled_dim:
            raise ValueError(f"the CLIP towers pool {pooled} values but the MMDiT takes pooled_dim={m.pooled_dim}")
        if self.vae.latent_channels != m.in_channels:
            raise ValueError(f"VAE latents have {self.vae.latent_channels} channels, the MMDiT takes {m.in_channels}")


def config_to_json(config: SD3Config) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> SD3Config:
    d = json.loads(text)
    return SD3Config(mmdit=cli.from_dict(MMDiTConfig, d["mmdit"]), vae=cli.from_dict(VAEConfig, d["vae"]),
                     clip=tuple(cli.from_dict(CLIPConfig, c) for c in d["clip"]),
                     t5=None if d["t5"] is None else cli.from_dict(T5Config, d["t5"]),
                     flow=cli.from_dict(FlowConfig, d["flow"]), t5_length=d["t5_length"], resolution=d["resolution"])


def flow_from_diffusers(d: dict) -> FlowConfig:
    """FlowConfig from a FlowMatchEulerDiscreteScheduler scheduler_config.json (diffusers' default shift is 1.0)."""
    unsupported = [k for k in UNSUPPORTED_SCHEDULER if d.get(k)]
    if unsupported:
        raise ValueError(f"scheduler_config.json: {', '.join(unsupported)} not supported (static shift only)")
    return FlowConfig(num_train_timesteps=d.get("num_train_timesteps", 1000), shift=float(d.get("shift", 1.0)))


def t5_config_to_hf(c: T5Config) -> dict:
    """The transformers T5EncoderModel config.json of `c` (encoders.t5.config_from_hf reads it back)."""
    return {"architectures": ["T5EncoderModel"], "model_type": "t5", "vocab_size": c.vocab_size, "d_model": c.d_model,
            "num_layers": c.num_layers, "num_heads": c.num_heads, "d_kv": c.d_kv, "d_ff": c.d_ff,
            "relative_attention_num_buckets": c.relative_attention_num_buckets,
            "relative_attention_max_distance": c.relative_attention_max_distance,
            "layer_norm_epsilon": c.layer_norm_epsilon, "feed_forward_proj": "gated-gelu", "dropout_rate": 0.0,
            "is_encoder_decoder": False, "use_cache": False}


# The released configs (stabilityai/stable-diffusion-3-medium): CLIP-L without projection (the reference's pooling).
SD3_MEDIUM_CONFIG = SD3Config(SD3_MEDIUM, SD3_VAE, (CLIP_L, OPENCLIP_BIGG_TEXT), T5_XXL)
# SD3's structure at test sizes, T5-less: CLIP-L 16 + CLIP-G 32 wide (padded to 64), pooled 16 + 32; the towers'
# vocabulary is the fill50k tokenizer's (controlnext/data.py: 853 ids, eos 852); 4-level 16-channel VAE, 64 px.
TINY_SD3 = SD3Config(
    dataclasses.replace(TINY_MMDIT, context_dim=64, pooled_dim=48, sample_size=8),
    dataclasses.replace(SD3_VAE, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=8),
    (CLIPConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=853,
                eos_token_id=852),
     CLIPConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, quick_gelu=False,
                projection_dim=32, vocab_size=853, eos_token_id=852)),
    None, resolution=64)
# The same with a tiny T5 (its tokenizer: a SentencePiece model of <= 156 pieces, + T5's 100 sentinels).
TINY_SD3_T5 = dataclasses.replace(TINY_SD3, t5=T5Config(vocab_size=256, d_model=64, num_layers=2, num_heads=4, d_kv=8,
                                                        d_ff=64))
PRESETS = {"sd3_medium": SD3_MEDIUM_CONFIG, "tiny_sd3": TINY_SD3, "tiny_sd3_t5": TINY_SD3_T5}


class StableDiffusion3(nn.Module):
    """The components of one SD3 checkpoint and the ways SD3 uses them; no forward (the MMDiT is `self.mmdit`)."""

    def __init__(self, config: SD3Config, mmdit: MMDiT, vae: AutoencoderKL, clip: list[CLIPTextModel],
                 t5: T5Encoder | None, tokenizers: list[CLIPTokenizer], t5_tokenizer: T5Tokenizer | None):
        super().__init__()
        assert len(clip) == len(tokenizers) == 2, "two CLIP towers, one tokenizer each"
        assert (t5 is None) == (config.t5 is None) and (t5 is None or t5_tokenizer is not None), "T5 and its tokenizer"
        self.config = config
        self.mmdit, self.vae = mmdit, vae
        self.text_encoders = nn.ModuleList(clip)
        self.t5 = t5
        self.tokenizers, self.t5_tokenizer = tokenizers, t5_tokenizer

    @property
    def unet(self) -> MMDiT:
        """The denoising network under the name train.py gives every family's (its gradient-checkpointing switch)."""
        return self.mmdit

    @classmethod
    def random(cls, config: SD3Config, tokenizer: CLIPTokenizer, t5_tokenizer: T5Tokenizer | None = None
               ) -> StableDiffusion3:
        """Randomly initialised components (tiny test checkpoints); `tokenizer`'s vocabulary serves both towers."""
        if config.t5 is not None and t5_tokenizer is None:
            raise ValueError("a config with a T5 needs its t5_tokenizer (a T5Tokenizer)")
        t5 = T5Encoder(config.t5) if config.t5 is not None else None
        tokenizers = [CLIPTokenizer(tokenizer.vocab, tokenizer.merges, pad) for pad in PADS]
        return cls(config, MMDiT(config.mmdit), AutoencoderKL(config.vae), [build_clip(c) for c in config.clip], t5,
                   tokenizers, t5_tokenizer if t5 is not None else None)

    # --- conditioning ---------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], clip_skip: int = 0) -> tuple[Tensor, Tensor]:
        """Prompts -> (context (B, 77 + t5_length, D), pooled (B, P)), as the module docstring says.
        clip_skip (diffusers' convention) steps back that many more CLIP layers. Gradients flow when enabled."""
        device = next(self.mmdit.parameters()).device
        features, pooled = [], []
        for tower, tokenizer in zip(self.text_encoders, self.tokenizers):
            out = tower(tokenizer(prompts).to(device))
            features.append(out.hidden_states[-(clip_skip + 2)])  # (B, 77, C): penultimate layer, no final LN
            pooled.append(out.pooled if out.embeds is None else out.embeds)  # (B, P_i)
        width = self.config.mmdit.context_dim
        clip = torch.cat(features, dim=-1)  # (B, 77, C_L + C_G)
        clip = F.pad(clip, (0, width - clip.shape[-1]))  # (B, 77, D): zero-padded to the T5 width
        if self.t5 is None:
            t5 = clip.new_zeros(len(prompts), self.config.t5_length, width)  # (B, T, D): T5-less
        else:
            ids, _ = self.t5_tokenizer(prompts)  # (B, T); no mask: SD3 attends the padding too
            t5 = self.t5(ids.to(device)).to(clip.dtype)  # (B, T, D)
        return torch.cat([clip, t5], dim=1), torch.cat(pooled, dim=-1)  # (B, 77 + T, D), (B, P_L + P_G)

    # --- latents --------------------------------------------------------------------------------------------------
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 16, H/8, W/8) shifted, scaled latents, a sample of the posterior."""
        return self.vae.encode_latent(images, generator=generator)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """(B, 16, h, w) latents -> (B, 3, 8h, 8w) images in [-1, 1] (not clamped)."""
        return self.vae.decode_latent(latents)

    # --- export -----------------------------------------------------------------------------------------------------
    def _clip_l_state(self) -> dict[str, Tensor]:
        """CLIP-L's tensors for the original layout, which has no CLIP-L projection: an identity one is dropped."""
        state = self.text_encoders[0].state_dict()
        projection = state.pop("text_projection.weight", None)
        if projection is not None and not torch.equal(projection, torch.eye(*projection.shape, dtype=projection.dtype)):
            raise ValueError("the original SD3 layout has no CLIP-L projection (the reference pools CLIP-L "
                             "unprojected) and this tower's text_projection is not the identity: "
                             "save layout='diffusers'")
        return state

    def save(self, path: str | Path, layout: str = "original", dtype: torch.dtype | None = None) -> None:
        """"original": one .safetensors in the SD3 single-file layout, the config in its metadata, tokenizer/ (and
        tokenizer_3/ with a T5) beside it. "diffusers": a pipeline folder that diffusers.StableDiffusion3Pipeline
        .from_pretrained loads (T5-less: pass it text_encoder_3=None, tokenizer_3=None), written as one unit."""
        path = Path(path)
        cast = lambda state: {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v  # noqa: E731
                              for k, v in state.items()}
        if layout == "original":
            state = original_mmdit_state(self.mmdit) | original_state(self.vae, "vae")
            for prefix, tower_state in zip(CLIP_PREFIXES, (self._clip_l_state(), self.text_encoders[1].state_dict())):
                state |= {prefix + k: v for k, v in tower_state.items()}
            if self.t5 is not None:
                state |= {T5_SINGLE_FILE_PREFIX + k: v for k, v in self.t5.state_dict().items()}
            save_state(cast(state), path, metadata={METADATA_KEY: config_to_json(self.config)})
            self.tokenizers[0].save(path.parent / "tokenizer")
            if self.t5_tokenizer is not None:
                self._save_t5_tokenizer(path.parent / "tokenizer_3")
            return
        if layout != "diffusers":
            raise ValueError(f"unknown layout {layout!r} (expected 'original' or 'diffusers')")
        c = self.config
        files = {"transformer": lambda p: save_diffusers_folder(cast(self.mmdit.state_dict()),
                                                                config_to_diffusers(c.mmdit), p),
                 "vae": lambda p: save_diffusers_folder(cast(self.vae.state_dict()), vae_config_to_diffusers(c.vae)
                                                        | {"sample_size": c.resolution}, p),
                 "scheduler/scheduler_config.json": lambda p: save_json(
                     {"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": c.flow.shift,
                      "num_train_timesteps": c.flow.num_train_timesteps}, p)}
        index = {"_class_name": PIPELINE_CLASS, "_diffusers_version": "0.42.1",
                 "transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "image_encoder": [None, None],
                 "feature_extractor": [None, None]}
        for i, (tower, tokenizer) in enumerate(zip(self.text_encoders, self.tokenizers)):
            suffix, state, cfg = f"_{i + 1}" if i else "", tower.state_dict(), tower.config
            if cfg.projection_dim is None:  # CLIP-L as diffusers holds it: with an identity projection
                state["text_projection.weight"] = torch.eye(cfg.hidden_size)
                cfg = dataclasses.replace(cfg, projection_dim=cfg.hidden_size)
            files[f"text_encoder{suffix}"] = lambda p, s=state, j=clip_config_to_hf(cfg): save_diffusers_folder(
                cast(s), j, p, "model.safetensors")
            files[f"tokenizer{suffix}"] = tokenizer.save
            index |= {f"text_encoder{suffix}": ["transformers", "CLIPTextModelWithProjection"],
                      f"tokenizer{suffix}": ["transformers", "CLIPTokenizer"]}
        index |= {"text_encoder_3": [None, None], "tokenizer_3": [None, None]}
        if self.t5 is not None:
            files["text_encoder_3"] = lambda p: save_diffusers_folder(cast(self.t5.state_dict()), t5_config_to_hf(c.t5),
                                                                      p, "model.safetensors")
            files["tokenizer_3"] = self._save_t5_tokenizer
            index |= {"text_encoder_3": ["transformers", "T5EncoderModel"], "tokenizer_3": ["transformers",
                                                                                           "T5TokenizerFast"]}
        files["model_index.json"] = lambda p: save_json(index, p)
        write_folder(path, files, pipeline=True)

    def _save_t5_tokenizer(self, folder: Path) -> None:
        """tokenizer_3/: the SentencePiece model and the settings transformers' T5 tokenizer reads with it."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "spiece.model").write_bytes(self.t5_tokenizer.sp.serialized_model_proto())
        save_json({"tokenizer_class": "T5Tokenizer", "model_max_length": self.config.t5_length, "extra_ids": 100,
                   "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}, folder / "tokenizer_config.json")


# --- loading -----------------------------------------------------------------------------------------------------------

def is_sd3(source: str | Path) -> bool:
    """Whether `source` is an SD3 pipeline: a diffusers folder of StableDiffusion3Pipeline, or a single .safetensors
    file holding MMDiT joint blocks (read off the header; no tensor is read)."""
    path = Path(source)
    if path.is_dir():
        index = path / "model_index.json"
        return index.is_file() and json.loads(index.read_text()).get("_class_name") == PIPELINE_CLASS
    if path.is_file() and path.suffix == ".safetensors":
        return any(k.startswith("model.diffusion_model.joint_blocks.") for k in read_header(path)[0])
    return False


def _tokenizers(path: Path, tokenizer: str | Path | None) -> list[CLIPTokenizer]:
    folder = Path(tokenizer) if tokenizer is not None else path.parent / "tokenizer"
    if (folder / "tokenizer").is_dir():
        folder = folder / "tokenizer"  # a pipeline folder
    if not (folder / "vocab.json").is_file():
        raise ValueError(f"{path}: a single file carries no tokenizer: pass tokenizer= a folder with vocab.json and "
                         f"merges.txt (an SD3 diffusers tokenizer/), or put a tokenizer/ folder beside the file")
    base = CLIPTokenizer.from_folder(folder)
    return [CLIPTokenizer(base.vocab, base.merges, pad) for pad in PADS]


def _single_file(path: Path, tokenizer, t5_tokenizer, dtype: torch.dtype, use_t5: bool) -> StableDiffusion3:
    state, meta = read_state(path), read_metadata(path)
    missing = [p for p in CLIP_PREFIXES if not any(k.startswith(p) for k in state)]
    if missing:
        raise ValueError(f"{path}: no {' / '.join(missing)} weights: this SD3 file has no text encoders "
                         "(sd3_medium.safetensors ships without them): use sd3_medium_incl_clips*.safetensors or a "
                         "diffusers folder")
    config = config_from_json(meta[METADATA_KEY]) if METADATA_KEY in meta else None
    mmdit = load_mmdit(state, config.mmdit if config else None, dtype=dtype)  # released: detected from the weights
    vae = load_sd3_vae(state, config.vae if config else "sd3").to(dtype)
    # CLIP-L: any stored projection is not part of SD3 (the reference never applies it; diffusers' converter
    # replaces it by the identity), so it is left out of the tower
    clip_l = load_clip({k: v for k, v in state.items() if k != CLIP_L_PROJECTION}, config.clip[0] if config else CLIP_L,
                       prefix=CLIP_PREFIXES[0], dtype=dtype)
    clip_g = load_clip(state, config.clip[1] if config else OPENCLIP_BIGG_TEXT, prefix=CLIP_PREFIXES[1], dtype=dtype)
    t5 = None
    if use_t5 and any(k.startswith(T5_SINGLE_FILE_PREFIX) for k in state):
        t5 = load_t5(state, config.t5 if config and config.t5 else None, dtype=dtype)
    t5_length, flow, resolution = (config.t5_length, config.flow, config.resolution) if config else \
        (SD3_MAX_LENGTH, SD3_FLOW, 1024)
    full = SD3Config(mmdit.config, vae.config, (clip_l.config, clip_g.config), t5.config if t5 else None, flow,
                     t5_length, resolution)
    t5_tok = None
    if t5 is not None:
        folder = Path(t5_tokenizer) if t5_tokenizer is not None else path.parent / "tokenizer_3"
        if not (folder / "spiece.model").is_file() and not (folder / "tokenizer_3" / "spiece.model").is_file():
            raise ValueError(f"{path}: the T5 needs its SentencePiece model: pass t5_tokenizer= a folder with "
                             "spiece.model (an SD3 diffusers tokenizer_3/), put tokenizer_3/ beside the file, or "
                             "load without T5 (use_t5=False)")
        t5_tok = T5Tokenizer.from_folder(folder, t5_length)
    return StableDiffusion3(full, mmdit, vae, [clip_l, clip_g], t5, _tokenizers(path, tokenizer), t5_tok)


def _diffusers_folder(folder: Path, dtype: torch.dtype, use_t5: bool) -> StableDiffusion3:
    index = json.loads((folder / "model_index.json").read_text())
    if index.get("_class_name") != PIPELINE_CLASS:
        raise ValueError(f"{folder}/model_index.json: {index.get('_class_name')!r} is not {PIPELINE_CLASS}")
    mmdit = load_mmdit(folder, dtype=dtype)
    vae = load_sd3_vae(folder).to(dtype)
    clip = [load_clip(folder / name, dtype=dtype) for name in ("text_encoder", "text_encoder_2")]
    has_t5 = (index.get("text_encoder_3") or [None])[0] is not None and (folder / "text_encoder_3").is_dir()
    t5 = load_t5(folder / "text_encoder_3", dtype=dtype) if use_t5 and has_t5 else None
    flow = flow_from_diffusers(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    config = SD3Config(mmdit.config, vae.config, (clip[0].config, clip[1].config), t5.config if t5 else None, flow,
                       resolution=mmdit.config.sample_size * vae.config.downscale)
    tokenizers = [CLIPTokenizer.from_folder(folder / name) for name in ("tokenizer", "tokenizer_2")]
    t5_tokenizer = T5Tokenizer.from_folder(folder / "tokenizer_3", config.t5_length) if t5 is not None else None
    return StableDiffusion3(config, mmdit, vae, clip, t5, tokenizers, t5_tokenizer)


def load_sd3(source: str | Path, tokenizer: str | Path | None = None, t5_tokenizer: str | Path | None = None, *,
             dtype: torch.dtype | None = None, use_t5: bool = True) -> StableDiffusion3:
    """An SD3 pipeline from an original single file (with its text encoders) or a diffusers pipeline folder.
    use_t5=False (or a file without T5): T5-less, zeros in place of the T5 tokens (and 9.5 GB less memory)."""
    source = Path(source)
    if source.is_dir():
        if not (source / "model_index.json").is_file():
            raise ValueError(f"{source}: a diffusers pipeline folder needs model_index.json")
        pipe = _diffusers_folder(source, dtype or torch.float32, use_t5)
    elif source.is_file():
        pipe = _single_file(source, tokenizer, t5_tokenizer, dtype or torch.float32, use_t5)
    else:
        raise ValueError(f"pretrained model not found: {source}")
    return pipe.eval()


# --- text (+ control) to image -------------------------------------------------------------------------------------------

def cfg_velocity(mmdit: MMDiT, context: Tensor, uncond: Tensor, pooled: Tensor, uncond_pooled: Tensor,
                 guidance_scale: float, control: Control | None = None):
    """v(x, t) of the MMDiT, or of a controlled model around it, under CFG over (uncond, cond) in one doubled batch
    (uncond first, torch.cat order). The control's stem runs once per sampling run and its features once per step
    for both halves, as controlnext/sampling.py does for the UNets; `control_uncond` False gives the uncond half k 0."""
    guided, B = guidance_scale != 1.0, context.shape[0]
    ctx = torch.cat([uncond, context]) if guided else context  # (2B, M, D)
    y = torch.cat([uncond_pooled, pooled]) if guided else pooled  # (2B, P)
    model, image, scale = control if control is not None else (None, None, 0.0)
    prepared = model.prepare(image) if model is not None else None  # once per sampling run: the branch's stem

    def net(x_in: Tensor, t: Tensor) -> Tensor:
        x, t2 = (torch.cat([x_in, x_in]), torch.cat([t, t])) if guided else (x_in, t)  # (2B, 16, h, w) under CFG
        if model is None:
            v = mmdit(x, t2, ctx, y)
        else:
            c, k = model.features(prepared, t), scale  # (B, C, h', w'): once for both halves, whose t is the same
            if guided:
                c = torch.cat([c, c])  # (2B, C, h', w')
                if not model.control_uncond:
                    k = torch.tensor([0.0] * B + [scale] * B, dtype=x.dtype, device=x.device).view(2 * B, 1, 1, 1)
            v = model.forward_with_features(x, t2, ctx, c, y, k)
        return cfg_combine(*v.chunk(2), guidance_scale) if guided else v  # uncond, cond

    return net


@torch.no_grad()
def text_to_image(pipe: StableDiffusion3, prompts: list[str], negative_prompts: list[str] | None = None, *,
                  height: int, width: int, sampler: str, steps: int, guidance_scale: float,
                  generator: torch.Generator, noise: Tensor | None = None, controls: Sequence[Control] = (),
                  control_window: tuple[float, float] = (0.0, 1.0), clip_skip: int = 0, decode: bool = True) -> Tensor:
    """Prompts (+ at most one control: (controlled model around pipe.mmdit, condition (B, 3, H, W) in [0, 1], scale))
    -> images (B, 3, H, W) in [-1, 1], or the latents. `noise` (B, 16, H/8, W/8) is the initial latent (diffusers'
    `latents`); `sampler` "euler" or "heun"; `control_window` the fraction of the trajectory the control acts on."""
    stride = pipe.config.vae.downscale * pipe.config.mmdit.patch_size
    if height % stride or width % stride:
        raise ValueError(f"height and width must be multiples of {stride} (VAE stride x patch size), "
                         f"got {height}x{width}")
    if sampler not in FLOW_SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: SD3 samples with the flow samplers {', '.join(FLOW_SAMPLERS)}")
    if len(controls) > 1:
        raise ValueError(f"SD3 takes at most one control at a time, got {len(controls)}")
    if controls and controls[0][0].mmdit is not pipe.mmdit:
        raise ValueError("the control is a controlled model around another MMDiT than this pipeline's")
    device = next(pipe.mmdit.parameters()).device
    negative_prompts = negative_prompts if negative_prompts is not None else [""] * len(prompts)
    context, pooled = pipe.encode_prompt(prompts, clip_skip)
    uncond, uncond_pooled = pipe.encode_prompt(negative_prompts, clip_skip)
    control = None if not controls else (controls[0][0], controls[0][1].to(device), controls[0][2])
    flow, sigmas = pipe.config.flow, flow_sigmas(pipe.config.flow, steps)
    denoiser = FlowDenoiser(cfg_velocity(pipe.mmdit, context, uncond, pooled, uncond_pooled, guidance_scale, control),
                            flow)
    if control is not None and tuple(control_window) != (0.0, 1.0):
        plain = FlowDenoiser(cfg_velocity(pipe.mmdit, context, uncond, pooled, uncond_pooled, guidance_scale), flow)
        denoiser = windowed(denoiser, plain, sigmas, *control_window)
    f = pipe.config.vae.downscale
    shape = (len(prompts), pipe.config.mmdit.in_channels, height // f, width // f)
    x = (torch.randn(shape, generator=generator) if noise is None else noise).to(device)  # pure noise at sigma = 1
    latents = FLOW_SAMPLERS[sampler](denoiser, x, sigmas)
    return pipe.decode_latents(latents) if decode else latents
