"""The reference's entry point: `python sample.py ODE --model SiT-XL/2 --image-size 256 --ckpt /path/to/model.pt`."""

import sys

from disploss.commands.main import run_command

if __name__ == "__main__":
    sys.exit(run_command("sample", sys.argv[1:]))
