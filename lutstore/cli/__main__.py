import sys

from lutstore.cli.commands import main

sys.exit(main())
