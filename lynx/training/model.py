"""The model a training run optimises, built so that no rank ever holds the whole backbone in host memory.

Every rank (1) builds the Wan transformer, its training Lynx processors and the resampler on the meta device
(shapes only); (2) wraps each block in activation checkpointing and shards it with FSDP2, one unit per block
(the frozen block and its ID/Ref layers) and the rest at the root; (3) allocates only its own shards; (4) reads
its rows of every tensor from the safetensors files, with positioned reads located by the files' headers.
Adapters from scratch are drawn module by module from seeds, so every world size starts from the same
weights. FSDP2 runs at every world size, 1 included: one numeric path (parameters cast to the compute dtype,
gradients reduced in fp32 by a plain sum) for one process and for many.

The frozen backbone is cast as the inference pipeline casts it: every weight in the compute dtype, the RoPE
tables (buffers) in fp32.
"""

from __future__ import annotations

import json
import math
import warnings
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..constants import ResamplerConfig, full_adapter_config, lite_adapter_config, transformer_dims
from ..errors import CheckpointError
from ..models.adapters import adapter_parameters, install_adapters, official_state_dicts, processors
from ..models.loading import read_adapter_config
from ..models.resampler import Resampler
from ..runtime import DTYPES, launcher_ranks
from .config import TrainingConfig
from .objective import LynxTrainModel, PackedLynxAttnProcessor


# ----- processes and devices -------------------------------------------------------------------------------------
@dataclass
class Runtime:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we started the process group, so we end it

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime() -> Runtime:
    """Join the `torchrun` process group (NCCL on GPUs, gloo on CPUs), or start a one-process group, so FSDP2
    runs the same way for one process and for many."""
    _, local, world = launcher_ranks()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if cuda else "gloo"
        if world > 1:
            dist.init_process_group(backend, device_id=device if cuda else None)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return Runtime(dist.get_rank(), dist.get_world_size(), device, owns)


def teardown_runtime(runtime: Runtime) -> None:
    if runtime.owns_group and dist.is_initialized():
        dist.destroy_process_group()


# ----- construction on the meta device ----------------------------------------------------------------------------
def meta_transformer(base: Path, dtype: torch.dtype):
    """The base transformer with its weights on the meta device in `dtype`; buffers (RoPE tables) real, fp32."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel

    with init_empty_weights(include_buffers=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer = WanTransformer3DModel.from_config(WanTransformer3DModel.load_config(base / "transformer"))
    cast_backbone(transformer, dtype)  # shapes only: casting costs nothing
    return transformer.eval().requires_grad_(False)


def cast_backbone(transformer, dtype: torch.dtype) -> None:
    """As the inference pipeline casts the base: every weight to `dtype`, the buffers (RoPE tables) kept fp32."""
    for p in transformer.parameters():
        p.data = p.data.to(dtype)


def _set_buffers(module: torch.nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    for name, value in buffers.items():
        owner, _, attr = name.rpartition(".")
        setattr(module.get_submodule(owner), attr, value)


def adapter_layout(config: TrainingConfig, transformer, source: Path | None):
    """The `AdapterConfig` to train: read from `source`'s file headers, or new from the config."""
    num_blocks, hidden = transformer_dims(transformer.config)
    if source is not None:
        return read_adapter_config(source, num_blocks, hidden, meta=True)[0]
    t = config.train
    res = t.resampler.to_config() if t.resampler else ResamplerConfig()
    if t.variant == "full":
        return full_adapter_config(num_blocks, hidden, t.num_registers, replace(res, output_dim=hidden))
    return lite_adapter_config(num_blocks, hidden, res.output_dim if t.resampler else 2048, res)


