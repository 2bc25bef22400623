"""``python -m vsem_lens.cli ...`` (what ``torchrun -m`` runs)."""

import sys

from .main import main

sys.exit(main())
