"""The reference's entry point: `torchrun --nnodes=1 --nproc_per_node=N sample_ddp.py ODE --model SiT-XL/2
--num-fid-samples 50000 --ckpt /path/to/model.pt`."""

import sys

from disploss.commands.main import leave, run_command

if __name__ == "__main__":
    sys.exit(leave(run_command("sample-ddp", sys.argv[1:])))
