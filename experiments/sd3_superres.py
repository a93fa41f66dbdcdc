"""ControlNeXt-SD3 for 4x super-resolution (issue 19): the use case the authors trained on SD3 and never released.

Purpose: the condition is the target itself at 1/4 resolution (area downsample), brought back to full size (bicubic),
injected at control level 1 (the authors' setting for dense controls); on procedural fill50k the model must turn a
blurred disc into the sharp one. The evaluation logs `psnr` (samples vs targets) next to `psnr_input` (the bicubic
input vs targets: what super-resolution has to beat; 25.8 dB at 4x on the 32 held-out 64 px examples).
Command:  torchrun --nproc_per_node=4 train.py experiments/sd3_superres.py \
              --pretrained=sd3_medium_incl_clips_t5xxlfp16.safetensors --tokenizer=<SD3 diffusers tokenizer/> \
              --t5_tokenizer=<SD3 diffusers tokenizer_3/>         (or --pretrained=<a diffusers SD3 folder>)
          add --use_t5=False to train T5-less (9.5 GB less; SD3 allows it, the context is then zeros there)
          sample: python sample.py --pretrained=<same> --control=runs/<run>/checkpoints/step_004000_ema.safetensors \
              --control_image=<low-res image> --sampler=euler --steps=28 --guidance_scale=5 --prompt="..."
CPU smoke (any machine, a minute): a random tiny SD3 written by our exporter, then the same recipe at toy size:
          python -c "import torch; from controlnext.sd3_pipeline import StableDiffusion3, TINY_SD3; \
              from controlnext.data import fill50k_tokenizer; \
              StableDiffusion3.random(TINY_SD3, fill50k_tokenizer()).save('runs/tiny_sd3.safetensors')"
          python train.py experiments/sd3_superres.py --pretrained=runs/tiny_sd3.safetensors --resolution=64 \
              --batch_size=8 --max_steps=300 --mixed_precision=no --gradient_checkpointing=False --lr=3e-4 \
              --control_lr=3e-3 --eval_every=100 --eval_count=8 --sampling_steps=10
Expected: not run at full size here (no GPU was lent to the task that wrote it). On a random tiny SD3 the path
runs but learns nothing: a random VAE's decoder does not invert its encoder (experiments/README.md). The branch (G2, 3.5M) + patch embedding (2.0M) + every image-stream attention output of
the MMDiT (56.7M) train: 62.2M of 2,033.8M parameters (experiments/table1_params.py).
"""

from controlnext.config import TrainConfig

config = TrainConfig(
    experiment="sd3_superres",
    stage="control",
    ablation="cross_norm",
    control_source="super_resolution",  # the target downsampled and upsampled back is the condition
    sr_factor=4,
    control_scale=1.0,               # control level 1 for dense controls (the authors' note)
    trainable="to_out",              # every image-stream attention output of the MMDiT (the SD3 recipe)
    injection="sd3",                 # after joint block 0, official CN form on the image tokens, eps 1e-5
    branch="g2",                     # 3,526,400 parameters, 320 output channels at the latent grid
    pretrained="",                   # the SD3 single file or diffusers folder: given on the command line
    dataset="fill50k",               # procedural: the targets are the super-resolution pairs
    resolution=512,
    max_steps=4000,
    batch_size=4,                    # per GPU
    lr=1e-5,                         # MMDiT to_out, as the official SD1.5 recipe's UNet lr
    control_lr=1e-4,                 # branch: 10x
    warmup_steps=100,
    weight_decay=1e-2,
    grad_clip=1.0,
    ema_decay=0.999,
    mixed_precision="bf16",          # autocast; fp32 master weights
    gradient_checkpointing=True,
    eval_every=500,
    eval_count=16,
    save_every=500,
    sampler="euler",                 # SD3's default: flow Euler, 28 steps
    sampling_steps=28,
    guidance_scale=5.0,
)
