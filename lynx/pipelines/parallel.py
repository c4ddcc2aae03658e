"""Many GPUs on one video: guidance branches over ranks, the video sequence over ranks, or both as a 2-D mesh.

- Guidance parallelism: the 3 (full) or 2 (lite) predictions of a step run on different ranks and are
  shared by broadcast (`LynxPipeline.predict_branches` with a process group).
- Context (sequence) parallelism, on diffusers' own engine: Wan's `_cp_plan` splits the video sequence at
  block 0 and gathers it at `proj_out`; the self-attention runs as Ulysses (`apply_ulysses`: an all-to-all
  turns a shard of the sequence into a shard of the heads) or ring attention (`apply_ring`: key/value chunks
  travel the ring and partial results merge by log-sum-exp). The Lynx branches attend from the local queries
  to identity tokens and reference features that every rank holds whole (`lynx.models.context_parallel`).

The mesh is (guidance, ring, ulysses), row-major over the ranks, so the ranks that share one sequence are
neighbours (one node, fast links for the per-block all-to-alls) and only the light per-step broadcasts cross
the guidance dimension. 6 GPUs, full: 3 branches x 2 sequence ranks. Launch: docs/multigpu.md.

    torchrun --nproc-per-node 6 -m lynx generate ... --context-parallel ulysses --guidance-parallel

    dist.init_process_group("nccl"); torch.cuda.set_device(local_rank)
    pipe = LynxPipeline.from_pretrained(..., device="cuda")
    parallelize(pipe, "ulysses", guidance_parallel=True)
    video = pipe(prompt, image=photo, guidance_parallel=True).frames[0]   # the same video on every rank
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from diffusers.hooks.context_parallel import apply_context_parallel
from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig

from ..errors import ParallelError

MESH_DIMS = ("guidance", "ring", "ulysses")
STRATEGIES = ("ulysses", "ring")
REFERENCE_TOKENS = 256  # the 256x256 reference crop: one latent frame of 32x32, patches of 2x2


@dataclass(frozen=True)
class MeshShape:
    """How many ranks along each mesh dimension; their product is the world size."""

    guidance: int = 1
    ring: int = 1
    ulysses: int = 1

    @property
    def sequence(self) -> int:
        """Ranks that share one video sequence."""
        return self.ring * self.ulysses

    @property
    def world_size(self) -> int:
        return self.guidance * self.sequence


def _divisors(n: int, limit: int = 16) -> str:
    return ", ".join(str(d) for d in range(2, min(n, limit) + 1) if n % d == 0) or "none"


def mesh_shape(world_size: int, context_parallel: str | None = None, degree: int | None = None,
               guidance_parallel: bool = False, branches: int = 3) -> MeshShape:
    """The (guidance, ring, ulysses) sizes for `world_size` ranks, or a ParallelError saying which counts work.

    `degree`: ranks per sequence (default: all ranks, or all / `branches` with guidance parallelism).
    """
    if context_parallel not in (None, *STRATEGIES):
        raise ParallelError(f"context parallelism is 'ulysses' or 'ring', not {context_parallel!r}")
    if degree is not None and context_parallel is None:
        raise ParallelError("a sequence degree needs --context-parallel ulysses or ring")
    if degree is not None and degree < 1:
        raise ParallelError(f"the sequence degree must be at least 1, got {degree}")
    if world_size == 1 and degree in (None, 1):
        return MeshShape()  # one process (a single GPU): the same code with nothing to split or share
    if context_parallel is None:
        degree = 1
    elif degree is None:
        if guidance_parallel and world_size % branches:
            raise ParallelError(
                f"{world_size} processes do not factor into {branches} guidance branches x a sequence degree: "
                f"run a multiple of {branches} ({', '.join(str(branches * k) for k in (1, 2, 4, 8))}), "
                "or give --cp-degree")
        degree = world_size // branches if guidance_parallel else world_size
    if world_size % degree:
        raise ParallelError(f"{world_size} processes do not factor into sequences of {degree} ranks: "
                            f"use a sequence degree dividing {world_size} ({_divisors(world_size)})")
    guidance = world_size // degree
    if guidance > 1 and not guidance_parallel:
        raise ParallelError(f"{world_size} processes with sequences of {degree} ranks would compute the same video "
                            f"{guidance} times: add --guidance-parallel or run {degree} processes")
    if guidance > branches:
        raise ParallelError(f"{world_size} processes give {guidance} guidance ranks but a step has only {branches} "
                            f"branches: run {branches * degree} processes, or a larger --cp-degree")
    ring = degree if context_parallel == "ring" else 1
    return MeshShape(guidance, ring, degree // ring)


def video_tokens(height: int, width: int, num_frames: int, patch=(1, 2, 2), vae=(4, 8)) -> tuple[int, int, int]:
    """(frames, rows, columns) of Wan's token grid for a video: VAE 4x in time (+1), 8x in space, then patches."""
    return ((num_frames - 1) // vae[0] + 1) // patch[0], height // vae[1] // patch[1], width // vae[1] // patch[2]


def check_split(shape: MeshShape, num_heads: int, grid: tuple[int, int, int] | None = None,
                with_reference: bool = False) -> None:
    """Fail with what works when the heads (Ulysses), the video's tokens or the reference's 256 tokens do not
    split evenly over the sequence ranks."""
    if shape.ulysses > 1 and num_heads % shape.ulysses:
        raise ParallelError(f"Ulysses over {shape.ulysses} ranks splits the {num_heads} attention heads, which do not "
                            f"divide by {shape.ulysses}: use a Ulysses degree dividing {num_heads} "
                            f"({_divisors(num_heads, 64)}) or --context-parallel ring")
    n = shape.sequence
    if n == 1:
        return
    if grid is not None and (grid[0] * grid[1] * grid[2]) % n:
        f, h, w = grid
        # The nearest latent-frame counts below and above that split evenly (multiples of n always do).
        fits = [k for k in range(1, f + 2 * n + 1) if (k * h * w) % n == 0]
        below, above = [k for k in fits if k < f][-1:], [k for k in fits if k > f]
        frames = " or ".join(str(4 * (k - 1) + 1) for k in (below + above)[:2])
        raise ParallelError(
            f"the video's {f}x{h}x{w} = {f * h * w} latent tokens do not split over {n} sequence ranks: at this "
            f"height and width use num_frames {frames}; or a sequence degree dividing {f * h * w} "
            f"({_divisors(f * h * w)})")
    if with_reference and REFERENCE_TOKENS % n:
        raise ParallelError(f"the full model's reference pass has {REFERENCE_TOKENS} tokens, which do not split over "
                            f"{n} sequence ranks: use a sequence degree dividing {REFERENCE_TOKENS} (2, 4, 8, 16), "
                            "or ref_scale=0")


def build_mesh(shape: MeshShape, device_type: str):
    """The (guidance, ring, ulysses) device mesh over the initialised default process group."""
    _require_process_group()
    if dist.get_world_size() != shape.world_size:
        raise ParallelError(f"the mesh {shape.guidance} x {shape.ring} x {shape.ulysses} (guidance x ring x ulysses) "
                            f"needs {shape.world_size} processes, not {dist.get_world_size()}")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (shape.guidance, shape.ring, shape.ulysses), mesh_dim_names=MESH_DIMS)


