"""Smoke run: ControlNeXt on the miniature SD1.5 at small batch, 20 steps on CPU in well under a minute. The first
thing to run.

Command:  python train.py experiments/tiny_smoke.py
Expected: a run folder under runs/tiny_smoke-<time>/ with config.json, log.txt, metrics.jsonl, plot.png,
          samples/step_000010.png and checkpoints/step_000020.{safetensors,pt}; the loss is finite.
tests/test_train.py builds on the same settings (with a random tiny checkpoint so it does not need the shipped one).
"""

from controlnext.config import TrainConfig

config = TrainConfig(
    experiment="tiny_smoke",
    ablation="cross_norm",
    max_steps=20,
    batch_size=4,
    warmup_steps=5,
    eval_every=10,
    eval_count=4,
    sampling_steps=4,
    log_every=5,
    save_every=10,
)
