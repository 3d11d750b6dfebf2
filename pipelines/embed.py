"""Ray job entrypoint for the embedding pipeline: ``python pipelines/embed.py --config embed.yaml [flags]``.

Takes the same flags as ``bitray embed`` and does exactly what it does; all logic lives in ``bitray.embed``.
"""

import sys

from bitray.cli import main

if __name__ == "__main__":
    sys.exit(main(["embed", *sys.argv[1:]]))
