"""Config loading: YAML in, overrides on top, errors that name the file and the key."""

from __future__ import annotations

import pytest

from bitray.config import Section, StorageConfig, load_config
from bitray.errors import BitrayError


class Example(Section):
    name: str = "default"
    size: int = 224
    storage: StorageConfig = StorageConfig()


def test_defaults_file_and_overrides_in_that_order(tmp_path):
    assert load_config(Example).size == 224
    path = tmp_path / "c.yaml"
    path.write_text("name: from-file\nsize: 128\nstorage:\n  s3_endpoint: http://127.0.0.1:9000\n")
    config = load_config(Example, path, {"size": 64, "name": None})
    assert (config.name, config.size) == ("from-file", 64)
    assert config.storage.s3_endpoint == "http://127.0.0.1:9000"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("sise: 3\n", r"sise: unknown key"),
        ("size: big\n", r"size: .*integer"),
        ("storage:\n  s3_endpont: x\n", r"storage.s3_endpont: unknown key"),
        ("- a\n- b\n", r"must hold a mapping"),
        ("size: [1,\n", r"not valid YAML"),
    ],
)
def test_bad_files_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(BitrayError, match=message) as info:
        load_config(Example, path)
    assert str(path) in str(info.value)


def test_missing_file_says_which(tmp_path):
    with pytest.raises(BitrayError, match=r"nope.yaml does not exist"):
        load_config(Example, tmp_path / "nope.yaml")
