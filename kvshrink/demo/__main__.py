import sys

from kvshrink.demo.demo import main

sys.exit(main())
