import sys

from lpo.cli import main

sys.exit(main())
