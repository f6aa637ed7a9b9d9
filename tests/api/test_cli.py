"""The `loraserve` command line: every config field is a documented flag, sizes parse."""
import argparse
import dataclasses
import subprocess
import sys

import pytest

from loraserve.cli import build_parser, config_from, parse_size
from loraserve.config import ServerConfig


@pytest.mark.parametrize("text, size", [("1073741824", 2**30), ("512MiB", 512 * 2**20), ("2GiB", 2 * 2**30),
                                        ("1.5g", 3 * 2**29), ("64 KiB", 64 * 1024)])
def test_sizes_parse(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "12XB", "-1GiB", "1e9"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


def test_flags_map_onto_every_config_field():
    args = build_parser().parse_args(["serve", "--port", "9000", "--kv-cache-memory", "256MiB",
                                      "--max-model-len", "512", "--served-model-name", "smol", "--dtype", "float16"])
    config = config_from(args)
    assert config == ServerConfig(port=9000, kv_cache_memory=256 * 2**20, max_model_len=512,
                                  served_model_name="smol", dtype="float16")
    assert config_from(build_parser().parse_args(["serve"])) == ServerConfig()


def test_every_flag_has_help():
    help_text = subprocess.run([sys.executable, "-m", "loraserve.cli", "serve", "--help"], capture_output=True,
                               text=True, check=True).stdout
    for field in dataclasses.fields(ServerConfig):
        assert "--" + field.name.replace("_", "-") in help_text
    assert "loraserve ready" in help_text


def test_unknown_choices_are_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--device", "tpu"])
