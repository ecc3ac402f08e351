"""`python -m pipeline` with the training loader writing down which samples each rank loads,
for tests of what a resumed run consumed. Run as a script:

    RECORD_IDS_DIR=DIR torchrun ... tests/record_ids.py train --config ...

Every rank appends one JSON line per training batch to DIR/rank<N>.jsonl: {"epoch", "consumed"
(the epoch's position before the batch), "ids"}. The loader is the real PIL back end; the
subclass only writes down the indices it loads, so everything else (order, sharding, position,
checkpoints) is what users run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pipeline.data import factory
from pipeline.data.pil import PilLoader


class RecordingLoader(PilLoader):
    def _load(self, indices):
        out = Path(os.environ["RECORD_IDS_DIR"]) / f"rank{self.rank}.jsonl"
        for batch in super()._load(indices):
            if self.train:
                record = {"epoch": self.epoch, "consumed": self.consumed,
                          "ids": batch[2].tolist()}
                with out.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            yield batch


if __name__ == "__main__":
    factory.BACKENDS["torch"] = ("record_ids", "RecordingLoader")
    from pipeline.__main__ import main

    sys.exit(main(sys.argv[1:]))
