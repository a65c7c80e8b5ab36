import sys

from disploss.commands.main import main

sys.exit(main())
