"""The reference's entry point: `torchrun --nnodes=1 --nproc_per_node=N train.py --model SiT-XL/2 --data-path ... --disp`."""

import sys

from disploss.commands.main import leave, run_command

if __name__ == "__main__":
    sys.exit(leave(run_command("train", sys.argv[1:])))
