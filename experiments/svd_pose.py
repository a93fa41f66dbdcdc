"""ControlNeXt-SVD-v2 on pose videos: the official SVD-v2-Training recipe (../shared/reference/controlnext.md §4.3).

Purpose: fine-tune SVD-XT-1.1 with the G2 branch on pose-driven dance clips (reference frame + pose video -> video),
the whole UNet trained, as dvlab-research/ControlNeXt@ab4b3ac ControlNeXt-SVD-v2-Training/train_svd.py does.
Command:  torchrun --nproc_per_node=8 train.py experiments/svd_pose.py \
              --pretrained=<stable-video-diffusion-img2vid-xt-1-1 folder> --dataset=<meta_info.json>
          (8 GPUs x 1 clip, FSDP full shard, bf16, activation checkpointing: the 1.5B-parameter UNet with its
          gradients and AdamW states does not fit one 24-40 GB card; experiments/README.md "Low-memory SVD" measures
          the pieces). The official layout: meta_info.json = [{video_path, guide_path, meta_info}], frames and pose
          videos (or frame folders) with a per-video json of hand boxes and scores (controlnext/video_data.py).
          On CPU, the same recipe on the moving-disc toy at toy sizes (tests/test_video_train.py runs it):
          python train.py experiments/svd_pose.py --pretrained=<tiny SVD folder> --dataset=fill50k --fsdp=False \
              --video_width=64 --video_height=64 --num_frames=4 --mixed_precision=no --max_steps=20
Expected: the official run converges from about 3000 steps on ~6000 clips (issue #51); nothing here was run at full
size (no GPU was lent): the command above is the recipe, not a reported result.
"""

from controlnext.config import TrainConfig

config = TrainConfig(
    experiment="svd_pose",
    stage="control",
    ablation="cross_norm",
    trainable="all",                 # the whole UNet (1,524,623,082) + the G2 branch (3,526,400): official v2
    injection="svd_v2",              # after down_blocks[0], CN eps 1e-5 then pool, k = 0.2 * control_scale
    branch="g2",                     # the training file's stem padding (1, 1, 1)
    control_scale=1.0,
    eps_layout="sgm",                # SVD-XT's own numerics (the official code trained on diffusers' 1e-6: "diffusers")
    pretrained="",                   # an SVD-XT-1.1 diffusers folder or svd_xt_1_1.safetensors: on the command line
    dataset="",                      # meta_info.json (official layout) or a folder of clip folders
    num_frames=14,                   # script.sh (the README says 21)
    frame_interval=3,
    video_width=576,
    video_height=1024,
    video_buckets=(),                # official: one size; mixed sets: ((576, 1024), (1024, 576), (768, 768))
    fps_id=6,                        # the trainer's added ids
    motion_bucket_id=127,
    noise_aug=0.02,
    conditioning_dropout=0.1,
    max_steps=30000,
    batch_size=1,                    # per GPU, 8 GPUs
    lr=1e-5,                         # the same lr for the UNet and the branch (script.sh)
    control_lr=1e-5,
    warmup_steps=0,                  # "constant": the official 500 warmup steps are ignored
    weight_decay=1e-2,
    grad_clip=1.0,                   # DeepSpeed's gradient_clipping 1.0 (deepspeed.yaml)
    ema_decay=0.0,                   # the official EMA was stepped with the wrong parameters (§8 item 11)
    mixed_precision="bf16",
    gradient_checkpointing=True,
    fsdp=True,                       # ZeRO-2 in the official run; here full shard (parameters too)
    frame_chunk=0,                   # > 0 trades time for memory in the per-frame layers (exact)
    eval_every=500,                  # validation every 500 steps, 25 sampling steps, guidance 3
    eval_count=1,
    sampling_steps=25,
    guidance_scale=3.0,
    save_every=2000,                 # checkpointing_steps
)
