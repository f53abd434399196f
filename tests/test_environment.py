"""environment.yml (conda users) and pyproject.toml (pip / scripts/bootstrap.sh) describe one environment."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[; ]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pins(reqs):
    return {_name(r): r.replace(" ", "") for r in reqs}


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = list(project["dependencies"]) + list(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_pkgs = [d for d in env["dependencies"] if isinstance(d, str)]
    listed = [p for p in pip_block if not p.startswith("-e")]
    assert _pins(listed) == _pins(wanted), "environment.yml and pyproject.toml list different packages or pins"
    assert "-e ." in pip_block, "environment.yml must install devis_core itself"
    py = next(p for p in conda_pkgs if p.startswith("python"))
    assert py.split("=")[1] >= project["requires-python"].lstrip(">=")


def test_bootstrap_installs_the_pinned_torch():
    script = (ROOT / "scripts" / "bootstrap.sh").read_text()
    pins = _pins(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"])
    assert pins["torch"] in script and pins["torchvision"] in script
