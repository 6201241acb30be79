"""The console script's exit status and the script-mode import path."""
import subprocess
import sys
from pathlib import Path

import pytest

from sfd_fast import cli

ROOT = Path(__file__).resolve().parents[1]


def test_cli_returns_success_status(monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "noop", (lambda argv: "/some/path", "returns a value"))
    assert cli.main(["noop"]) == 0


def test_cli_unknown_command_is_usage_error():
    with pytest.raises(SystemExit) as e:
        cli.main(["no-such-command"])
    assert e.value.code == 2


def test_train_script_help_runs_as_a_script():
    out = subprocess.run([sys.executable, str(ROOT / "sfd_fast" / "train.py"), "--help"], capture_output=True,
                         text=True, cwd=str(ROOT / "configs"), timeout=120)
    assert out.returncode == 0 and "--config" in out.stdout


def test_sample_on_a_family_without_a_sampler_says_so(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"model": {"kind": "digits"}}))
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "--run", str(tmp_path)])
    assert e.value.code == 2   # a user error: status 2, the message on stderr and in the exception
    assert "'digits' run" in str(e.value) and "stable_diffusion" in str(e.value)
