"""`ipadapter train` under accelerate's DeepSpeed engine on the CPU: one process, gloo, DeepSpeed's CPU accelerator.

accelerate turns DeepSpeed on only off its CPU path, and the trainer takes that path when no GPU is visible. This
runner lets accelerate take the device path anyway (the device is still the CPU), so the test suite drives the same
DeepSpeed engine, ZeRO optimizer and checkpoint code that a GPU run does. Usage, with a free port in MASTER_PORT
and the DeepSpeed settings in accelerate's variables (ACCELERATE_DEEPSPEED_ZERO_STAGE or
ACCELERATE_DEEPSPEED_CONFIG_FILE):

    python tests/deepspeed_cpu.py train --base ... (the ordinary `ipadapter train` arguments)
"""

from __future__ import annotations

import os
import sys

import accelerate

os.environ.update(ACCELERATE_USE_DEEPSPEED="true", DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1",
                  LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")  # fmt: skip
_init = accelerate.Accelerator.__init__


def _device_path(self: accelerate.Accelerator, *args: object, **kwargs: object) -> None:
    kwargs["cpu"] = False
    _init(self, *args, **kwargs)


accelerate.Accelerator.__init__ = _device_path

from ipadapter.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
