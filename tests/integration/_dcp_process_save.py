"""``dcp.async_save`` in DCP's process mode through ``ckpt.dcp.Writer`` and the shared-memory
host stager, as a script: DCP's checkpoint process is a child of the saving process, which
therefore cannot be a daemon (as the test harness's ranks are).

    python -m tests.integration._dcp_process_save RUN STORE_FILE
"""

from __future__ import annotations

import datetime
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

import ckpt
import ckpt.dcp


def main(run: str, store: str) -> None:
    warnings.filterwarnings("ignore")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")  # the checkpoint process's rendezvous: loopback
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, 1), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    from tests.integration.test_dcp_bridge import Block, _state, _trained

    torch.manual_seed(0)
    model = Block()
    state = _state(model, _trained(model))
    stager = ckpt.dcp.HostStager(4 << 20, shared_memory=True)
    for step in (2, 4):  # the second save reuses the checkpoint process and the slab
        dcp.async_save(state, storage_writer=ckpt.dcp.Writer(run, step=step), async_stager=stager,
                       async_checkpointer_type=AsyncCheckpointerType.PROCESS).result()
    stager.close()
    assert stager.pool.allocations == 1, stager.pool.allocations
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
