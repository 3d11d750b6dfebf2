"""The top-level CLI: every pipeline's command is wired in, and help is fast (no TensorFlow import)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bitray.cli import main

COMMANDS = ("model", "embed", "demo", "finetune", "data", "submit", "jobs", "schedule")


def test_help_lists_every_command_without_importing_tensorflow():
    code = (
        "import sys; from bitray.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "print('tensorflow' in sys.modules, 'ray' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in COMMANDS:
        assert f"\n    {command} " in out
    assert out.strip().endswith("False False")


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: bitray" in capsys.readouterr().out


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(command):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
