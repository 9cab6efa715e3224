import sys

from rsttrace.cli import main

sys.exit(main())
