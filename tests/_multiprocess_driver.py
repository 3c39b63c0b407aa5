"""Run several `align` commands in turn in each process of one multi-process launch (tests/test_multiprocess.py):
`accelerate launch ... tests/_multiprocess_driver.py PLAN.json`, PLAN a list of argv lists. One launch instead of one
per stage, because each launch spends most of its time importing torch, transformers and TRL in every process."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from alignment.cli import main  # noqa: E402

for argv in json.loads(Path(sys.argv[1]).read_text()):
    main(argv)
