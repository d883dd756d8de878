import sys

from rosa2.cli import main

sys.exit(main())
