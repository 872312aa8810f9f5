"""environment.yml (conda) lists exactly the dependencies of pyproject.toml (runtime + dev extras)."""

from __future__ import annotations

import tomllib

import yaml
from packaging.requirements import Requirement

from simmerge_lib.paths import PROJECT_ROOT


def _normalised(requirements):
    return {(r.name.lower().replace("_", "-"), str(r.specifier)) for r in map(Requirement, requirements)}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["dev"]
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert _normalised(pip_section) == _normalised(wanted)
    assert any(str(d).startswith("python=3.1") for d in env["dependencies"])


def test_torch_is_pinned_everywhere():
    # Any looser pin pulls several GB of CUDA wheels on a CPU machine.
    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    assert "torch==2.13.0" in project["dependencies"]
    assert "torch==2.13.0" in (PROJECT_ROOT / "Makefile").read_text()
