"""trainer.evaluate's checks of its arguments, before anything is evaluated."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.errors import ConfigError
from trainer.evaluate import task_manager


def test_an_include_path_that_is_not_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as raised:
        task_manager(["ramp_tiny"], [tmp_path / "nope"])
    assert (
        str(raised.value)
        == f"--include-path {tmp_path / 'nope'} is not a folder; give a folder of lm-eval task YAMLs"
    )


def test_an_unknown_task_names_where_tasks_come_from() -> None:
    with pytest.raises(ConfigError) as raised:
        task_manager(["ramp_tinyy"], [])
    assert "(train.lm_eval_tasks takes only those two kinds)" in str(raised.value)
