"""torchrun entry point of tests/test_video_train.py's FSDP test: train to step 2 (a sharded checkpoint), then, in
the same processes, resume from it to the config's max_steps; rank 0 writes both runs' losses as JSON to argv[2].

    torchrun --nproc_per_node=2 tests/fsdp_run.py '<TrainConfig as JSON>' losses.json
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch.distributed as dist

import train
from controlnext import cli
from controlnext.config import TrainConfig


def main() -> None:
    config = cli.from_dict(TrainConfig, json.loads(sys.argv[1]))
    dist.init_process_group("gloo")  # one group for both runs (train.main leaves a group it did not make)
    first = train.main(dataclasses.replace(config, max_steps=2))
    resume = Path(first["run"]) / "checkpoints" / "step_000002.pt"
    second = train.main(dataclasses.replace(config, resume=str(resume)))
    if dist.get_rank() == 0:
        Path(sys.argv[2]).write_text(json.dumps({"run": str(first["run"]), "first": first["losses"],
                                                 "second": second["losses"]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
