"""`ipadapter train` under accelerate's FSDP engine on the CPU: gloo, FSDP2 (fully_shard), any number of processes.

accelerate enables FSDP only on accelerators. This runner starts the process group itself (RANK, WORLD_SIZE and
a rendezvous file FSDP_RENDEZVOUS, or MASTER_ADDR/MASTER_PORT, from the environment; one process per rank) and then marks accelerate's state as FSDP, so the
suite drives the same wrapping, sharded optimizer, gathered checkpoints and validation that a multi-GPU FSDP run
does. FSDP_VERSION picks the version (default 2; FSDP1 on the CPU handles one process only), FSDP_POLICY the
auto-wrap policy (default transformer_based_wrap, per BasicTransformerBlock; size_based_wrap uses 2000 parameters).
FSDP_LATE_S makes every rank but 0 start that many seconds after the group forms (a slow machine).

    RANK=0 WORLD_SIZE=2 FSDP_RENDEZVOUS=/tmp/x python tests/fsdp_cpu.py train --base ... (`ipadapter train` arguments)
"""

from __future__ import annotations

import os
import sys
import time

import accelerate
import torch
import torch.distributed as dist
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

for key, value in {"RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
    os.environ.setdefault(key, value)
os.environ.update(LOCAL_RANK=os.environ["RANK"], ACCELERATE_USE_FSDP="true")
VERSION = int(os.environ.get("FSDP_VERSION", "2"))
# FSDP_RENDEZVOUS: a file path shared by the ranks (no port to race for); else MASTER_ADDR/MASTER_PORT
rendezvous = os.environ.get("FSDP_RENDEZVOUS")
dist.init_process_group("gloo", init_method=f"file://{rendezvous}" if rendezvous else None,
                        rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))  # fmt: skip
if dist.get_rank() > 0:
    time.sleep(float(os.environ.get("FSDP_LATE_S", "0")))
_init = accelerate.Accelerator.__init__


def _fsdp(self: accelerate.Accelerator, *args: object, **kwargs: object) -> None:
    policy = os.environ.get("FSDP_POLICY", "transformer_based_wrap")
    per_block = (
        {"transformer_cls_names_to_wrap": ["BasicTransformerBlock"]}
        if policy == "transformer_based_wrap"
        else {}
    )
    plugin = FullyShardedDataParallelPlugin(fsdp_version=VERSION, auto_wrap_policy=policy, min_num_params=2000,
                                            state_dict_type="FULL_STATE_DICT", **per_block)  # fmt: skip
    _init(self, *args, fsdp_plugin=plugin, **kwargs)
    for state in (self.state, PartialState()):
        state.distributed_type = DistributedType.FSDP
    self.state.fsdp_plugin = plugin


accelerate.Accelerator.__init__ = _fsdp
if VERSION == 1:  # FSDP1 names the CPU "cpu:0" when it checks the compute device against accelerate's "cpu"
    import torch.distributed.fsdp._init_utils as fsdp_init

    fsdp_init._get_compute_device = lambda *args, **kwargs: torch.device("cpu")

from ipadapter.cli import main  # noqa: E402

code = main(sys.argv[1:])
if dist.is_initialized():  # accelerate's end_training may have closed it already
    dist.destroy_process_group()
sys.exit(code)
