import sys

from rlhf_fast.cli import main

sys.exit(main())
