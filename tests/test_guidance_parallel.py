"""Guidance branches on separate processes (gloo on CPU): every rank gets exactly the one-process video."""

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lynx import LynxPipeline
from lynx.errors import InputError

KW = dict(height=32, width=32, num_frames=5, num_inference_steps=3, output_type="latent", seed=9)


def _worker(rank, world, store, base, adapter, emb, crop, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        pipe = LynxPipeline.from_pretrained(base, adapter=adapter)
        pipe.set_progress_bar_config(disable=True)
        video = pipe("a man walks", face_embedding=emb, reference_image=crop, guidance_parallel=True, **KW).frames
        torch.save(video, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


# Three ranks: one branch each. Two ranks: rank 0 runs c and i, rank 1 runs u.
@pytest.mark.parametrize("kind,world", [("full", 3), ("full", 2)])
def test_branch_parallel_equals_one_process(tiny_base, adapter_dirs, face_embedding, reference_crop, tmp_path,
                                            kind, world):
    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs[kind])
    crop = reference_crop if kind == "full" else None
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' setting: the same reduction order, so results match bit for bit
    try:
        expected = pipe("a man walks", face_embedding=face_embedding, reference_image=crop, **KW).frames
    finally:
        torch.set_num_threads(threads)
    mp.spawn(_worker, args=(world, tmp_path / "store", tiny_base, adapter_dirs[kind], face_embedding, crop, tmp_path),
             nprocs=world, join=True)
    for rank in range(world):
        assert torch.equal(torch.load(tmp_path / f"rank{rank}.pt"), expected)


def test_needs_an_initialised_process_group(tiny_base, adapter_dirs, face_embedding):
    pipe = LynxPipeline.from_pretrained(tiny_base, adapter=adapter_dirs["lite"])
    with pytest.raises(InputError, match="torch.distributed"):
        pipe("a man walks", face_embedding=np.asarray(face_embedding), guidance_parallel=True, **KW)


def test_cli_under_torchrun(tiny_base, adapter_dirs, face_embedding, tmp_path):
    import subprocess
    import sys

    np.save(tmp_path / "emb.npy", face_embedding)
    args = ["generate", "--embedding", tmp_path / "emb.npy", "--prompt", "a man walks", "--base", tiny_base,
            "--adapter", adapter_dirs["lite"], "--height", "32", "--width", "32", "--frames", "5", "--steps", "2"]
    import os

    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what torchrun gives each worker: same arithmetic order
    one = subprocess.run([sys.executable, "-m", "lynx", *map(str, args), "--out", tmp_path / "one.gif"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                          "29517", "-m", "lynx", *map(str, args), "--out", tmp_path / "two.gif",
                          "--guidance-parallel"], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    from lynx.io.video import read_video

    a, b = read_video(tmp_path / "one.gif")[0], read_video(tmp_path / "two.gif")[0]
    assert a.shape == (5, 32, 32, 3) and np.array_equal(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "one.gif", "one.gif.json", "two.gif",
                                                          "two.gif.json"]  # one writer only
