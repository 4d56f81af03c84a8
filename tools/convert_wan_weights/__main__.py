import sys

from tools.convert_wan_weights.cli import main

sys.exit(main())
