"""``python -m pacsnode.node``: the same as the ``pacsnode`` command."""

import sys

from pacsnode.node.cli import main

sys.exit(main())
