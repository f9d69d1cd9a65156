"""Train a one-shot mixed-precision supernet: ``python train.py [--config FILE] [section.key=value ...]``."""
from mpq.cli import main

raise SystemExit(main())
