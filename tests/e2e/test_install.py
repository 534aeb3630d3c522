"""An installed ramp: the wheel carries the Hydra configs and the Slurm template, and trains from any folder."""

from __future__ import annotations

import email
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, ramp_env, read_metrics

pytestmark = pytest.mark.slow

PIP = [sys.executable, "-m", "pip"]
WHERE = "import trainer, launch.submit as s; print(trainer.__file__, s.TEMPLATE.is_file())"
TORCHRUN = [
    sys.executable,
    "-m",
    "torch.distributed.run",
    "--standalone",
    "--nproc_per_node=2",
    "-m",
    "trainer.main",
]


def run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` to completion (at most 300 s) and return its stdout; fail with its output if it fails."""
    result = subprocess.run(
        cmd,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip wheel .`` builds from this checkout."""
    out = tmp_path_factory.mktemp("wheel")
    run([*PIP, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)])
    (built,) = out.glob("ramp-*.whl")
    return built


def test_the_wheel_carries_every_config_the_batch_template_and_the_license(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = {
        f"trainer/conf/{p.relative_to(REPO / 'conf').as_posix()}" for p in (REPO / "conf").rglob("*.yaml")
    }
    assert configs <= names, sorted(configs - names)
    launch_files = {f"launch/slurm/{p.name}" for p in (REPO / "launch" / "slurm").iterdir()}
    assert launch_files <= names, sorted(launch_files - names)
    assert "launch/slurm/ramp.sbatch" in names
    metadata_name = next(n for n in names if n.endswith(".dist-info/METADATA"))
    metadata = email.message_from_bytes(zipfile.ZipFile(wheel).read(metadata_name))
    assert metadata["License-Expression"] == "Apache-2.0"
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


def test_an_installed_ramp_trains_from_an_empty_folder(wheel: Path, tmp_path: Path, cache_dir: Path) -> None:
    site, empty = tmp_path / "site", tmp_path / "elsewhere"
    run([*PIP, "install", "--no-deps", "-q", "--target", str(site), str(wheel)])
    empty.mkdir()
    env = ramp_env(cache_dir) | {"PYTHONPATH": str(site)}  # the installed copy, not this checkout
    where = run([sys.executable, "-c", WHERE], cwd=empty, env=env)
    assert where.split() == [str(site / "trainer" / "__init__.py"), "True"]
    run(
        [
            *TORCHRUN,
            "train.max_steps=3",
            "train.log_every=1",
            "train.eval_every=0",
            "logger.wandb.mode=disabled",
        ],
        empty,
        env,
    )
    train, _ = read_metrics(empty / "outputs" / "gpt2-tiny")
    assert [r["step"] for r in train] == [1, 2, 3]
