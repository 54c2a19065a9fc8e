import sys

from torchfast.cli import main

sys.exit(main())
