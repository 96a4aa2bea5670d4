"""Print pip constraints pinning every direct dependency of pyproject.toml to its floor (`name==lowest`): the core
dependencies and the `test` extra, with the extras it includes (`medtune[export]`).

.ci/run installs the project with them in a second environment and runs the quick tests there, so a floor that
admits a release lacking an API the code calls fails CI. Transitive dependencies are left to the resolver, as
`uv pip install --resolution lowest-direct` would. torch and torchvision are pinned to the versions of the running
environment instead (argv: their names): those come from this machine's disk, and any other release would be a
download of several GB. Needs Python 3.11+ (tomllib), as CI has.
"""

from __future__ import annotations

import sys
from importlib.metadata import version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement


def floors(pyproject: Path, from_environment: set[str]) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = [*project["dependencies"], *extra_requirements(project, "test")]
    pins: dict[str, str] = {}
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name in from_environment:
            pins[requirement.name] = version(requirement.name).split("+")[0]
            continue
        lowest = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==", "~=")]
        if not lowest:
            sys.exit(f"{requirement.name} has no floor in {pyproject}; give it one (>=)")
        pins[requirement.name] = lowest[0]
    return [f"{name}=={pin}" for name, pin in pins.items()]


def extra_requirements(project: dict, extra: str) -> list[str]:
    """The requirements of an optional extra, with the project's own extras it names (`medtune[export]`) expanded
    in place: those are direct dependencies too, and the project itself has no floor to pin."""
    expanded = []
    for line in project.get("optional-dependencies", {}).get(extra, []):
        requirement = Requirement(line)
        if requirement.name == project["name"]:
            expanded += [item for named in sorted(requirement.extras) for item in extra_requirements(project, named)]
        else:
            expanded.append(line)
    return expanded


if __name__ == "__main__":
    print("\n".join(floors(Path(__file__).resolve().parents[1] / "pyproject.toml", set(sys.argv[1:]))))