def check_all_to_all(group, device) -> None:
    """Ulysses exchanges shards with all-to-all; fail at setup, with the fix, on a backend that cannot."""
    n = dist.get_world_size(group)
    probe = torch.arange(n, dtype=torch.float32, device=device)
    out = torch.empty_like(probe)
    try:
        dist.all_to_all_single(out, probe, group=group)
    except (RuntimeError, NotImplementedError, ValueError) as e:
        raise ParallelError(f"the {dist.get_backend(group)} process-group backend has no all-to-all "
                            f"({' '.join(str(e).split())[:120]}), which Ulysses needs: use nccl on GPUs or gloo "
                            "on CPUs, or --context-parallel ring") from None


def apply_ulysses(transformer, mesh) -> None:
    """Split the video sequence over `mesh["ulysses"]`: all-to-all of heads around each self-attention."""
    size = mesh["ulysses"].size()
    if mesh["ring"].size() != 1:
        raise ParallelError("apply_ulysses takes a mesh whose ring dimension is 1")
    check_split(MeshShape(ulysses=size), transformer.config.num_attention_heads)
    check_all_to_all(mesh["ulysses"].get_group(), transformer.device)
    _enable_context_parallel(transformer, ContextParallelConfig(ulysses_degree=size, mesh=mesh))


def apply_ring(transformer, mesh) -> None:
    """Split the video sequence over `mesh["ring"]`: key/value chunks go round, results merge by log-sum-exp."""
    if mesh["ulysses"].size() != 1:
        raise ParallelError("apply_ring takes a mesh whose ulysses dimension is 1")
    _enable_context_parallel(transformer, ContextParallelConfig(ring_degree=mesh["ring"].size(), mesh=mesh))


