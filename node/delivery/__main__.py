import sys

from node.delivery.cli import main

sys.exit(main())
