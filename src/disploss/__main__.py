import sys

from disploss.cli import main

sys.exit(main())
