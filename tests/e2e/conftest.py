"""Fixtures of the end-to-end tests: a real Slurm cluster on localhost, shared by every test that submits."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.helpers import REPO, free_port, missing

CLUSTER_UP = REPO / "launch" / "slurm" / "local_cluster_up.sh"
CLUSTER_DOWN = REPO / "launch" / "slurm" / "local_cluster_down.sh"


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real one-node Slurm cluster on localhost, started (and installed, if need be) for this
    session on free ports, and stopped at its end."""
    folder = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "RAMP_SLURM_DIR": str(folder), "RAMP_SLURM_PORT": str(free_port(span=2))}
    try:
        up = subprocess.run(
            ["bash", str(CLUSTER_UP)], env=env, capture_output=True, text=True, timeout=300, check=False
        )
        if up.returncode == 3:
            missing(f"a local Slurm cluster ({up.stderr.strip()})")
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"SLURM_CONF": str(folder / "etc" / "slurm.conf")}
    finally:
        down = subprocess.run(
            ["bash", str(CLUSTER_DOWN)], env=env, capture_output=True, text=True, timeout=120, check=False
        )
        assert down.returncode == 0, down.stdout + down.stderr
