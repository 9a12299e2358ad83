"""The README documents every config key, and every shipped config validates."""
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from trainer.config import Config, load_config, problems

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_every_config_key_is_in_the_readme():
    readme = (ROOT / "README.md").read_text()
    keys = [f"{section}.{key}" for section, values in asdict(Config()).items() for key in values]
    missing = [k for k in keys if f"`{k}`" not in readme]
    assert not missing, f"undocumented config keys: {missing}"


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_validate(path):
    world_size = 8 if "cifar10" in path.name else 2
    cfg = load_config(str(path), check_paths=False, world_size=world_size)
    assert problems(cfg, world_size=world_size, check_paths=False) == [] and cfg.run.epochs >= 10


def _as_value(text: str) -> object:
    """A README default as written: YAML, a fraction like 8/255, or a number YAML 1.1 reads as text (5e-4)."""
    if re.fullmatch(r"[0-9.]+/[0-9.]+", text):
        numerator, denominator = text.split("/")
        return float(numerator) / float(denominator)
    value = yaml.safe_load(text)
    if isinstance(value, str) and not text.startswith(('"', "'")):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def test_config_reference_defaults_are_the_code_defaults() -> None:
    """Each `| \\`section.key\\` [default] |` row of the README's configuration reference says the default
    trainer/config.py has."""
    defaults = Config().to_dict()
    table = "\n".join(line for line in README.read_text().splitlines() if line.startswith("| `"))
    rows = []
    for pair in re.findall(r"`(\w+)\.(\w+)` / `(\w+)\.(\w+)` \[(.*?) / (.*?)\]", table):  # `a` / `b` [x / y]
        rows += [(pair[0], pair[1], pair[4]), (pair[2], pair[3], pair[5])]
    table = re.sub(r"`\w+\.\w+` / `\w+\.\w+` \[.*? / .*?\]", "", table)
    rows += re.findall(r"`([a-z_]+)\.([a-z_]+)` \[(.*?)\](?= \|| /)", table)
    assert len(rows) >= 60
    wrong = []
    for section, key, written in rows:
        want, got = defaults[section][key], _as_value(written)
        same = (abs(float(got) - float(want)) <= 1e-9 * max(1.0, abs(float(want)))
                if isinstance(want, (int, float)) and not isinstance(want, bool) and isinstance(got, (int, float))
                else got == want or str(got) == str(want))
        if not same:
            wrong.append(f"{section}.{key}: README [{written}], code {want!r}")
    assert not wrong, wrong
