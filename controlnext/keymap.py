"""Data: key-map rows for the official ControlNeXt releases (dvlab-research/ControlNeXt@ab4b3ac).

Our control-branch names equal the official ones (controlnext/control_branch.py), so the plain files need no row:
SD1.5 `controlnet.safetensors` (G1-SD15, with `scale`), SD1.5-Training `controlnext.bin` (G2), SDXL
`controlnet.safetensors` (G2), SVD `finetune/controlnet.bin` (G1-SVD) and SVD-v2 `controlnet.bin` (G2).
The UNet files hold diffusers names (= ours), or, for SDXL files from kohya/SGM tools, `input_blocks.*` names that
unet/keymap.py maps. Only wrapped training states need rows (../shared/reference/controlnext.md §3, §6).
"""

# SVD-v2-Training after DeepSpeed zero_to_fp32: one `pytorch_model.bin` with `unet.` and `controlnext.` prefixes.
CONTROL_BRANCH_ROWS = [
    ("controlnext.", ""),  # the branch under its official names
    ("unet.", None),       # the UNet half is loaded separately
]
UNET_ROWS = [
    ("unet.", ""),
    ("controlnext.", None),
]
