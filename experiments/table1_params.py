"""Table 1 of ControlNeXt (arXiv 2408.06070): total and learnable parameters, computed on the meta device.

Question: which branch and UNet selection reproduce the paper's parameter counts, and what do the released code
paths give? Command: `python experiments/table1_params.py` (a few seconds on CPU; no weights).
Expected: every reconciled row within 0.5M of the paper (../shared/reference/controlnext.md §7): SD1.5 865/30 from
G1-SD15 + all `to_out`; SDXL 2573/108 from a G1-size branch + attn2 `to_out`; SVD 1530/55 from G1-SVD + all
`to_out`; ControlNet 1220/361 and 3818/1251. The SVD ControlNet figure (2206/682) is not reconciled: ours copies
the SVD encoder half (conv_in, time/add embeddings, down blocks, mid) and adds ControlNet's hint encoder and zero
convs, and lands on 2206.6 / 682.0, i.e. the paper's figure truncated like its other rows. The SD3 rows are ours
(the paper gives none): SD3-medium's MMDiT is 2,028,328,000 parameters (its 56.6M-entry position table is a buffer).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlnext.control_branch import G1_SD15, G1_SVD, G2, ControlNeXt  # noqa: E402
from controlnext.controlnet import ENCODER_PREFIXES, ControlNet, ControlNetConfig, HintEncoder  # noqa: E402
from controlnext.controlnext import SD3 as SD3_INJECTION  # noqa: E402
from controlnext.sd3_controlnet import SD3ControlNet, SD3ControlNetConfig  # noqa: E402
from controlnext.sd3_controlnext import ControlNeXtMMDiT  # noqa: E402
from controlnext.selection import count_selected  # noqa: E402
from mmdit.mmdit import SD3_MEDIUM, MMDiT  # noqa: E402
from unet.sd_unet import SD15, SDXL, UNet, encoder_decoder_plan  # noqa: E402
from unet.svd_unet import SVD_XT, SVDUNet  # noqa: E402

M = 1e6
# (model, method) -> paper's (total, learnable) in millions; None where the paper gives no learnable figure.
PAPER = {
    ("SD1.5", "base"): (859, None), ("SD1.5", "ControlNet"): (1220, 361), ("SD1.5", "ControlNeXt"): (865, 30),
    ("SDXL", "base"): (2567, None), ("SDXL", "ControlNet"): (3818, 1251), ("SDXL", "ControlNeXt"): (2573, 108),
    ("SVD", "base"): (1524, None), ("SVD", "ControlNet"): (2206, 682), ("SVD", "ControlNeXt-S"): (1530, 55),
    ("SVD", "ControlNeXt-F"): (1530, 1530),
}


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def svd_controlnet_count(unet: nn.Module) -> int:
    """Encoder half of the SVD UNet + ControlNet's hint encoder (to C0) + one zero conv per skip and the mid."""
    encoder = sum(p.numel() for n, p in unet.named_parameters() if n.startswith(ENCODER_PREFIXES))
    channels = unet.config.channels
    zero_convs = sum(w * w + w for w in encoder_decoder_plan(unet.config).skips + [channels[-1]])
    return encoder + count(HintEncoder(3, ControlNetConfig().hint_channels, channels[0])) + zero_convs


def table1() -> list[tuple[str, str, str, float, float, tuple[int, int | None] | None]]:
    """Rows (model, method, how, total M, learnable M, paper figures or None for rows outside the paper)."""
    with torch.device("meta"):
        g2, g1_sd15, g1_svd = (count(ControlNeXt(c)) for c in (G2, G1_SD15, G1_SVD))
        rows = []
        for name, cfg, g1, selection in (("SD1.5", SD15, g1_sd15, "to_out"), ("SDXL", SDXL, g1_sd15, "attn2_to_out")):
            unet = UNet(cfg)
            base, sel, cn = count(unet), count_selected(unet, selection), count(ControlNet(ControlNetConfig(cfg)))
            rows += [(name, "base", "UNet", base, base, PAPER[name, "base"]),
                     (name, "ControlNet", "UNet + ControlNet (all learnable)", base + cn, cn, PAPER[name, "ControlNet"]),
                     (name, "ControlNeXt", f"G1-SD15 + {selection}", base + g1, g1 + sel, PAPER[name, "ControlNeXt"]),
                     (name, "ControlNeXt", f"G2 + {selection} (released code)", base + g2, g2 + sel, None)]
        unet = SVDUNet(SVD_XT)
        base, sel, cn = count(unet), count_selected(unet, "to_out"), svd_controlnet_count(unet)
        rows += [("SVD", "base", "UNet", base, base, PAPER["SVD", "base"]),
                 ("SVD", "ControlNet", "UNet + encoder copy + hint + zero convs", base + cn, cn,
                  PAPER["SVD", "ControlNet"]),
                 ("SVD", "ControlNeXt-S", "G1-SVD + to_out", base + g1_svd, g1_svd + sel,
                  PAPER["SVD", "ControlNeXt-S"]),
                 ("SVD", "ControlNeXt-F", "G1-SVD + all", base + g1_svd, base + g1_svd, PAPER["SVD", "ControlNeXt-F"]),
                 ("SVD", "ControlNeXt-F", "G2 + all (v2 released code)", base + g2, base + g2, None)]
        # SD3 (ours, issue 19; not in the paper): SD3-medium's MMDiT, the ControlNet copying its first 12 of 24 blocks
        # (controlnext/sd3_controlnext.py: depth / 2), ControlNeXt-SD3 = G2 + the patch embedding to the 1536-wide
        # tokens, trained with every image-stream attention output (`to_out`, the SD3 recipe)
        mmdit = MMDiT(SD3_MEDIUM)
        base, sel = count(mmdit), count_selected(mmdit, "to_out")
        cn = count(SD3ControlNet(SD3ControlNetConfig(SD3_MEDIUM, SD3_MEDIUM.depth // 2)))
        branch = sum(p.numel() for p in ControlNeXtMMDiT(mmdit, G2, SD3_INJECTION).control_parameters().values())
        rows += [("SD3", "base", "MMDiT (SD3-medium)", base, base, None),
                 ("SD3", "ControlNet", "MMDiT + 12-block copy (all learnable)", base + cn, cn, None),
                 ("SD3", "ControlNeXt", "G2 + patch embedding + to_out", base + branch, branch + sel, None)]
    return [(m, meth, how, total / M, learn / M, paper) for m, meth, how, total, learn, paper in rows]


def main() -> None:
    print(f"{'model':6} {'method':14} {'ours total/learnable (M)':>25} {'paper':>12}  how")
    for model, method, how, total, learnable, paper in table1():
        ours = f"{total:9.2f} / {learnable:8.2f}"
        ref = "" if paper is None else f"{paper[0]} / {paper[1] if paper[1] is not None else '-'}"
        print(f"{model:6} {method:14} {ours:>25} {ref:>12}  {how}")


if __name__ == "__main__":
    main()
