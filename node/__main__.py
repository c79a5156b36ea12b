"""``python -m node``: the same as the ``pacsnode`` command."""

import sys

from node.cli import main

sys.exit(main())
