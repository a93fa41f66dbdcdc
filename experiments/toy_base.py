"""The fill50k toy's base model: TOY UNet + toy text encoder trained on prompts only (no control).

Purpose: a frozen base for the control ablations, trained by this repo because no weights can be downloaded.
Command:  python train.py experiments/toy_base.py --num_threads=1
Then:     cp runs/toy_base-<time>/base_weights.safetensors experiments/weights/toy_base.safetensors
Expected: the prompt's two colours right on held-out prompts (palette_error small, circle_fraction near the data's),
          circle placed freely: IoU against the held-out condition discs at chance level.
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
