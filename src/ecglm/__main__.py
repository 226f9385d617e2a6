"""``python -m ecglm``: the ``ecglm`` command."""

import sys

from ecglm.commands import main

sys.exit(main())
