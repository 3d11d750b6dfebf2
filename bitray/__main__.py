import sys

from bitray.cli import main

sys.exit(main())
