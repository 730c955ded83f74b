import sys

from gpuctl.main import main

sys.exit(main())
