"""The reference's entry point: `python sample.py ODE --model SiT-XL/2 --image-size 256 --ckpt /path/to/model.pt`."""

import sys

from disploss.commands.main import leave, run_command

if __name__ == "__main__":
    sys.exit(leave(run_command("sample", sys.argv[1:])))
