"""The miniature SD1.5, stage 2 of 2: its UNet and text tower from scratch on the trained VAE, prompts only.

Purpose: the frozen base every control run starts from (see mini_sd15_vae.py). SD1.5's structure at CPU widths
(controlnext/sd_pipeline.py MINI_SD15), epsilon prediction on SD1.5's scaled-linear DDPM schedule, the fill50k CLIP
tokenizer; 10% empty prompts so classifier-free guidance works for the base and every control run; offset noise and
Min-SNR-5 weighting (schedulers/training.py), without which the prompt's colours are never learnt (see below).
Command:  python train.py experiments/mini_sd15_base.py --pretrained=runs/mini_sd15_vae-<time>/model.safetensors
Then:     cp runs/mini_sd15_base-<time>/model.safetensors experiments/weights/mini_sd15.safetensors
          cp -r runs/mini_sd15_base-<time>/tokenizer experiments/weights/
Expected: prompt colours right (low palette error), circle placement free: IoU against the held-out discs at chance.
"""

from controlnext.config import TrainConfig

config = TrainConfig(
    stage="base",
    experiment="mini_sd15_base",
    model="mini_sd15",
    pretrained="",                   # the vae stage's model.safetensors (command line)
    max_steps=3500,
    batch_size=32,
    lr=1e-3,                         # small model from scratch: a large lr, warmed up
    warmup_steps=200,
    ema_decay=0.999,
    proportion_empty_prompts=0.1,    # so that classifier-free guidance works with the base and every control run
    noise_offset=0.5,                # offset noise: with SD1.5's schedule (sqrt(abar_T) = 0.07) the flat colours of
                                     # fill50k leak through x_t's mean at every t, and without it the model never
                                     # learns colours from the prompt (palette error 0.36 at 1000 steps; 0.16 at 400
                                     # with it; experiments/README.md)
    snr_gamma=5.0,                   # Min-SNR-5 weighting: less weight on the low-noise steps, where the prompt
                                     # matters least
    eval_every=500,
    eval_count=64,
    save_every=500,
    guidance_scale=2.0,
)
