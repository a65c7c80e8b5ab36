import sys

from disploss.commands.main import leave, main

sys.exit(leave(main()))
