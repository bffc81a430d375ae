import sys

from kvshrink.decode_bench.cli import main

sys.exit(main())
