import sys

from erpo.cli import main

sys.exit(main())
