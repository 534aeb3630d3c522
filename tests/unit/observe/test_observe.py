"""Observability parts on their own: secret redaction, FLOPs per token and MFU, the schedule plot."""

from __future__ import annotations

import itertools
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from tests.helpers import REPO, transformers_lrs
from trainer.config import compose
from trainer.distributed import DistInfo
from trainer.observe import flops, job_log, setup_logging
from trainer.observe.redact import MASK, RedactFilter, redact, scrub, scrubbed_argv
from trainer.schedule_plot import key_points, main
from trainer.testing import run_distributed

# --- secrets -------------------------------------------------------------------------------------


def test_redact_masks_secret_keys_at_any_depth_and_scrubs_env_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", "wk-0123456789abcdef")
    monkeypatch.setenv("HOME_DIR_NAME", "not-a-secret-name")
    config: dict[str, Any] = {
        "model": {"extra": {"hub_token": "hf_config_value_123", "use_cache": False}},
        "db": {"password": "short", "Auth": {"user": "u"}},
        "run": {"name": "n", "note": "key wk-0123456789abcdef inside", "tags": ["wk-0123456789abcdef"]},
        "api_key": None,
        "other": "not-a-secret-name",
    }
    clean = redact(config)
    assert clean["model"]["extra"] == {"hub_token": MASK, "use_cache": False}
    assert clean["db"] == {"password": MASK, "Auth": MASK}
    assert clean["run"] == {"name": "n", "note": f"key {MASK} inside", "tags": [MASK]}
    assert clean["api_key"] is None  # nothing to hide
    assert clean["other"] == "not-a-secret-name"  # only secret-named variables are secrets
    assert config["model"]["extra"]["hub_token"] == "hf_config_value_123"  # a copy, the input untouched
    # A value seen under a secret key is scrubbed from free text from then on.
    assert scrub("pushing with hf_config_value_123 now") == f"pushing with {MASK} now"


def test_console_filter_and_argv_scrubbing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_env_secret_98765")
    record = logging.LogRecord(
        "ramp", logging.WARNING, __file__, 1, "token is %s", ("hf_env_secret_98765",), None
    )
    assert RedactFilter().filter(record)
    assert record.getMessage() == f"token is {MASK}"
    monkeypatch.setattr(sys, "argv", ["trainer.main", "+model.extra.hub_token=hf_env_secret_98765", "a=1"])
    original = sys.argv
    with scrubbed_argv():
        assert sys.argv == ["trainer.main", f"+model.extra.hub_token={MASK}", "a=1"]
    assert sys.argv is original


# --- FLOPs and MFU -------------------------------------------------------------------------------


def meta_model(arch: str, **kwargs: object) -> torch.nn.Module:
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kwargs))


def test_gpt2_124m_flops_follow_nanogpt_and_palm() -> None:
    model = meta_model("gpt2", vocab_size=50257, n_positions=1024)
    total = sum(p.numel() for p in model.parameters())
    assert total == 124_439_808  # GPT-2 small, tied head
    # nanoGPT's non-embedding count: everything but the position table (the tied table is the head).
    assert flops.matmul_parameters(model) == 124_439_808 - 1024 * 768
    # 6N + 12 L H Q T with L=12, H=12, Q=64, T=1024
    assert flops.flops_per_token(model, 1024) == 6 * 123_653_376 + 12 * 12 * 12 * 64 * 1024 == 855_166_464


