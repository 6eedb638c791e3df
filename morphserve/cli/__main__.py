import sys

from morphserve.cli.commands import main

sys.exit(main())
