"""The miniature SD1.5, stage 1 of 2: its VAE (our AutoencoderKL, 8x down, 4 latent channels) on procedural fill50k.

Purpose: the main job (`python train.py --ablation zero_conv`) runs the code path real SD1.5 runs, on a model small
enough to train and ship here (no weights can be downloaded): VAE -> latents -> eps-prediction UNet on SD1.5's
schedule -> CLIP-style text tower. This stage trains the autoencoder with L1 + 1e-6 KL (LDM's weight; the LPIPS and
patch-GAN terms are left out: they need a downloaded VGG, and flat colours with one edge do not need them), then sets
the latent scale to 1/std of its latents (LDM scale_by_std).
Command:  python train.py experiments/mini_sd15_vae.py
Then:     python train.py experiments/mini_sd15_base.py --pretrained=runs/mini_sd15_vae-<time>/model.safetensors
Expected: held-out reconstruction PSNR well above 30 dB, IoU of the reconstructed disc ~1 (experiments/README.md has
          the measured numbers and times).
"""

from controlnext.config import TrainConfig

config = TrainConfig(
    stage="vae",
    experiment="mini_sd15_vae",
    model="mini_sd15",               # controlnext/sd_pipeline.py MINI_SD15
    pretrained="",                   # from scratch
    max_steps=3000,
    batch_size=16,                   # as fast per step as 32 here (measured over 200 steps), half the cost
    lr=1e-3,                         # a small conv net from scratch: a large lr, warmed up, clipped
    warmup_steps=100,
    ema_decay=0.999,
    kl_weight=1e-6,
    eval_every=500,
    eval_count=64,
    save_every=500,
)
