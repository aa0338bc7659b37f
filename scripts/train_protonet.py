"""Prototypical Networks on Omniglot: scripts/train_metric.py with --algo protonet (defaults
60-way, 5 queries, Adam 1e-3 halved every 2000 episodes). Same arguments otherwise:

    python scripts/train_protonet.py --out runs/protonet_60w1s --shot 1 --minutes 30
    python scripts/train_protonet.py --out runs/protonet_60w1s --eval-only
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import train_metric  # noqa: E402

if __name__ == "__main__":
    train_metric.main(["--algo", "protonet"] + sys.argv[1:])
