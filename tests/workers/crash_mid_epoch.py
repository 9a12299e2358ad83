"""Launched by torchrun from tests: a real training run (trainer.train.run) that, when asked, dies inside
epoch 2 the way a killed pod does (every rank stops at once, nothing is saved on the way out)."""
import json
import os
import sys

from trainer.config import config_from_dict
from trainer.distributed import setup
from trainer.train import Trainer, run

# "{rank}" in the folder gives each rank its own, as pods of a multi-node job on per-pod volumes have
out_dir = sys.argv[1].format(rank=os.environ.get("RANK", "0"))
crash_at, overrides = int(sys.argv[2]), json.loads(sys.argv[3])
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
            os._exit(17)  # a kill: no finally blocks, no checkpoint on the way out
        return train_step(self, x, y, epoch, step)

    Trainer.train_step = dying_train_step
run(cfg, info)
