"""The `meddinov3` command's delegated subcommands are wired to their library entry points."""

from __future__ import annotations

import pytest

from meddinov3_hf.cli import main


@pytest.mark.parametrize(
    "command,expected",
    [
        ("finetune", "--dataset"),
        ("pretrain", "KEY=VALUE"),
        ("build-ct3m", "NAME=FOLDER"),
        ("convert", "--blocks"),
    ],
)
def test_subcommand_help(command, expected, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert expected in capsys.readouterr().out


def test_errors_exit_non_zero_with_a_message(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "missing.pth"), str(tmp_path / "out")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
