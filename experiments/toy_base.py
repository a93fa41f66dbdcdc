"""The fill50k toy's base model: TOY UNet + toy text encoder trained on prompts only (no control).

Purpose: a frozen base for the control ablations, trained by this repo because no weights can be downloaded.
Command:  python train.py experiments/toy_base.py --num_threads=1 --progress=False
Then:     cp runs/toy_base-<time>/base_weights.safetensors experiments/weights/toy_base.safetensors   (the EMA weights)
Measure:  python train.py experiments/toy_base.py --base_weights=experiments/weights/toy_base.safetensors \
              --max_steps=0 --eval_count=64 --experiment=toy_base_eval       (the step-0 eval only)
Measured (2026-11-22, 2 shared CPU cores, 1 thread): 3000 steps in 1711 s (28.5 min), 1,887,584 parameters,
          7.6 MB. Held-out (64 examples, eval_seed 1, dpmpp_2m 10 steps, CFG 2): palette_error 0.096 (RMS distance of
          a pixel to the nearer prompt colour, [0, 1] RGB), circle_fraction 0.27 (data: 0.33), colour error vs the
          condition's disc 0.23 inside / 0.11 outside, IoU 0.275 against the held-out rings' discs = chance level.
          Samples are soft-edged blobs in the right colours, placed freely.
"""

from train import TrainConfig

config = TrainConfig(
    stage="base",
    experiment="toy_base",
    base_weights="",                 # from scratch
    max_steps=3000,
    batch_size=32,
    lr=1e-3,                         # small model from scratch: a large lr, warmed up
    warmup_steps=200,
    ema_decay=0.999,
    proportion_empty_prompts=0.1,    # so that classifier-free guidance works with the base and every control run
    eval_every=500,
    save_every=500,
    guidance_scale=2.0,
)
