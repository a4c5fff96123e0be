"""``python -m kvfast.cli``: the ``kvfast`` command."""
import sys

from kvfast.cli import main

sys.exit(main())
