"""The ``simmerge`` command: sub-commands listed without importing them, each imported only when run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from simmerge_lib import cli
from simmerge_lib.paths import PROJECT_ROOT

HEAVY = ("torch", "sklearn", "optuna", "transformers", "pandas")


def _modules_after(args: list[str]) -> tuple[int, set[str], str]:
    code = (f"import sys\nfrom simmerge_lib import cli\ntry:\n    cli.main({args!r})\nexcept SystemExit:\n    pass\n"
            f"import json\nprint(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT,
                         env={"PYTHONPATH": str(PROJECT_ROOT), "PATH": "/usr/bin:/bin"})
    return res.returncode, set(json.loads(res.stdout.strip().splitlines()[-1])), res.stdout


def test_help_lists_every_command_without_importing_any():
    rc, loaded, out = _modules_after(["--help"])
    assert rc == 0 and not loaded & set(HEAVY), loaded & set(HEAVY)
    for name in cli.COMMANDS:
        assert name in out


def test_merge_imports_the_engine_only():
    rc, loaded, _ = _modules_after(["merge", "--help"])
    assert "torch" in loaded and not loaded & {"sklearn", "optuna", "transformers", "pandas"}


def test_the_table_matches_what_the_modules_register():
    parser = cli.build_parser()
    registered = next(a for a in parser._actions if a.dest == "command").choices
    assert list(registered) == list(cli.COMMANDS)
    for name, (_, text) in cli.COMMANDS.items():
        helps = {a.dest: a.help for a in next(a for a in parser._actions if a.dest == "command")._choices_actions}
        assert helps[name] == text, name


def test_unknown_command_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["frobnicate"])
    assert info.value.code == 2 and "invalid choice" in capsys.readouterr().err
