"""docs/configuration.md shows the complete default configuration: it must parse to exactly the defaults
and name every setting."""

import dataclasses
import re
import tomllib
from pathlib import Path

from halflife.config import EVENT_TYPE_NAMES, Config, parse_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def documented() -> dict:
    return tomllib.loads(re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S).group(1))


def test_documented_defaults_are_the_built_in_defaults():
    assert parse_config(documented()) == Config()


def test_every_setting_is_documented():
    data = documented()
    assert set(data["event_types"]) == set(EVENT_TYPE_NAMES)
    defaults = Config()
    for section in dataclasses.fields(Config):
        if section.name == "event_types":
            continue
        fields = {f.name for f in dataclasses.fields(getattr(defaults, section.name))}
        assert set(data[section.name]) == fields, section.name
