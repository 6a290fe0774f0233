"""The `loralib` command dispatches to its subcommands and refuses unknown ones."""
import subprocess
import sys

from loralib import cli


def test_unknown_command_is_refused(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_help_lists_commands(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in ("download-model", "compare", "plot"):
        assert f"  {name} " in out


def test_plot_and_compare_report_dispatch(tmp_path, capsys):
    # the subcommands' own tests are test_plot.py and test_report.py: here only that `loralib` reaches them
    assert cli.main(["plot", str(tmp_path / "missing")]) == 1
    assert "missing: no such folder" in capsys.readouterr().err
    assert cli.main(["compare", str(tmp_path), "--report", str(tmp_path)]) == 1
    assert "--report" in capsys.readouterr().err


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


def test_download_model_help_names_the_loralib_command(capsys):
    import pytest

    with pytest.raises(SystemExit):
        cli.main(["download-model", "--help"])
    assert capsys.readouterr().out.startswith("usage: loralib download-model")
