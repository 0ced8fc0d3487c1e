import sys

from zoomvit.cli import main

sys.exit(main())
