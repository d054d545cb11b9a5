import sys

from popo_megatron.cli import main

sys.exit(main())
