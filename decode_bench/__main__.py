import sys

from decode_bench.cli import main

sys.exit(main())
