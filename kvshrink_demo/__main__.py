import sys

from kvshrink_demo.demo import main

sys.exit(main())
