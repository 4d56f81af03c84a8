import sys

from convert_wan_weights.cli import main

sys.exit(main())
