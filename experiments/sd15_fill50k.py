"""ControlNeXt on SD1.5 with fill50k: the official SD1.5-Training recipe (../shared/reference/controlnext.md §4.1).

Purpose: reproduce "converges in about a thousand steps" (ControlNeXt-SD1.5-Training README) with our code.
Command:  python -m controlnext.data --out data/fill50k --count 50000 --size 512
          torchrun --nproc_per_node=4 train.py experiments/sd15_fill50k.py --base_weights=<SD1.5 UNet file>
Status:   dry-run only here (`python train.py experiments/sd15_fill50k.py --dry_run`): loading SD1.5 with its VAE and
          CLIP text encoder in train.py is a later issue; this file fixes the recipe's numbers until then.
Expected: held-out fill IoU >= 0.8 within ~1k steps at 4 GPUs x batch 6.
"""

from train import TrainConfig

config = TrainConfig(
    experiment="sd15_fill50k",
    stage="control",
    ablation="cross_norm",
    trainable="to_out",              # every attention to_out (24,805,760 UNet parameters), official SD1.5
    injection="sd15_train",          # after down_blocks[0], pool then cross-normalise, eps 1e-12
    branch="g2",                     # 3,526,400 parameters, 320 output channels
    control_scale=1.0,               # training k (the README samples at 0.35)
    unet="sd15",
    text_encoder="clip_l",           # CLIP ViT-L/14 text tower (encoders/clip.py): not wired into train.py yet
    base_weights="",                 # the SD1.5 UNet file
    latent_factor=8,                 # SD VAE stride
    schedule="sd15",                 # SD1.5's DDPM schedule (scaled_linear, epsilon, leading + 1)
    dataset="data/fill50k",          # written by `python -m controlnext.data`
    resolution=512,
    proportion_empty_prompts=0.0,    # official default
    empty_prompt="PBH",              # the official trainer's literal empty caption
    max_steps=8300,                  # 4 epochs of 50k at global batch 24
    batch_size=6,                    # per GPU, 4 GPUs
    lr=1e-5,                         # UNet to_out (README)
    control_lr=1e-4,                 # branch: 10x
    warmup_steps=0,                  # "constant" schedule: the official 500 warmup steps are ignored
    weight_decay=1e-2,
    grad_clip=0.0,                   # disabled in the official trainer
    ema_decay=0.0,
    mixed_precision="fp16",          # with fp32 master weights (the official code updates fp16 weights)
    gradient_checkpointing=True,
    eval_every=400,                  # the official increments are saved every 400 steps
    save_every=400,
    sampler="unipc",                 # official pipeline: UniPC, 20 steps
    sampling_steps=20,
    guidance_scale=7.5,
)
