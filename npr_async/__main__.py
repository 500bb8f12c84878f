import sys

from npr_async.cli import main

sys.exit(main())
