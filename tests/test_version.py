"""`ti-guard --version` names the installed release (what a bug report and SECURITY.md ask for)."""

import importlib.metadata

import pytest

from ti_guard import cli


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"ti-guard {importlib.metadata.version('ti-guard')}"
