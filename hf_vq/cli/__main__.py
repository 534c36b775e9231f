"""``python -m hf_vq.cli``: the ``hf-vq`` command."""

import sys

from hf_vq.cli import main

sys.exit(main())
