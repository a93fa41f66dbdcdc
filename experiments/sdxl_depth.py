"""ControlNeXt on SDXL with a depth (or canny) dataset: the official SDXL-Training recipe (controlnext.md §4.2).

Purpose: the SDXL arm of the comparison on real weights: branch after conv_in, cross-attention output projections
(`attn2_to_out`, 102,483,200 UNet parameters) trained with the G2 branch, both text encoders, size/crop conditioning.
Command:  torchrun --nproc_per_node=4 train.py experiments/sdxl_depth.py \
              --pretrained=sd_xl_base_1.0.safetensors --tokenizer=<folder with vocab.json + merges.txt> \
              --dataset=<folder with metadata.jsonl: image, conditioning_image, text>
          (or --pretrained=<a diffusers stable-diffusion-xl-base-1.0 folder>, which carries its tokenizers)
Differences from the official script: AdamW instead of Adafactor (the official default; AdamW is its option), fp32
master weights under fp16 autocast (the official code keeps the trainable tensors in fp16).
Cost:     see README "Train on real weights" (memory and time per step).
Expected: the official README reports convergence starting around 2k steps and reached by 5k (issue #36).
"""

from controlnext.config import TrainConfig

config = TrainConfig(
    experiment="sdxl_depth",
    stage="control",
    ablation="cross_norm",
    trainable="attn2_to_out",        # `--unet_trainable_param_pattern .*attn2.*to_out.*`, the official default
    injection="sdxl",                # after conv_in, cross-normalise then pool, eps 1e-12
    branch="g2",
    control_scale=1.0,               # depth; the official canny recipe uses 0.35 (issue #36)
    pretrained="",                   # the SDXL base single file or diffusers folder: given on the command line
    dataset="",                      # the depth dataset folder: given on the command line
    resolution=1024,
    proportion_empty_prompts=0.2,    # the README's caption dropout
    empty_prompt="",
    max_steps=5000,
    batch_size=4,                    # per GPU (issue #36: 16 in the authors' runs)
    lr=1e-5,                         # UNet attn2 to_out
    control_lr=1e-4,                 # branch: 10x
    warmup_steps=500,                # constant_with_warmup
    grad_clip=1.0,
    ema_decay=0.0,
    mixed_precision="fp16",
    gradient_checkpointing=True,
    cache_latents=True,              # the official script precomputes the text embeddings (datasets.map)
    eval_every=500,
    save_every=500,
    sampler="unipc",                 # official validation: UniPC, 20 steps, guidance 5
    sampling_steps=20,
    guidance_scale=5.0,
)