def shard_model(model: LynxTrainModel, runtime: Runtime, compute_dtype: torch.dtype) -> None:
    """FSDP2: one unit per block (frozen block + its ID/Ref layers); embedders, head and resampler at the root.

    Inputs keep their dtypes (timesteps and RoPE tables stay fp32, as in the pipeline); gradients are reduced
    in fp32 as a plain sum, the loss being already a share of the whole step's."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(runtime.device.type, (runtime.world,))
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    for block in model.transformer.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def build_model(config: TrainingConfig, runtime: Runtime, source: Path | None) -> LynxTrainModel:
    """The sharded training model, its backbone read from `train.base` and its adapters from `source` (released
    weights to fine-tune, or a checkpoint) or drawn new; each rank holds and reads only its shards."""
    t = config.train
    base, dtype = Path(t.base), DTYPES[t.precision]
    transformer = meta_transformer(base, dtype)
    if t.attention_backend:
        transformer.set_attention_backend(t.attention_backend)
    layout = adapter_layout(config, transformer, source)
    resampler = _install_meta_adapters(transformer, layout)
    model = LynxTrainModel(transformer, resampler, t.attention, t.gradient_checkpointing)
    shard_model(model, runtime, dtype)
    buffers = {k: v.to(runtime.device) for k, v in model.named_buffers()}
    model.to_empty(device=runtime.device)
    _set_buffers(model, buffers)
    load_backbone(model.transformer, base / "transformer")
    if source is not None:
        load_adapter_files(model, source)
    else:
        init_adapters(model, layout, t.seed)
    return model


def _install_meta_adapters(transformer, layout) -> Resampler:
    """Trainable adapters (fp32 masters; FSDP computes with them in the compute dtype) with shapes only."""
    with torch.device("meta"):
        install_adapters(transformer, layout, PackedLynxAttnProcessor)
        resampler = Resampler(layout.resampler)
    for p in [*adapter_parameters(transformer), *resampler.parameters()]:
        p.data = p.data.float()
        p.requires_grad_(True)
    for proc in processors(transformer):
        proc.train()
    return resampler.train()


def build_adapters(config: TrainingConfig, transformer, source: Path | None) -> Resampler:
    """Trainable adapters installed into an unsharded `transformer` (loaded from `source`, or drawn new exactly
    as a training run draws them); returns the resampler. For inspection and tests: runs use `build_model`."""
    layout = adapter_layout(config, transformer, source)
    device = next(transformer.parameters()).device
    resampler = _install_meta_adapters(transformer, layout)
    for module in [*processors(transformer), resampler]:
        module.to_empty(device=device)
    model = LynxTrainModel(transformer, resampler, gradient_checkpointing=False)
    if source is not None:
        load_adapter_files(model, source)
    else:
        init_adapters(model, layout, config.train.seed)
    return resampler


# ----- reading each rank's shard ---------------------------------------------------------------------------------
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
           "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def _index(directory: Path) -> dict[str, tuple[Path, dict, int]]:
    """Every tensor of the safetensors files in `directory`: (file, header entry, where its data starts)."""
    found = {}
    for path in sorted(directory.glob("*.safetensors")):
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        for key, entry in header.items():
            if key != "__metadata__":
                found[key] = (path, entry, 8 + size)
    return found


def _rows(target: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The tensor this rank fills and the first row of the whole tensor it holds (FSDP2 shards dim 0 as
    `torch.chunk` does)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(target, DTensor):
        return target, 0
    chunk = -(-target.shape[0] // target.device_mesh.size())
    return target.to_local(), min(target.device_mesh.get_local_rank() * chunk, target.shape[0])


def _read(state: dict[str, torch.Tensor], directory: Path, what: str) -> None:
    """Fill `state` (plain or FSDP-sharded tensors, in place) from the safetensors files in `directory`.

    Each rank reads only its own rows, with positioned reads into one buffer per tensor: neither the files nor
    the other ranks' rows ever enter its memory (a memory map would bring the pages it touches)."""
    found = _index(directory)
    missing = sorted(set(state) - set(found))
    if missing:
        raise CheckpointError(f"the {what} in {directory} lacks {len(missing)} tensors ({', '.join(missing[:3])}"
                              f"{', ...' if len(missing) > 3 else ''}); is it the right directory, and complete?")
    for key, target in state.items():
        path, entry, start = found[key]
        if list(entry["shape"]) != list(target.shape):
            raise CheckpointError(f"{path}: {key} is {tuple(entry['shape'])}, the model expects "
                                  f"{tuple(target.shape)}; these files belong to another model")
        local, first = _rows(target)
        if local.numel() == 0:
            continue
        dtype = _DTYPES[entry["dtype"]]
        row_bytes = math.prod(entry["shape"][1:]) * dtype.itemsize
        begin = start + entry["data_offsets"][0] + first * row_bytes
        buffer = torch.empty(local.numel() * dtype.itemsize, dtype=torch.uint8)
        with open(path, "rb") as f:
            f.seek(begin)
            if f.readinto(memoryview(buffer.numpy())) != buffer.numel():
                raise CheckpointError(f"{path} ends inside {key}: the file is incomplete (an interrupted download "
                                      "or save): fetch or write it again")
        with torch.no_grad():
            local.copy_(buffer.view(dtype).view(local.shape))


