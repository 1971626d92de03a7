"""``python -m dpf_ext``: the ``dpf-train`` command."""

import sys

from .app.cli import main

sys.exit(main())
