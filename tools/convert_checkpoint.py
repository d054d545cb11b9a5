#!/usr/bin/env python
"""Convert checkpoints: the same as `popo convert ...` (see `--help`).

python tools/convert_checkpoint.py hf-to-mcore --hf HF_DIR --out CKPT_DIR --tp 2 --pp 2
python tools/convert_checkpoint.py mcore-to-hf --ckpt CKPT_DIR --out HF_DIR [--weights twin]
python tools/convert_checkpoint.py mcore-reshard --ckpt CKPT_DIR --out NEW_DIR --tp 1 --pp 1
torchrun --nproc-per-node 8 tools/convert_checkpoint.py hf-to-mcore ...   # 8 ranks share the work
"""

import sys

from popo_megatron.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