def load_backbone(transformer, directory: Path) -> None:
    """The frozen weights of `transformer` (sharded or not) from the base's `transformer/` safetensors files."""
    state = {k: v for k, v in transformer.state_dict().items() if ".processor." not in k}
    _read(state, directory, "base transformer")


def load_adapter_files(model: LynxTrainModel, directory: Path) -> None:
    """The adapters from their released files (`resampler`, `ip_layers`, `ref_layers`), by their released keys."""
    full = model.state_dict()
    state = {k.removeprefix("resampler."): v for k, v in full.items() if k.startswith("resampler.")}
    layers = {k.removeprefix("transformer."): v for k, v in full.items() if ".processor." in k}
    for file_state in official_state_dicts(model.transformer, layers).values():
        state.update(file_state)
    _read(state, directory, "adapters")


def _seed(seed: int, name: str) -> int:
    return int(np.random.SeedSequence([seed, zlib.crc32(name.encode())]).generate_state(1)[0])


@torch.no_grad()
def init_adapters(model: LynxTrainModel, layout, seed: int) -> None:
    """New adapters: each module drawn whole on the CPU from its own seed (PyTorch's default initialisation),
    value projections zeroed so the adapted model starts as the base model, and each rank keeps its rows."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def assign(target: torch.Tensor, value: torch.Tensor) -> None:
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None).to_local()
            target = target.to_local()
        target.copy_(value)

    fresh = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(seed, "resampler"))
        fresh["resampler"] = Resampler(layout.resampler)
        for proc in processors(model.transformer):
            if proc.branch is None:
                continue
            name = f"transformer.blocks.{proc.block}.attn{1 if proc.branch == 'ref' else 2}.processor"
            torch.manual_seed(_seed(seed, name))
            if proc.branch == "ref":
                new = PackedLynxAttnProcessor(proc.block, "ref", layout.hidden_dim)
            else:
                new = PackedLynxAttnProcessor(proc.block, "ip", layout.hidden_dim, layout.ip_input_dim, layout.ip_bias,
                                              layout.num_registers, layout.ip_key_norm, layout.ip_key_norm_eps)
            for p in getattr(new, f"to_v_{proc.branch}").parameters():
                p.zero_()
            fresh[name] = new
    for prefix, module in fresh.items():
        target = model.get_submodule(prefix)
        for name, value in module.named_parameters():
            assign(target.get_parameter(name), value.float())


def load_transformer(base: Path, dtype: torch.dtype, device="cpu"):
    """The frozen base transformer, unsharded, cast as the inference pipeline casts it (RoPE tables stay fp32)."""
    transformer = meta_transformer(Path(base), dtype)
    buffers = {k: v.to(device) for k, v in transformer.named_buffers()}
    transformer.to_empty(device=device)
    _set_buffers(transformer, buffers)
    load_backbone(transformer, Path(base) / "transformer")
    return transformer
