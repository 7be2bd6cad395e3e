import sys

from bench.intake.runner import main

sys.exit(main())