def guidance_group(transformer):
    """The process group of the guidance dimension of the mesh `transformer` runs on, or None without one."""
    config = getattr(transformer, "_parallel_config", None)
    cp = getattr(config, "context_parallel_config", None)
    mesh = getattr(cp, "_mesh", None)
    if mesh is None or "guidance" not in (mesh.mesh_dim_names or ()):
        return None
    return mesh["guidance"].get_group()


def plan(world_size: int, context_parallel: str | None, degree: int | None, guidance_parallel: bool,
         branches: int, transformer_config, height: int, width: int, num_frames: int,
         with_reference: bool) -> MeshShape:
    """The mesh for a launch, checked against the model and video sizes before any weight loads."""
    shape = mesh_shape(world_size, context_parallel, degree, guidance_parallel, branches)
    grid = video_tokens(height, width, num_frames, tuple(transformer_config["patch_size"]))
    check_split(shape, transformer_config["num_attention_heads"], grid, with_reference)
    return shape


def parallelize(pipe, context_parallel: str | None = None, degree: int | None = None,
                guidance_parallel: bool = False, branches: int | None = None):
    """Lay `pipe` out over every rank of the initialised process group; returns the device mesh.

    `context_parallel`: "ulysses", "ring" or None; `degree`: ranks per sequence (default: all ranks, or all /
    `branches` with guidance parallelism). Then call `pipe(..., guidance_parallel=guidance_parallel)`: with
    guidance parallelism, branch k of each step runs on guidance rank k % size.
    """
    if branches is None:
        branches = 2 if pipe.variant == "lite" else 3
    _require_process_group()
    shape = mesh_shape(dist.get_world_size(), context_parallel, degree, guidance_parallel, branches)
    return lay_out(pipe, shape)


def lay_out(pipe, shape: MeshShape):
    """Build the mesh of `shape` and split the sequence of every transformer of `pipe` (Wan2.2 A14B: both
    experts, on the one mesh) over its ring or ulysses dimension; returns the mesh."""
    experts = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    for transformer in experts:
        if getattr(transformer, "_parallel_config", None) is not None:
            raise ParallelError("this transformer is already parallelised; load a fresh pipeline")
        check_split(shape, transformer.config.num_attention_heads)
    mesh = build_mesh(shape, pipe.transformer.device.type)
    for transformer in experts:
        if shape.ulysses > 1:
            apply_ulysses(transformer, mesh)
        elif shape.ring > 1:
            apply_ring(transformer, mesh)
    return mesh


def _require_process_group() -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelError("parallel generation needs torch.distributed initialised: run under torchrun "
                            "(or call torch.distributed.init_process_group first)")


def _enable_context_parallel(transformer, config: ContextParallelConfig) -> None:
    # Wan's plan, less its per-token timestep split: that is for Wan2.2 TI2V, a Wan2.1 timestep has one value per
    # video (diffusers would warn at every video that it leaves it whole).
    plan = {k: v for k, v in transformer._cp_plan.items() if k != ""}
    if torch.accelerator.device_count() > 0:
        transformer.enable_parallelism(config=config, cp_plan=plan)
    else:
        # diffusers picks the device as rank % (accelerator count), a division by zero on a CPU-only machine; the
        # device is unused by context parallelism, so the same steps as enable_parallelism are taken here.
        parallel = ParallelConfig(context_parallel_config=config)
        parallel.setup(dist.get_rank(), dist.get_world_size(), torch.device("cpu"), mesh=config.mesh)
        transformer._parallel_config = parallel
        for module in transformer.modules():
            if hasattr(getattr(module, "processor", None), "_parallel_config"):
                module.processor._parallel_config = parallel
        apply_context_parallel(transformer, config, plan)
    shape = MeshShape(1, config.ring_degree, config.ulysses_degree)
    transformer.register_forward_pre_hook(_split_check(shape, transformer), with_kwargs=True)


def _split_check(shape: MeshShape, transformer):
    heads, patch = transformer.config.num_attention_heads, tuple(transformer.config.patch_size)

    def hook(module, args, kwargs):
        # Before diffusers' hooks cut the sequence: an uneven cut would fail deep inside with an assertion.
        latents = kwargs.get("hidden_states", args[0] if args else None)
        if latents is not None:
            f, h, w = (n // p for n, p in zip(latents.shape[2:], patch))
            if f * h * w == REFERENCE_TOKENS and f == 1:
                check_split(shape, heads, with_reference=True)
            else:
                check_split(shape, heads, (f, h, w))

    return hook
