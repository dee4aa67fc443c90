"""The pinned files of the extra environments (``requirements-deploy.txt``, ``requirements-label-server.txt``) pin the
packages of ``requirements.txt`` to the same versions: the bundle runs in each with the libraries it is tested with."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            name, sep, version = line.partition("==")
            assert sep, f"{path.name}: {line!r} is not an exact pin"
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


@pytest.mark.parametrize("name", ["requirements-deploy.txt", "requirements-label-server.txt"])
def test_extra_environments_pin_the_main_requirements(name: str) -> None:
    main, extra = _pins(REPO / "requirements.txt"), _pins(REPO / name)
    shared = {"torch", "monai", "pytorch-ignite", "numpy", "scipy", "nibabel", "simpleitk", "scikit-image", "fire",
              "jsonschema", "tqdm", "matplotlib", "pyyaml", "pytest"}
    assert shared <= main.keys()
    assert {package: extra.get(package) for package in shared} == {package: main[package] for package in shared}