def test_untied_llama_counts_the_head_but_not_the_lookup_table() -> None:
    model = meta_model(
        "llama",
        vocab_size=1000,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    total = sum(p.numel() for p in model.parameters())
    assert flops.matmul_parameters(model) == total - 1000 * 64
    # Per layer: q 64x64, k and v 64x32 (2 kv heads of 16), o 64x64, MLP 3 x 64x128, two norms of 64.
    layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64
    assert flops.matmul_parameters(model) == 2 * layer + 64 + 1000 * 64  # + final norm + head
    assert flops.flops_per_token(model, 256) == 6 * (2 * layer + 64 + 64_000) + 12 * 2 * 4 * 16 * 256


def test_peak_flops_table_and_override() -> None:
    # Every key is found by its own name: no earlier, shorter key shadows it.
    for key, peak in flops.PEAK_BF16_FLOPS.items():
        assert flops.peak_for_device_name(f"NVIDIA {key}") == peak, key
    assert flops.peak_for_device_name("NVIDIA A100-SXM4-80GB") == 312e12
    assert flops.peak_for_device_name("NVIDIA H100 80GB HBM3") == 989e12
    assert flops.peak_for_device_name("NVIDIA H100 PCIe") == 756e12
    assert flops.peak_for_device_name("NVIDIA H200") == 989e12
    assert flops.peak_for_device_name("NVIDIA H200 NVL") == 835e12
    assert flops.peak_for_device_name("NVIDIA H100 NVL") == 835e12
    assert flops.peak_for_device_name("NVIDIA B200") == 2.25e15
    assert flops.peak_for_device_name("AMD Instinct MI300X") == 1307.4e12
    assert flops.peak_for_device_name("NVIDIA L40S") == 362.05e12
    assert flops.peak_for_device_name("NVIDIA L40") is None  # the L40 is not the L40S
    assert flops.peak_for_device_name("Tesla V100-SXM2-16GB") is None
    assert flops.peak_flops(torch.device("cpu"), None) is None  # no MFU on a CPU unless told its peak
    assert flops.peak_flops(torch.device("cpu"), 2.5e12) == 2.5e12
    assert flops.mfu(1e9, 4e3, 1e13, 2) == pytest.approx(0.2)  # 4e12 FLOP/s of 2e13


def _vm_rss_gib() -> float:
    """The kernel's own count of this process's resident memory (/proc/self/status), in GiB."""
    line = next(
        line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmRSS:")
    )
    return int(line.split()[1]) * 1024 / 2**30


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_cpu_memory_is_the_process_rss_in_gib() -> None:
    assert flops.memory_gb(torch.device("cpu")) == pytest.approx(_vm_rss_gib(), rel=0.05)
    held = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    grown = flops.memory_gb(torch.device("cpu"))
    assert grown == pytest.approx(_vm_rss_gib(), rel=0.05)
    assert float(held.sum()) == 64 * 2**20 // 4


# --- the schedule plot ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "name", "warmup", "kwargs"),
    [
        (["schedule=cosine", "schedule.warmup_steps=30"], "cosine", 30, {}),
        (
            ["schedule=cosine_with_min_lr", "schedule.warmup_ratio=0.1", "schedule.min_lr_rate=0.1"],
            "cosine_with_min_lr",
            40,
            {"min_lr_rate": 0.1},
        ),
    ],
)
def test_schedule_plot_draws_the_transformers_curve(
    overrides: list[str], name: str, warmup: int, kwargs: dict[str, float], tmp_path: Path
) -> None:
    out = tmp_path / "lr.png"
    figure = main([*overrides, "train.max_steps=400", "--out", str(out)])
    (line,) = [line for line in figure.axes[0].lines if line.get_label() == "lr"]
    assert list(np.asarray(line.get_xdata())) == list(range(1, 401))
    expected = transformers_lrs(name, 6e-4, warmup, 400, **kwargs)
    assert list(np.asarray(line.get_ydata())) == pytest.approx(expected, rel=1e-12, abs=1e-18)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = key_points(compose([*overrides, "train.max_steps=400"]).lr_schedule)
    assert points.warmup_end == (warmup, pytest.approx(6e-4))
    assert points.peak == (warmup, pytest.approx(6e-4))
    assert points.end == (400, pytest.approx(expected[-1], abs=1e-18))


