"""The README documents every config key, and every shipped config validates."""
from dataclasses import asdict
from pathlib import Path

import pytest

from trainer.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_config_key_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    keys = [f"{section}.{key}" for section, values in asdict(Config()).items() for key in values]
    missing = [k for k in keys if f"`{k}`" not in readme]
    assert not missing, f"undocumented config keys: {missing}"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    cfg = load_config(str(path), check_paths=False, world_size=8 if "cifar10" in path.name else 2)
    assert cfg.run.epochs >= 1
