r"""``python -m ppl_vae``: the ``ppl-vae`` command line."""

import sys

from ppl_vae.cli import main

sys.exit(main())
