"""Train a model: `python train.py [--config PATH] [--data PATH ...] [--run_dir DIR] [--section.field=VALUE ...]`.

The same as `tinylm train ...`; with no arguments it trains the default recipe on the built-in corpus.
"""

import sys

from tinylm.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
