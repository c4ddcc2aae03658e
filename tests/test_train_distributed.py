"""`lynx train` as real processes: killed with SIGKILL and resumed bit for bit; two CPU processes under torchrun
(FSDP2 over gloo) make the same steps as one process accumulating the same packs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lynx.testing import adapter_files
from lynx.training.config import load_training_config
from lynx.training.data import prepare
from lynx.training.synthetic import make_dataset
from lynx.training.trainer import read_metrics, train

# Spawned processes get one thread each, like torchrun gives them; the in-process runs they are compared with too.
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))


pytestmark = pytest.mark.usefixtures("one_thread")


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + "}"
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


def write_config(path: Path, sections: dict) -> Path:
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def config_file(tiny_base, tmp_path_factory):
    """Images and 5-frame clips mixed in packs, prepared with the tiny base's own VAE and text encoder."""
    root = tmp_path_factory.mktemp("dist")
    ds = make_dataset(root / "data", identities=3, images_per_identity=2, videos_per_identity=1, video_frames=9,
                      bad_samples=False)
    sections = {
        "data": {"manifest": str(ds.manifest), "cache_dir": str(root / "cache"), "buckets": [[64, 64], [48, 80]],
                 "frames": [1, 5], "cache_dtype": "fp32", "dtype": "fp32", "device": "cpu"},
        "train": {"base": str(tiny_base), "output_dir": str(root / "out"), "steps": 3, "learning_rate": 1e-3,
                  "warmup_steps": 2, "token_budget": 64, "precision": "fp32", "num_workers": 0, "save_every": 100,
                  "drop_text": 0.2, "drop_identity": 0.2, "drop_reference": 0.2,
                  "resampler": {"dim": 32, "depth": 1, "heads": 2, "dim_head": 16, "num_queries": 4}},
        "validation": {"every": 0},
    }
    path = write_config(root / "config.toml", sections)
    prepare(load_training_config(path), identity_fn=ds.identity_fn, progress=False)
    return path


def lynx(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "lynx", *args], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, **kw)


def test_killed_training_resumes_with_the_same_losses(config_file, tmp_path):
    steps = 40
    overrides = [f"train.steps={steps}", "train.save_every=3", "train.num_workers=1", "train.keep_last=2"]
    reference = train(load_training_config(config_file, overrides + [f'train.output_dir="{tmp_path / "ref"}"']),
                      progress=False)
    out = tmp_path / "run"
    args = ["train", "--config", str(config_file), "--no-progress", "--set", f'train.output_dir="{out}"']
    for o in overrides:
        args += ["--set", o]
    proc = lynx(*args)
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.csv"
        rows = metrics.read_text().splitlines() if metrics.is_file() else []
        if len(rows) >= 8:  # header + 7 steps: a checkpoint at 6 exists, the run is mid-way
            proc.send_signal(signal.SIGKILL)
            killed_at = len(rows) - 1
            break
        time.sleep(0.01)
    proc.wait()
    output = proc.stdout.read()
    assert killed_at is not None, f"training ended before it could be killed:\n{output[-2000:]}"
    assert killed_at < steps
    latest = (out / "checkpoints" / "latest").read_text().strip()
    resumed_from = int(latest.split("-")[1])
    assert 6 <= resumed_from < steps

    proc = lynx(*args, "--resume")
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
    losses = [r["loss"] for r in read_metrics(out)]
    assert losses == reference.losses  # every step, before and after the kill, bit for bit
    a, b = (adapter_files(d) for d in (reference.final_dir, out / "final"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_processes_make_the_same_steps_as_one(config_file, tmp_path):
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "lynx", "train", "--config", str(config_file), "--no-progress",
           "--set", f'train.output_dir="{two}"']
    # A sample video at the end: under FSDP every rank samples (the gathers are collectives), rank 0 writes.
    for o in ("validation.every=3", "validation.height=32", "validation.width=32", "validation.num_frames=1",
              "validation.num_inference_steps=2", 'validation.format=".gif"'):
        cmd += ["--set", o]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    # One process reads both ranks' packs of each step as two accumulation micro-steps.
    one = train(load_training_config(config_file, [f'train.output_dir="{tmp_path / "one"}"', "train.grad_accum=2"]),
                progress=False)
    rows = read_metrics(two)
    print("grad norms (1 process, 2 processes):", [r["grad_norm"] for r in read_metrics(tmp_path / "one")],
          [r["grad_norm"] for r in rows])
    assert len(rows) == 3 and rows[0]["samples"] > 2
    assert max(r["grad_norm"] for r in rows) > 1.0  # clipping (train.max_grad_norm = 1) is part of what is equal
    assert [r["loss"] for r in rows] == pytest.approx(one.losses, rel=1e-6)
    # Bit for bit: one numeric path (FSDP2 at both world sizes, gradients summed in fp32, the clip coefficient
    # from float64 squares; docs/training.md, "Numerics").
    assert [r["loss"] for r in rows] == one.losses
    a, b = (adapter_files(d) for d in (one.final_dir, two / "final"))
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7), k
        assert torch.equal(a[k], b[k]), k
    assert [p.name for p in (two / "samples").iterdir()] == ["step-00000003-0.gif"]
    # The optimizer state was written as one shard per rank.
    assert len(list((two / "checkpoints" / "step-00000003" / "optimizer").glob("*.distcp"))) == 2
