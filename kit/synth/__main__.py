"""``python -m kit.synth ROOT [--scale S] ...``: write the embedded dataset (``kit.synth.dataset.main``)."""

import sys

from kit.synth.dataset import main

sys.exit(main())
