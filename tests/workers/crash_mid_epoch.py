"""Launched by torchrun from tests: a real training run (trainer.train.run) that, when asked, dies inside
epoch 2 the way a killed pod does (every rank stops at once, nothing is saved on the way out), or, with
"sigterm:STEP", rank 1 alone gets SIGTERM there, as when one node of a job is preempted."""
import json
import os
import signal
import sys

from trainer.config import config_from_dict
from trainer.distributed import setup
from trainer.train import Trainer, TrainingStopped, run

# "{rank}" in the folder gives each rank its own, as pods of a multi-node job on per-pod volumes have
out_dir = sys.argv[1].format(rank=os.environ.get("RANK", "0"))
sigterm = sys.argv[2].startswith("sigterm:")
crash_at, overrides = int(sys.argv[2].removeprefix("sigterm:")), json.loads(sys.argv[3])
settings = {
    "run": {"output_dir": out_dir, "progress": False, "epochs": 3, "checkpoint_every_steps": 3},
    "data": {"name": "synthetic", "synthetic_train_size": 256, "synthetic_image_size": 16, "batch_size": 16,
             "augment": "on"},
    "model": {"name": "small_cnn", "width": 8},
    "attack": {"steps": 2, "eps": 0.1},
    "eval": {"steps": 2, "every": 1},
}
for section, values in overrides.items():  # {"section": {"key": value}}: merged into that section
    settings.setdefault(section, {}).update(values)
cfg = config_from_dict(settings)
info = setup("gloo", timeout_seconds=cfg.dist.timeout_seconds)
if crash_at:
    train_step = Trainer.train_step

    def dying_train_step(self, x, y, epoch, step):
        if epoch == 2 and step == crash_at:
            if not sigterm:
                os._exit(17)  # a kill: no finally blocks, no checkpoint on the way out
            if info.rank == 1:
                signal.raise_signal(signal.SIGTERM)
        return train_step(self, x, y, epoch, step)

    Trainer.train_step = dying_train_step
try:
    run(cfg, info)
except TrainingStopped as exc:
    sys.stderr.write(f"rank {info.rank}: {exc}\n")  # one write: the other rank cannot cut in before the newline
    sys.exit(128 + exc.signum)
