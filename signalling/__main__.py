import sys

from signalling.cli import main

sys.exit(main())
