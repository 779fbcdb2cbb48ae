"""``python -m ckpt.cli``: the ``ckpt`` command without the installed script."""

import sys

from . import main

sys.exit(main())
