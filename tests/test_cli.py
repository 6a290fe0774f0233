"""The `loralib` command dispatches to its subcommands and refuses unknown ones."""
import subprocess
import sys

from loralib import cli


def test_unknown_command_is_refused(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    assert "download-model" in capsys.readouterr().out


def test_download_model_says_plainly_when_the_hub_is_unreachable(tmp_path, monkeypatch, capsys):
    from loralib.models import hub

    def offline(**kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(hub, "_snapshot_download", offline)
    assert cli.main(["download-model", "org/model", "--dest-root", str(tmp_path)]) == 1
    assert "hub is unreachable" in capsys.readouterr().err


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "loralib.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "commands:" in out.stdout
