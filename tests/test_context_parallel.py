"""Sequence (context) parallelism on diffusers' engine, alone and with guidance parallelism, on gloo over CPU
processes: the latents of 2 and 4 processes equal the one-process latents within the fp32 reduction-order
tolerance, for full and lite; bad meshes fail before any weight loads, with what works."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lynx import LynxPipeline
from lynx.constants import sampling_defaults
from lynx.errors import ParallelError
from lynx.pipelines.parallel import MeshShape, check_all_to_all, check_split, mesh_shape, parallelize, video_tokens
from lynx.testing import TinyModelConfig, save_tiny_adapters, save_tiny_base

CFG = TinyModelConfig(num_heads=4)  # Ulysses over 4 ranks: one head each
# 5 frames of 32x32: 2 latent frames of 2x2 patches = 8 tokens, 4 or 2 per rank; the reference crop: 256 tokens.
KW = dict(height=32, width=32, num_frames=5, num_inference_steps=2, output_type="latent", seed=9)
TOKENS, REF_TOKENS = 8, 256

# What each world runs: (variant, strategy, sequence degree, guidance parallel). One spawn of 4 processes runs
# both worlds (process imports dominate the time on a small machine): first all 4 together, then ranks 0-1 and
# ranks 2-3 as two separate 2-process worlds side by side. 4 with guidance: 2 guidance ranks x 2 sequence ranks
# (full: c and i on guidance rank 0, u on 1). Guidance parallelism alone (2 and 3 processes):
# tests/test_guidance_parallel.py.
RUNS = {
    4: [("full", "ulysses", 2, True), ("lite", "ring", 2, True),
        ("full", "ulysses", None, False), ("lite", "ring", None, False)],
    2: [[("full", "ring", None, False)], [("lite", "ulysses", None, False)]],  # ranks 0-1, ranks 2-3
}


def tolerance(expected: torch.Tensor, variant: str) -> float:
    """How far latents of fp32 runs that differ only in the order of some sums may drift apart.

    Each rank does the one-process arithmetic except that a split may reorder sums: ring attention merges
    per-chunk softmaxes by log-sum-exp, and a matrix product over fewer rows may block its sums differently.
    A block has 8 such sums (q, k, v, out projections; the attention's two products; the feed-forward's two),
    each moved by at most 2 ulps of its scale; the errors of the blocks add up along the residual stream; the
    guidance combination scales a prediction's error by |1 - g_i| + |g_i - g| + |g| (9 at the defaults, full
    and lite); each step adds its error to the latents, whose scale bounds the step's update.
    """
    d = sampling_defaults(variant)
    g, g_i = d.guidance_scale, d.guidance_scale_i if isinstance(d.guidance_scale_i, float) else 1.0  # two-way
    gain = abs(1 - g_i) + abs(g_i - g) + abs(g)
    ulps_per_block = 8 * 2
    return KW["num_inference_steps"] * gain * CFG.num_layers * ulps_per_block * 2.0 ** -23 * expected.abs().max().item()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp_models")
    base = save_tiny_base(root / "base", CFG)
    return base, {v: save_tiny_adapters(root / f"lynx_{v}", v, CFG) for v in ("full", "lite")}


def _generate(base, adapter, emb, crop, **parallel):
    pipe = LynxPipeline.from_pretrained(base, adapter=adapter)
    pipe.set_progress_bar_config(disable=True)
    seen = []  # the sequence length block 0's self-attention sees at each transformer call (after the split)
    pipe.transformer.blocks[0].attn1.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append((args[0] if args else kwargs["hidden_states"]).shape[1]), with_kwargs=True)
    if parallel:
        parallelize(pipe, **parallel)
    video = pipe("a man walks", face_embedding=emb, reference_image=crop if pipe.variant == "full" else None,
                 guidance_parallel=parallel.get("guidance_parallel"), **KW).frames
    return video, seen


def _runs(rank, world, store, base, adapters, emb, crop, out, runs):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        for k, (variant, strategy, degree, guidance) in enumerate(runs):
            video, seen = _generate(base, adapters[variant], emb, crop, context_parallel=strategy, degree=degree,
                                    guidance_parallel=guidance)
            torch.save((video, seen), f"{out}-run{k}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _worker(rank, tmp, base, adapters, emb, crop):
    torch.set_num_threads(1)
    _runs(rank, 4, tmp / "store4", base, adapters, emb, crop, tmp / "w4", RUNS[4])
    pair = rank // 2
    _runs(rank % 2, 2, tmp / f"store2-{pair}", base, adapters, emb, crop, tmp / f"w2-{pair}", RUNS[2][pair])


@pytest.fixture(scope="module")
def one_process(models, face_embedding, reference_crop, one_thread):
    base, adapters = models
    return {v: _generate(base, adapters[v], face_embedding, reference_crop) for v in ("full", "lite")}


def test_2_and_4_processes_equal_one_process(models, one_process, face_embedding, reference_crop, tmp_path):
    base, adapters = models
    mp.spawn(_worker, args=(tmp_path, base, adapters, face_embedding, reference_crop), nprocs=4, join=True)
    steps = KW["num_inference_steps"]
    worlds = [(4, "w4", RUNS[4])] + [(2, f"w2-{pair}", runs) for pair, runs in enumerate(RUNS[2])]
    checked = set()
    for world, name, runs in worlds:
        for k, (variant, strategy, degree, guidance) in enumerate(runs):
            expected, one_seen = one_process[variant]
            assert one_seen[-1] == TOKENS
            sequence = degree or world
            for rank in range(world):
                video, seen = torch.load(tmp_path / f"{name}-run{k}-rank{rank}.pt")
                where = f"{world} processes: {variant} {strategy} x{sequence}{' + guidance' if guidance else ''}, " \
                        f"rank {rank}"
                err = (video - expected).abs().max().item()
                assert err <= tolerance(expected, variant), f"{where}: {err}"
                # The sequence really was split, the reference pass too; each guidance rank ran only its branches.
                ref_calls = 2 if variant == "full" else 0
                assert seen[:ref_calls] == [REF_TOKENS // sequence] * ref_calls, where
                branches = 3 if variant == "full" else 2
                mine = len(range(rank // sequence, branches, world // sequence)) if guidance else branches
                assert seen[ref_calls:] == [TOKENS // sequence] * (steps * mine), where
            checked.add((world, variant, guidance))
    assert checked == {(w, v, g) for w in (2, 4) for v in ("full", "lite") for g in (False, True) if w == 4 or not g}


def test_cli_under_torchrun(models, face_embedding, reference_crop, tmp_path, one_thread):
    from PIL import Image

    from lynx.apps.cli import main
    from lynx.io.video import read_video

    base, adapters = models
    np.save(tmp_path / "emb.npy", face_embedding)
    Image.fromarray(reference_crop).save(tmp_path / "crop.png")
    args = ["generate", "--embedding", tmp_path / "emb.npy", "--reference", tmp_path / "crop.png", "--prompt",
            "a man walks", "--base", base, "--adapter", adapters["full"], "--height", "32", "--width", "32",
            "--frames", "5", "--steps", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    assert main([*map(str, args), "--out", str(tmp_path / "one.gif")]) == 0  # one process: this one
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "lynx", *map(str, args), "--out", tmp_path / "two.gif",
                          "--context-parallel", "ulysses"], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    a, b = read_video(tmp_path / "one.gif")[0], read_video(tmp_path / "two.gif")[0]
    # The decoded frames differ by far less than one level of 1/255, so rounding moves a pixel by one level at most.
    assert a.shape == (5, 32, 32, 3) and np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".png") == [
        "emb.npy", "one.gif", "one.gif.json", "two.gif", "two.gif.json"]  # one writer only


# ----- meshes that cannot work fail at once, saying what does -------------------------------------------
def test_mesh_shapes():
    assert mesh_shape(6, "ulysses", guidance_parallel=True) == MeshShape(guidance=3, ulysses=2)
    assert mesh_shape(4, "ring", 2, guidance_parallel=True, branches=3) == MeshShape(guidance=2, ring=2)
    assert mesh_shape(8, "ring") == MeshShape(ring=8)
    assert mesh_shape(3, None, guidance_parallel=True) == MeshShape(guidance=3)
    assert video_tokens(480, 832, 81) == (21, 30, 52)  # the authors' full size: 32,760 tokens


@pytest.mark.parametrize("call,message", [
    (lambda: mesh_shape(4, "ulysses", guidance_parallel=True), "4 processes do not factor into 3 guidance branches"),
    (lambda: mesh_shape(6, "ring", 4), r"do not factor into sequences of 4 ranks: .*\(2, 3, 6\)"),
    (lambda: mesh_shape(4, "ring", 2), "add --guidance-parallel or run 2 processes"),
    (lambda: mesh_shape(8, "ring", 2, guidance_parallel=True, branches=2), "only 2 branches: run 4 processes"),
    (lambda: mesh_shape(2, None, 2), "needs --context-parallel"),
    (lambda: check_split(MeshShape(ulysses=3), 40), r"40 attention heads.*\(2, 4, 5, 8, 10, 20, 40\).*ring"),
    (lambda: check_split(MeshShape(ring=16), 40, video_tokens(480, 832, 81)),
     r"21x30x52 = 32760 latent tokens do not split over 16 .*num_frames 77 or 85"),
    (lambda: check_split(MeshShape(ring=3), 40, video_tokens(480, 832, 81), with_reference=True),
     r"reference pass has 256 tokens.*over 3 sequence ranks"),
])
def test_bad_layouts_say_what_works(call, message):
    with pytest.raises(ParallelError, match=message):
        call()


@pytest.mark.parametrize("world,flags,message", [
    ("4", ["--context-parallel", "ulysses", "--guidance-parallel"], "4 processes do not factor into 3 guidance"),
    ("4", ["--context-parallel", "ulysses"], "Ulysses over 4 ranks splits the 2 attention heads"),
    ("3", ["--context-parallel", "ring"], r"2x2x2 = 8 latent tokens do not split over 3 .*num_frames 9 or 21"),
    ("2", ["--context-parallel", "ring", "--speed", "fast"], "--speed fast uses a step cache"),
])
def test_cli_fails_before_loading(tiny_base, adapter_dirs, face_embedding, reference_crop, tmp_path, capsys,
                                  monkeypatch, world, flags, message):
    from PIL import Image

    from lynx.apps.cli import main

    np.save(tmp_path / "emb.npy", face_embedding)
    Image.fromarray(reference_crop).save(tmp_path / "crop.png")
    monkeypatch.setenv("WORLD_SIZE", world)  # as torchrun sets it; the check comes before any process group
    code = main(["generate", "--embedding", str(tmp_path / "emb.npy"), "--reference", str(tmp_path / "crop.png"),
                 "--prompt", "a man", "--base", str(tiny_base), "--adapter", str(adapter_dirs["full"]),
                 "--height", "32", "--width", "32", "--frames", "5", "--out", str(tmp_path / "v.gif"), *flags])
    assert code == 2
    err = capsys.readouterr().err
    assert "loading" not in err and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


class _NoAllToAll(dist.ProcessGroup):
    """A process-group backend that has no all-to-all (it defines none of the collectives)."""

    def getBackendName(self):
        return "no_all_to_all"


def test_a_backend_without_all_to_all_is_named():
    dist.Backend.register_backend("no_all_to_all", lambda store, rank, size, timeout: _NoAllToAll(rank, size),
                                  devices=["cpu"])
    dist.init_process_group("no_all_to_all", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(ParallelError, match="no_all_to_all process-group backend has no all-to-all.*ring"):
            check_all_to_all(dist.group.WORLD, "cpu")
        check_all_to_all(dist.new_group(backend="gloo"), "cpu")  # gloo has it
    finally:
        dist.destroy_process_group()


def test_one_rank_is_the_plain_pipeline(models, face_embedding, reference_crop, one_process):
    """A world of one (a single GPU runs this path): a 1 x 1 x 1 mesh that splits nothing, the same video."""
    from lynx import parallelize as exported

    assert exported is parallelize
    base, adapters = models
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        video, seen = _generate(base, adapters["full"], face_embedding, reference_crop, context_parallel="ulysses",
                                guidance_parallel=True)
    finally:
        dist.destroy_process_group()
    expected, one_seen = one_process["full"]
    assert seen == one_seen and torch.equal(video, expected)