def test_schedule_plot_cli_prints_key_values_without_building_a_model(tmp_path: Path) -> None:
    """As a user runs it; afterwards not even torch has been imported, let alone a model or data."""
    code = (
        "import runpy, sys\n"
        "sys.argv = ['schedule_plot', 'schedule=warmup_stable_decay', 'train.max_steps=1000',"
        " 'schedule.warmup_steps=100', 'schedule.decay_ratio=0.2', 'schedule.min_lr_ratio=0.1']\n"
        "runpy.run_module('trainer.schedule_plot', run_name='__main__')\n"
        "heavy = [m for m in ('torch', 'transformers', 'trainer.models', 'trainer.data')"
        " if m in sys.modules]\n"
        "print('imported:', heavy)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "MPLBACKEND": "Agg"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "schedule warmup_stable_decay, 1000 steps, optim.lr=0.0006"
    assert lines[1].split() == ["warmup", "end", "step", "100", "lr", "6.0000e-04"]
    assert lines[2].split() == ["peak", "step", "100", "lr", "6.0000e-04"]
    assert lines[3].split() == ["end", "step", "1000", "lr", "6.0000e-05"]  # min_lr_ratio 0.1
    # 8 sequences of 256 tokens a step on 1 rank
    assert lines[4].split() == [
        "length",
        "step",
        "1,000",
        "=",
        "2,048,000",
        "tokens",
        "=",
        "8,000",
        "samples",
    ]
    assert lines[5].split() == ["warmup", "step", "100", "=", "204,800", "tokens", "=", "800", "samples"]
    assert lines[6].split() == [
        "decay",
        "after",
        "step",
        "800",
        "=",
        "1,638,400",
        "tokens",
        "=",
        "6,400",
        "samples",
    ]
    assert lines[7] == "batch stages on 1 rank"
    assert lines[9].split() == ["1", "0", "8", "2,048", "1"]
    assert lines[10] == "wrote lr_warmup_stable_decay.png"
    assert lines[11] == "imported: []"
    assert (tmp_path / "lr_warmup_stable_decay.png").stat().st_size > 10_000


def test_schedule_plot_with_a_batch_schedule_draws_both_axes_and_prints_the_stages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """2 ranks x 4 sequences of 64 tokens: 8 sequences a step, 16 from 2,048 tokens, 32 from 5,120."""
    out = tmp_path / "lr.png"
    overrides = ["train.seq_len=64", "train.micro_batch_size=4", "train.batch_schedule=0:8 2k:16 5k:32"]
    overrides += ["train.max_steps=40", "schedule=cosine", "schedule.warmup_tokens=1k"]
    figure = main([*overrides, "--world-size", "2", "--out", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    by_step, by_tokens = figure.axes
    batches = [8] * 4 + [16] * 3 + [32] * 33
    tokens = [64 * s for s in itertools.accumulate(batches)]
    schedule = compose(overrides).schedule_for(2)
    lrs = [schedule.lr(k) for k in range(1, 41)]
    for axes, xs in ((by_step, list(range(1, 41))), (by_tokens, tokens)):
        (line,) = [line for line in axes.lines if line.get_label() == "lr"]
        assert list(np.asarray(line.get_xdata())) == xs
        assert list(np.asarray(line.get_ydata())) == lrs
    marks = {
        axes.get_xlabel(): [
            float(np.asarray(line.get_xdata())[0]) for line in axes.lines if line.get_color() == "tab:orange"
        ]
        for axes in figure.axes
    }
    assert marks == {"global step (optimizer steps)": [5.0, 8.0], "tokens": [2048.0, 5120.0]}
    printed = capsys.readouterr().out.splitlines()
    assert printed[4].split() == ["length", "step", "40", "=", "72,704", "tokens", "=", "1,136", "samples"]
    assert printed[5].split() == ["warmup", "16", "samples", "=", "1,024", "tokens,", "in", "step", "2"]
    assert printed[7].startswith("batch stages on 2 ranks (train.batch_schedule")
    assert [line.split() for line in printed[9:12]] == [
        ["1", "0", "8", "512", "1"],
        ["5", "2,048", "16", "1,024", "2"],
        ["8", "5,120", "32", "2,048", "4"],
    ]


def test_schedule_plot_rejects_bad_input_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trainer.schedule_plot", "schedule.warmup_steps=500", "train.max_steps=100"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "schedule_plot: error: schedule.warmup_steps=500 exceeds the run's 100 steps (train.max_steps=100); "
        "lower it, lengthen the run or use schedule.warmup_ratio"
    ]
    assert not list(tmp_path.iterdir())


def test_only_whole_word_secret_names_are_masked() -> None:
    config = {
        "data": {"tokenizer": "my-org/tokenizer-v2", "eos_token": "<|endoftext|>"},
        "model": {"extra": {"hub_token": "hf_abcdefghijklmnop"}},
        "train": {"max_steps": 10},
    }
    masked = redact(config)
    assert masked["data"] == {"tokenizer": "my-org/tokenizer-v2", "eos_token": "<|endoftext|>"}
    assert masked["model"]["extra"]["hub_token"] == MASK
    assert "my-org/tokenizer-v2" in scrub("loading my-org/tokenizer-v2")
    assert scrub("token hf_abcdefghijklmnop") == f"token {MASK}"


SECRET = "hf_planted_rank_secret_77"


def _warn_from_every_rank(info: DistInfo) -> None:
    import warnings

    setup_logging(info.rank)
    if info.rank == 1:
        logging.getLogger("ramp").warning("rank 1 alone met this, with %s", SECRET)
    job_log.warning("every rank met this one alike")
    warnings.warn("a library warning every rank raises", UserWarning, stacklevel=1)
    sys.stderr.flush()


def test_each_event_is_printed_once_and_a_ranks_own_warning_tagged_and_scrubbed(
    capfd: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_TOKEN", SECRET)  # inherited by the ranks: a secret to scrub
    run_distributed(_warn_from_every_rank)
    err = capfd.readouterr().err
    assert SECRET not in err
    assert err.count("[rank 1] WARNING ramp: rank 1 alone met this, with ***") == 1
    assert err.count("every rank met this one alike") == 1
    assert "[rank 1] WARNING ramp.job" not in err
    assert err.count("UserWarning: a library warning every rank raises") == 1


# --- the metrics plot's LR curve -------------------------------------------------------------------


def test_the_plot_rebuilds_each_starts_schedule_and_draws_the_lr_at_every_step(tmp_path: Path) -> None:
    """A run shortened from 100 to 50 steps on resume at step 43: steps 1-43 at the 100-step curve, then
    44-50 at the 50-step one; the resume marked where it happened."""
    from trainer.plot import draw, schedule_lrs, starts

    (tmp_path / "config.yaml").write_text(yaml.safe_dump(compose(["train.max_steps=50"]).to_dict()))
    clock = {"world_size": 2, "samples_per_epoch": 10_000}
    records = [
        {"start": "fresh", "step": 0, "changed": {}, **clock},
        {"start": "changed", "step": 43, "changed": {"train.max_steps": [100, 50]}, **clock},
    ]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    history = starts(tmp_path)
    assert history[0]["config"]["train"]["max_steps"] == 100
    curve = schedule_lrs(history, 50)
    assert curve is not None
    long, short = (
        compose(["train.max_steps=100"]).schedule_for(2),
        compose(["train.max_steps=50"]).schedule_for(2),
    )
    assert curve[0] == list(range(1, 51))
    assert curve[1] == [long.lr(s) for s in range(1, 44)] + [short.lr(s) for s in range(44, 51)]
    figure = draw([{"step": 50, "loss": 2.0, "lr": short.lr(50)}], [], "run", curve, [(43, "changed")])
    marks = [line for axes in figure.axes for line in axes.lines if line.get_linestyle() == ":"]
    assert [float(np.asarray(line.get_xdata())[0]) for line in marks] == [43.0, 43.0]
    del history[1]["world_size"]  # a start of an older ramp: the logged LRs are drawn instead
    assert schedule_lrs(history, 50) is None
