"""Ray job entrypoint for fine-tuning: ``python pipelines/finetune.py --config finetune.yaml [flags]``.

Takes the same flags as ``bitray finetune`` and does exactly what it does; all logic lives in
``bitray.finetune``.
"""

import sys

from bitray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
