"""A Stable Diffusion checkpoint as one object: UNet + VAE + text encoder(s) + tokenizer(s) + its training schedule.

Paper: Rombach et al. 2022 (LDM) §3.3 (latent space, cross-attention conditioning); Podell et al. 2023 (SDXL) §2.1-2.2
(two text encoders, pooled text and size/crop micro-conditioning). Reference for the conditioning:
CompVis/stable-diffusion@21f890f9 ldm/modules/encoders/modules.py (FrozenCLIPEmbedder), Stability-AI/stablediffusion
@cf1d67a (FrozenOpenCLIPEmbedder, layer="penultimate"), Stability-AI/generative-models@0ad7de9 sgm conditioners, and
huggingface/diffusers@v0.42.1 StableDiffusion(XL)Pipeline.encode_prompt, which they equal (tests/test_sd_pipeline.py).
../shared/reference/checkpoints.md: §1 detection, §2.1 single-file prefixes, §5.4 which layer, §6 plumbing, §7 folders,
§10 tokenizer pads.

    pipe = load_sd("v1-5-pruned-emaonly.safetensors", tokenizer="tokenizer/")   # or a diffusers pipeline folder
    context, pooled = pipe.encode_prompt(["a red circle"])                     # (B, 77, D), SDXL: (B, 1280)
    y = pipe.vector(pooled, (1024, 1024))                                       # SDXL's y; None otherwise
    latents = pipe.encode_images(images)                                        # [-1, 1] -> scaled latents
    images = pipe.decode_latents(latents)

Single files carry no tokenizer (§10): it comes from `tokenizer=` (a folder with vocab.json + merges.txt, or open_clip's
bpe_simple_vocab_16e6.txt.gz), else from a `tokenizer/` folder beside the file. A single file this project wrote
carries its component configs in the safetensors metadata (key `controlnext.sd_config`), so small models load with no
guessing; released files get the released configs of the family they are detected as.
Left out: inpainting (9-channel) UNets, SDXL's refiner, prompt weighting, > 77-token prompts, textual inversion.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from controlnext import cli
from controlnext.checkpoint import read_metadata, read_state, save_json, save_state, write_folder
from controlnext.loaders import (ORIGINAL_PREFIXES, load_clip, load_unet, load_vae, original_state,
                                 save_diffusers_folder)
from controlnext.sampling import Control, cfg_denoiser, generate, sigmas_for, windowed
from encoders.clip import CLIP_L, OPENCLIP_BIGG_TEXT, OPENCLIP_H_TEXT, CLIPConfig, CLIPTextModel, build_clip
from encoders.tokenizer import EOS, CLIPTokenizer
from schedulers.sigmas import ScheduleConfig
from encoders.keymap import clip_config_to_hf
from unet.keymap import unet_config_to_diffusers
from unet.sd_unet import SD15, SD21, SDXL, UNet, UNetConfig, sdxl_vector
from vae.autoencoder import SD as SD_VAE, SDXL as SDXL_VAE, AutoencoderKL, VAEConfig
from vae.keymap import vae_config_to_diffusers

FAMILIES = ("sd1", "sd2", "sdxl")
METADATA_KEY = "controlnext.sd_config"  # where a single file written here keeps its SDConfig (JSON)
# Each text tower's pad token (checkpoints.md §10): the UNet attends all 77 positions, so it changes the result.
PADS = {"sd1": (EOS,), "sd2": ("!",), "sdxl": (EOS, "!")}
# The original single-file component of each text tower, in tower order (§2.1; prefixes in loaders.ORIGINAL_PREFIXES).
TEXT_COMPONENTS = {"sd1": ("sd15_text",), "sd2": ("sd2_text",), "sdxl": ("sdxl_text_l", "sdxl_text_g")}


@dataclass(frozen=True)
class SDConfig:
    family: str                         # "sd1" | "sd2" | "sdxl": how prompts are encoded (checkpoints.md §5.4)
    unet: UNetConfig
    vae: VAEConfig
    text: tuple[CLIPConfig, ...]        # one tower (SD1: CLIP-L, SD2: OpenCLIP-H) or two (SDXL: CLIP-L, bigG)
    schedule: ScheduleConfig            # the DDPM schedule the UNet was trained with (scheduler_config.json)
    zero_empty_negative: bool = False   # SDXL's force_zeros_for_empty_prompt: an empty negative prompt is zeros
    resolution: int = 512               # native sampling size in pixels (SD1.5 512, SD2.1-768 768, SDXL 1024)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"SDConfig.family must be one of {FAMILIES}, got {self.family!r}")
        if len(self.text) != len(PADS[self.family]):
            raise ValueError(f"a {self.family} pipeline has {len(PADS[self.family])} text tower(s), got {len(self.text)}")
        width = sum(c.hidden_size for c in self.text)
        if width != self.unet.context_dim:
            raise ValueError(f"text towers give {width}-wide tokens but the UNet cross-attends {self.unet.context_dim}")


def config_to_json(config: SDConfig) -> str:
    return json.dumps(dataclasses.asdict(config))


def config_from_json(text: str) -> SDConfig:
    d = json.loads(text)
    return SDConfig(family=d["family"], unet=cli.from_dict(UNetConfig, d["unet"]),
                    vae=cli.from_dict(VAEConfig, d["vae"]),
                    text=tuple(cli.from_dict(CLIPConfig, c) for c in d["text"]),
                    schedule=cli.from_dict(ScheduleConfig, d["schedule"]),
                    zero_empty_negative=d["zero_empty_negative"], resolution=d["resolution"])


def schedule_from_diffusers(d: dict) -> ScheduleConfig:
    """ScheduleConfig from a diffusers scheduler_config.json (§7.5); the sampler-side fields keep their defaults."""
    if d.get("trained_betas") is not None:
        raise ValueError("scheduler_config.json: trained_betas are not supported")
    return ScheduleConfig(num_train_timesteps=d.get("num_train_timesteps", 1000), beta_start=d.get("beta_start", 0.0001),
                          beta_end=d.get("beta_end", 0.02), beta_schedule=d.get("beta_schedule", "linear"),
                          prediction_type=d.get("prediction_type", "epsilon"),
                          timestep_spacing=d.get("timestep_spacing", "leading"), steps_offset=d.get("steps_offset", 0),
                          rescale_zero_snr=bool(d.get("rescale_betas_zero_snr", False)))


def schedule_to_diffusers(s: ScheduleConfig) -> dict:
    """The DDIMScheduler config.json that describes `s` (what export writes)."""
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": s.num_train_timesteps, "beta_start": s.beta_start,
            "beta_end": s.beta_end, "beta_schedule": s.beta_schedule, "prediction_type": s.prediction_type,
            "timestep_spacing": s.timestep_spacing, "steps_offset": s.steps_offset, "clip_sample": False,
            "set_alpha_to_one": False, "rescale_betas_zero_snr": s.rescale_zero_snr}


# The released configs, one line per family (checkpoints.md §7). SD2.1-768 is v-prediction; SD2-base is epsilon.
SD15_CONFIG = SDConfig("sd1", SD15, SD_VAE, (CLIP_L,), ScheduleConfig())
SD21_CONFIG = SDConfig("sd2", SD21, SD_VAE, (OPENCLIP_H_TEXT,), ScheduleConfig(prediction_type="v_prediction"),
                       resolution=768)
SDXL_CONFIG = SDConfig("sdxl", SDXL, SDXL_VAE, (CLIP_L, OPENCLIP_BIGG_TEXT), ScheduleConfig(), zero_empty_negative=True,
                       resolution=1024)
RELEASED = {"sd1": SD15_CONFIG, "sd2": SD21_CONFIG, "sdxl": SDXL_CONFIG}
# The miniature SD1.5 the main job runs on (experiments/weights/; issue 14): SD1.5's structure (4 levels, attention at
# 0-2, 2 ResBlocks per level, 1x1-conv projections, CLIP-L-style text tower with quick-GELU) at CPU widths, its VAE
# 8x down / 4 latent channels like SD's, and SD1.5's schedule. The text tower's vocabulary is the fill50k tokenizer
# (controlnext/data.py fill50k_tokenizer: 853 ids, the last one eos).
MINI_SD15 = SDConfig(
    "sd1",
    UNetConfig(channels=(32, 64, 64, 64), heads=(2, 4, 4, 4), context_dim=64, groups=16),
    VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_groups=8),
    (CLIPConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256, vocab_size=853,
                eos_token_id=852),),
    ScheduleConfig(), resolution=64)
# The same structure at test sizes: trains a step in well under a second on CPU (tests/test_train.py).
TINY_SD15 = SDConfig(
    "sd1",
    UNetConfig(channels=(16, 32, 32, 32), heads=(2, 2, 2, 2), context_dim=32, groups=8),
    VAEConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_groups=8),
    (CLIPConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=853,
                eos_token_id=852),),
    ScheduleConfig(), resolution=64)
PRESETS = {"mini_sd15": MINI_SD15, "tiny_sd15": TINY_SD15}


class StableDiffusion(nn.Module):
    """The components of one checkpoint and the ways SD uses them; no forward (the UNet is `self.unet`)."""

    def __init__(self, config: SDConfig, unet: UNet, vae: AutoencoderKL, text_encoders: list[CLIPTextModel],
                 tokenizers: list[CLIPTokenizer]):
        super().__init__()
        assert len(text_encoders) == len(tokenizers) == len(config.text), "one tokenizer per text tower"
        self.config = config
        self.unet, self.vae = unet, vae
        self.text_encoders = nn.ModuleList(text_encoders)
        self.tokenizers = tokenizers

    @classmethod
    def random(cls, config: SDConfig, tokenizer: CLIPTokenizer) -> StableDiffusion:
        """Randomly initialised components (training from scratch, tiny test checkpoints); `tokenizer`'s vocabulary
        is shared by every tower, each with its own pad token."""
        towers = [build_clip(c) for c in config.text]
        tokenizers = [CLIPTokenizer(tokenizer.vocab, tokenizer.merges, pad) for pad in PADS[config.family]]
        return cls(config, UNet(config.unet), AutoencoderKL(config.vae), towers, tokenizers)

    # --- conditioning ---------------------------------------------------------------------------------------------
    def encode_prompt(self, prompts: list[str], clip_skip: int = 0, zero_empty: bool = False
                      ) -> tuple[Tensor, Tensor | None]:
        """Prompts -> (context (B, 77, D), pooled (B, P) for SDXL else None), as each family's conditioner does.

        SD1 / SD2: the last layer after the final LayerNorm (for SD2's 23-layer HF tower that is OpenCLIP's
        penultimate layer + ln_final). SDXL: both towers' penultimate layer without LayerNorm, concatenated, and the
        bigG tower's projected pooled output. clip_skip (diffusers' convention; A1111's "clip skip 2" is 1) steps back
        that many more layers. zero_empty: an empty prompt gives zeros (SDXL's force_zeros_for_empty_prompt).
        Gradients flow when enabled (training a text encoder); callers that do not train one wrap it in no_grad.
        """
        device = next(self.text_encoders.parameters()).device
        contexts, pooled = [], None
        for tower, tokenizer in zip(self.text_encoders, self.tokenizers):
            out = tower(tokenizer(prompts).to(device))
            if self.config.family == "sdxl":
                contexts.append(out.hidden_states[-(clip_skip + 2)])  # (B, 77, C), no final LayerNorm
                pooled = out.embeds  # the last tower's projected pooled output, (B, 1280)
            elif clip_skip:
                contexts.append(tower.text_model.final_layer_norm(out.hidden_states[-(clip_skip + 1)]))
            else:
                contexts.append(out.last_hidden_state)  # (B, 77, C)
        context = torch.cat(contexts, dim=-1)  # (B, 77, sum C)
        if zero_empty:
            empty = torch.tensor([not p for p in prompts], device=device)
            context = torch.where(empty[:, None, None], 0.0, context)
            pooled = None if pooled is None else torch.where(empty[:, None], 0.0, pooled)
        return context, pooled

    def vector(self, pooled: Tensor | None, target_size: tuple[int, int], original_size: tuple[int, int] | None = None,
               crop_top_left: tuple[int, int] = (0, 0)) -> Tensor | None:
        """SDXL's vector condition y (B, 2816) from the pooled text and (height, width) sizes; None for SD1/SD2."""
        if self.config.family != "sdxl":
            return None
        size = torch.tensor(target_size, dtype=torch.float32)
        original = size if original_size is None else torch.tensor(original_size, dtype=torch.float32)
        return sdxl_vector(pooled, original, torch.tensor(crop_top_left, dtype=torch.float32), size,
                           id_dim=self.config.unet.added_id_dim)

    # --- latents --------------------------------------------------------------------------------------------------
    def encode_images(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 4, H/8, W/8) scaled latents, a sample of the posterior (the trainers' way)."""
        return self.vae.encode_latent(images, generator=generator)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """(B, 4, h, w) scaled latents -> (B, 3, 8h, 8w) images in [-1, 1] (not clamped)."""
        return self.vae.decode_latent(latents)

    # --- export -----------------------------------------------------------------------------------------------------
    def save(self, path: str | Path, layout: str = "original", dtype: torch.dtype | None = None) -> None:
        """"original": one .safetensors in the LDM/SGM single-file layout (what A1111 and ComfyUI load), the config in
        its metadata, the tokenizer in a tokenizer/ folder beside it. "diffusers": a pipeline folder
        (model_index.json, unet/, vae/, text_encoder(_2)/, tokenizer(_2)/, scheduler/) that
        diffusers.StableDiffusion(XL)Pipeline.from_pretrained loads, written as one unit. `dtype`: store tensors in it."""
        path, family = Path(path), self.config.family
        cast = lambda state: {k: v.to(dtype) if dtype is not None and v.is_floating_point() else v  # noqa: E731
                              for k, v in state.items()}
        if layout == "original":
            state = original_state(self.unet, "unet") | original_state(self.vae, "vae")
            for tower, component in zip(self.text_encoders, TEXT_COMPONENTS[family]):
                state |= original_state(tower, component)
            save_state(cast(state), path, metadata={METADATA_KEY: config_to_json(self.config)})
            self.tokenizers[0].save(path.parent / "tokenizer")
            return
        if layout != "diffusers":
            raise ValueError(f"unknown layout {layout!r} (expected 'original' or 'diffusers')")
        size = self.config.resolution // 8  # diffusers' sample_size is in latent pixels
        unet_json = unet_config_to_diffusers(self.config.unet) | {"sample_size": size}
        files = {"unet": lambda p: save_diffusers_folder(cast(self.unet.state_dict()), unet_json, p),
                 "vae": lambda p: save_diffusers_folder(cast(self.vae.state_dict()), vae_config_to_diffusers(
                     self.config.vae) | {"sample_size": self.config.resolution}, p),
                 "scheduler/scheduler_config.json": lambda p: save_json(schedule_to_diffusers(self.config.schedule), p)}
        index = {"_class_name": "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline",
                 "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"]}
        for i, (tower, tokenizer) in enumerate(zip(self.text_encoders, self.tokenizers)):
            suffix = f"_{i + 1}" if i else ""
            files[f"text_encoder{suffix}"] = lambda p, t=tower: save_diffusers_folder(
                cast(t.state_dict()), clip_config_to_hf(t.config), p, "model.safetensors")
            files[f"tokenizer{suffix}"] = tokenizer.save
            index[f"text_encoder{suffix}"] = ["transformers", type(tower).__name__ if tower.config.projection_dim is None
                                                 else "CLIPTextModelWithProjection"]
            index[f"tokenizer{suffix}"] = ["transformers", "CLIPTokenizer"]
        if family == "sdxl":
            index["force_zeros_for_empty_prompt"] = self.config.zero_empty_negative
        else:
            index |= {"safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
        files["model_index.json"] = lambda p: save_json(index, p)
        write_folder(path, files, pipeline=True)


# --- loading -----------------------------------------------------------------------------------------------------------

def detect_family(state: dict[str, Tensor]) -> str:
    """sd1 / sd2 / sdxl from an original single file's keys (checkpoints.md §1 detection)."""
    if any(k.startswith("conditioner.embedders.1.model.") for k in state):
        return "sdxl"
    if any(k.startswith("cond_stage_model.model.") for k in state):
        return "sd2"
    if any(k.startswith("cond_stage_model.transformer.") for k in state):
        return "sd1"
    if any(k.startswith("conditioner.embedders.0.open_clip.") for k in state):
        raise ValueError("this is a Stable Video Diffusion file: use the SVD pipeline (sample.py --video)")
    raise ValueError("not a Stable Diffusion single file: no cond_stage_model. / conditioner.embedders. text encoder "
                     f"(first keys: {sorted(state)[:3]})")


def read_tokenizer(source: str | Path, family: str) -> list[CLIPTokenizer]:
    """The family's tokenizers (one per tower, each with its pad) from a vocab folder or an OpenCLIP BPE file."""
    source = Path(source)
    if source.is_file():
        base = CLIPTokenizer.from_bpe_file(source)
    elif (source / "tokenizer").is_dir():
        base = CLIPTokenizer.from_folder(source / "tokenizer")
    elif source.is_dir():
        base = CLIPTokenizer.from_folder(source)
    else:
        raise ValueError(f"tokenizer not found: {source} (a folder with vocab.json + merges.txt, or a BPE .txt.gz)")
    return [CLIPTokenizer(base.vocab, base.merges, pad) for pad in PADS[family]]


def _single_file(path: Path, tokenizer: str | Path | None, dtype: torch.dtype | None) -> StableDiffusion:
    state = read_state(path)
    meta = read_metadata(path)
    config = config_from_json(meta[METADATA_KEY]) if METADATA_KEY in meta else RELEASED[detect_family(state)]
    if tokenizer is None:
        if not (path.parent / "tokenizer").is_dir():
            raise ValueError(f"{path}: a single file carries no tokenizer (checkpoints.md §10): pass tokenizer= a folder "
                             "with vocab.json and merges.txt (e.g. an SD1.5 diffusers tokenizer/), or open_clip's "
                             "bpe_simple_vocab_16e6.txt.gz, or put a tokenizer/ folder beside the file")
        tokenizer = path.parent / "tokenizer"
    unet = load_unet(state, config.unet, dtype=dtype or torch.float32)
    vae = load_vae(state, config.vae, dtype=dtype or torch.float32)
    towers = [load_clip(state, c, prefix=ORIGINAL_PREFIXES[component], dtype=dtype or torch.float32)
              for c, component in zip(config.text, TEXT_COMPONENTS[config.family])]
    return StableDiffusion(config, unet, vae, towers, read_tokenizer(tokenizer, config.family))


def _diffusers_folder(folder: Path, dtype: torch.dtype | None) -> StableDiffusion:
    index = json.loads((folder / "model_index.json").read_text())
    name = index.get("_class_name", "")
    if name not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise ValueError(f"{folder}/model_index.json: {name!r} is not a Stable Diffusion (XL) pipeline")
    xl = name == "StableDiffusionXLPipeline"
    unet = load_unet(folder / "unet", dtype=dtype or torch.float32)
    vae = load_vae(folder / "vae", dtype=dtype or torch.float32)
    names = ("text_encoder", "text_encoder_2") if xl else ("text_encoder",)
    towers = [load_clip(folder / n, dtype=dtype or torch.float32) for n in names]
    family = "sdxl" if xl else ("sd2" if towers[0].config.hidden_size == 1024 else "sd1")
    tokenizers = [CLIPTokenizer.from_folder(folder / n.replace("text_encoder", "tokenizer")) for n in names]
    schedule = schedule_from_diffusers(json.loads((folder / "scheduler" / "scheduler_config.json").read_text()))
    config = SDConfig(family, unet.config, vae.config, tuple(t.config for t in towers), schedule,
                      zero_empty_negative=bool(index.get("force_zeros_for_empty_prompt", False)),
                      resolution=8 * json.loads((folder / "unet" / "config.json").read_text()).get("sample_size", 64))
    return StableDiffusion(config, unet, vae, towers, tokenizers)


def load_sd(source: str | Path, tokenizer: str | Path | None = None, *, dtype: torch.dtype | None = None,
            prediction_type: str = "") -> StableDiffusion:
    """A Stable Diffusion pipeline from an original single file (SD1.x, SD2.x, SDXL; detected) or a diffusers pipeline
    folder (model_index.json). `prediction_type` overrides the schedule's (SD2 single files cannot say: §1)."""
    source = Path(source)
    if source.is_dir():
        if not (source / "model_index.json").is_file():
            raise ValueError(f"{source}: a diffusers pipeline folder needs model_index.json")
        pipe = _diffusers_folder(source, dtype)
    elif source.is_file():
        pipe = _single_file(source, tokenizer, dtype)
    else:
        raise ValueError(f"pretrained model not found: {source}")
    if prediction_type:
        pipe.config = dataclasses.replace(pipe.config, schedule=dataclasses.replace(pipe.config.schedule,
                                                                                    prediction_type=prediction_type))
    return pipe.eval()


# --- text (+ control) to image -------------------------------------------------------------------------------------------

@torch.no_grad()
def text_to_image(pipe: StableDiffusion, prompts: list[str], negative_prompts: list[str] | None = None, *,
                  height: int, width: int, sampler: str, steps: int, guidance_scale: float,
                  generator: torch.Generator, noise: Tensor | None = None, controls: Sequence[Control] = (),
                  control_window: tuple[float, float] = (0.0, 1.0), clip_skip: int = 0, decode: bool = True) -> Tensor:
    """Prompts (+ controls: (controlled model around pipe.unet, condition (B, 3, H, W) in [0, 1], scale)) -> images
    (B, 3, H, W) in [-1, 1], or the latents.

    CFG over (negative, prompt) with the negative prompts ("" by default; SDXL's empty negative is zeros), the
    sampler in the k-diffusion view, then the VAE decode. `noise` (B, 4, H/8, W/8) fixes the initial latents;
    `control_window` the fraction of the trajectory the controls act on.
    """
    if height % 8 or width % 8:
        raise ValueError(f"height and width must be multiples of 8 (the VAE stride), got {height}x{width}")
    device = next(pipe.unet.parameters()).device
    negative_prompts = negative_prompts if negative_prompts is not None else [""] * len(prompts)
    context, pooled = pipe.encode_prompt(prompts, clip_skip)
    uncond, uncond_pooled = pipe.encode_prompt(negative_prompts, clip_skip, zero_empty=pipe.config.zero_empty_negative)
    y, uncond_y = pipe.vector(pooled, (height, width)), pipe.vector(uncond_pooled, (height, width))
    controls = [(model, image.to(device), scale) for model, image, scale in controls]
    y, uncond_y = (None, None) if y is None else (y.to(device), uncond_y.to(device))
    schedule = pipe.config.schedule
    denoiser = cfg_denoiser(pipe.unet, schedule, context, uncond, guidance_scale, controls, y=y, uncond_y=uncond_y)
    if controls and tuple(control_window) != (0.0, 1.0):
        plain = cfg_denoiser(pipe.unet, schedule, context, uncond, guidance_scale, (), y=y, uncond_y=uncond_y)
        denoiser = windowed(denoiser, plain, sigmas_for(schedule, sampler, steps), *control_window)
    shape = (len(prompts), pipe.config.unet.out_channels, height // 8, width // 8)
    latents = generate(denoiser, shape, pipe.config.schedule, sampler, steps, generator, device, noise=noise)
    return pipe.decode_latents(latents) if decode else latents
