"""Finding, checking and reading weights: the Wan base directory and the official adapter files.

Everything that can be wrong with a model directory is found here, at load time, and reported with
the file name, what was expected and what to download; nothing fails later inside torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..constants import (
    ADAPTER_REPO,
    BASE_MODEL_REPO,
    BASES_THAT_FIT,
    IP_LAYERS_FILE,
    KNOWN_BASES,
    REF_LAYERS_FILE,
    RESAMPLER_FILE,
    AdapterConfig,
    full_adapter_config,
    lite_adapter_config,
    transformer_dims,
)
from ..errors import CheckpointError, InputError, WeightsNotFoundError
from ..io.files import atomic_write
from .quantized import check_gguf_fits, is_gguf
from .resampler import Resampler, resampler_config_from_state_dict

BASE_SUBFOLDERS = ("tokenizer", "text_encoder", "vae", "transformer", "scheduler")
# Wan2.2 A14B adds the low-noise expert; its model_index.json names it (and `boundary_ratio`).
SECOND_EXPERT = "transformer_2"
# Optional file our own training writes beside the official ones; the released dirs do not have it.
ADAPTER_CONFIG_FILE = "lynx_config.json"


def download_instructions(base_dir: Path | None = None, adapter_dir: Path | None = None, *,
                          base_parts: list[str] | None = None) -> str:
    """The `hf download` lines for what is missing: the base (or only its `base_parts` subfolders) when
    `base_dir` is given, the adapters when `adapter_dir` is given."""
    lines, holds = [], []
    if base_dir is not None:
        base_dir = Path(base_dir)
        include = "".join(f" --include '{part}/*'" for part in base_parts or [])
        lines.append(f"  hf download {BASE_MODEL_REPO}{include} --local-dir {base_dir}")
        holds.append(f"{base_dir} holds {', '.join(base_parts or BASE_SUBFOLDERS)}")
    then = ""
    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        # `hf download --include 'lynx_full/*' --local-dir D` writes D/lynx_full/: a folder named like the
        # release's gets its files from its parent; a folder of another name receives the release's subfolder.
        named = adapter_dir.name.startswith("lynx_")
        variant = adapter_dir.name if named else "lynx_full"
        target = adapter_dir if named else adapter_dir / variant
        lines.append(f"  hf download {ADAPTER_REPO} --include '{variant}/*' "
                     f"--local-dir {adapter_dir.parent if named else adapter_dir}")
        holds.append(f"{target} holds {RESAMPLER_FILE}, {IP_LAYERS_FILE}"
                     + (f" and {REF_LAYERS_FILE}" if variant != "lynx_lite" else ""))
        if not named:
            then = f"Then pass --adapter {target} (or lynx_lite for the lite variant).\n"
    size = "tens of gigabytes" if base_dir is not None and not base_parts else "a few gigabytes at most"
    return (f"Download it ({size}) with the Hugging Face CLI (`pip install -U huggingface_hub`):\n"
            + "\n".join(lines) + f"\nso that {' and '.join(holds)}.\n" + then
            + "Or point --base/--adapter (or $LYNX_MODELS) at where they already are.")


def _adapter_incomplete(adapter_dir) -> bool:
    adapter_dir = Path(adapter_dir)
    return not all((adapter_dir / n).is_file() for n in (RESAMPLER_FILE, IP_LAYERS_FILE))


# ----- base model -------------------------------------------------------------------------------------
@dataclass
class BaseDirReport:
    path: Path
    found: dict[str, bool] = field(default_factory=dict)
    transformer_config: dict | None = None
    problems: list[str] = field(default_factory=list)
    model_index: dict = field(default_factory=dict)

    @property
    def two_experts(self) -> bool:
        """A Wan2.2 A14B base: high-noise `transformer` and low-noise `transformer_2`, switched at `boundary_ratio`."""
        return (self.model_index.get(SECOND_EXPERT) or [None])[0] is not None

    @property
    def boundary_ratio(self) -> float | None:
        return self.model_index.get("boundary_ratio")

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def transformer_shape(self) -> tuple[int, int]:
        """(number of blocks, width) of the base transformer, which the adapters must match."""
        return transformer_dims(self.transformer_config)


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(p)) for p in ("*.safetensors", "*.bin", "*.safetensors.index.json"))


def inspect_base_dir(path, transformer_files: dict | None = None) -> BaseDirReport:
    """Check a diffusers-layout Wan base directory without loading any weight. `transformer_files` maps
    "transformer" (and "transformer_2") to single files (GGUF) that replace their weights: those folders then
    need only their config.json."""
    path = Path(path)
    files = transformer_files or {}
    report = BaseDirReport(path)
    if not path.is_dir():
        report.problems.append(f"{path} {'is a file, not a folder' if path.exists() else 'does not exist'}")
        return report
    for sub in BASE_SUBFOLDERS:
        folder = path / sub
        ok = folder.is_dir()
        if sub in ("text_encoder", "vae", "transformer"):
            ok = ok and (folder / "config.json").is_file() and (sub in files or _has_weights(folder))
        elif sub == "scheduler":
            ok = ok and (folder / "scheduler_config.json").is_file()
        elif sub == "tokenizer":
            ok = ok and any(folder.iterdir())
        report.found[sub] = ok
        if not ok:
            report.problems.append(f"{folder} is missing or incomplete (needs its config and weights)")
    index = path / "model_index.json"
    if index.is_file():
        try:
            report.model_index = json.loads(index.read_text())
        except json.JSONDecodeError as e:
            report.problems.append(f"{index} is not valid JSON ({e})")
    cfg = path / "transformer" / "config.json"
    if cfg.is_file():
        try:
            report.transformer_config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            report.problems.append(f"{cfg} is not valid JSON ({e})")
    if report.two_experts:
        folder = path / SECOND_EXPERT
        ok = (folder / "config.json").is_file() and (SECOND_EXPERT in files or _has_weights(folder))
        report.found[SECOND_EXPERT] = ok
        if not ok:
            report.problems.append(f"{folder} (the low-noise expert model_index.json names) is missing or "
                                   "incomplete (needs its config and weights)")
        elif report.transformer_config is not None:
            second = json.loads((folder / "config.json").read_text())
            if _shape(second) != _shape(report.transformer_config):
                report.problems.append(f"{folder} is {_describe(second)} but transformer is "
                                       f"{_describe(report.transformer_config)}: the two experts must match")
        if report.boundary_ratio is None:
            report.problems.append(f"{index} names {SECOND_EXPERT} but no boundary_ratio (where the experts switch)")
    return report


def _shape(config: dict) -> tuple[int, int, int]:
    return (*transformer_dims(config), config.get("in_channels", 16))


def _describe(config: dict) -> str:
    """'Wan2.2-TI2V-5B-shaped (30 blocks of width 3072, 48 latent channels)' for a transformer config."""
    blocks, width, channels = _shape(config)
    name = KNOWN_BASES.get((blocks, width, channels))
    return (f"{name + '-shaped ' if name else ''}({blocks} blocks of width {width}, {channels} input channels)")


def adapter_shape(adapter_dir) -> tuple[int | None, int | None]:
    """(width, depth) the adapters of `adapter_dir` were made for, from the file headers alone (no tensor is
    read); depth is None for lite (its ID layers sit on every second block). (None, None) when the files are
    missing or damaged: `read_adapter_config` reports those."""
    adapter_dir = Path(adapter_dir)
    try:
        with safe_open(str(adapter_dir / IP_LAYERS_FILE), framework="pt", device="cpu") as f:
            width = f.get_slice("0.to_k_ip.weight").get_shape()[0]
        depth = None
        if (adapter_dir / REF_LAYERS_FILE).is_file():
            with safe_open(str(adapter_dir / REF_LAYERS_FILE), framework="pt", device="cpu") as f:
                depth = len({k.partition(".")[0] for k in f.keys()})
    except Exception:  # missing or damaged files are reported, with their names, by read_adapter_config
        return None, None
    return width, depth


def require_base_dir(path, adapter_dir=None, transformer_files: dict | None = None) -> Path:
    """A complete base directory, else `WeightsNotFoundError` naming the missing parts (and the adapters when
    `adapter_dir` is given and incomplete too, so every download is listed at once). `transformer_files`: the
    GGUF files standing in for the base's transformer weights (their folders then need only config.json)."""
    report = inspect_base_dir(path, transformer_files)
    if not report.ok:
        parts = [sub for sub, ok in report.found.items() if not ok]
        # A folder that exists with some parts missing needs only those parts; a bad config needs its folder.
        if report.path.is_dir() and report.transformer_config is None and "transformer" not in parts:
            parts.append("transformer")
        adapter = adapter_dir if adapter_dir is not None and _adapter_incomplete(adapter_dir) else None
        where = (f"The Wan2.1-T2V base model at {report.path} is incomplete or damaged" if report.path.is_dir()
                 else f"The Wan2.1-T2V base model was not found at {report.path}")
        raise WeightsNotFoundError(
            f"{where}:\n  - " + "\n  - ".join(report.problems)
            + "\n" + download_instructions(report.path, adapter, base_parts=parts if report.path.is_dir() else None))
    return report.path


def check_base_fits(base_dir, adapter_dir=None, transformer_files: dict | None = None) -> BaseDirReport:
    """A checked base directory whose transformer(s) the Lynx adapters can act on; anything else (Wan2.2
    TI2V-5B, Wan2.1-1.3B, an image-to-video model) is refused naming what it is and what fits.
    `transformer_files` ({"transformer": FILE.gguf, "transformer_2": ...}) are checked against the base's
    transformer configs from their headers alone."""
    files = check_transformer_files(transformer_files)
    report = inspect_base_dir(require_base_dir(base_dir, adapter_dir, files), files)
    if SECOND_EXPERT in files and not report.two_experts:
        raise InputError(f"{files[SECOND_EXPERT]} would replace the low-noise expert, but {report.path} has one "
                         "transformer (a Wan2.2-T2V-A14B base has two)")
    config = report.transformer_config
    what = f"{report.path} is {_describe(config)}"
    if report.model_index.get("expand_timesteps"):
        raise CheckpointError(f"{what}, a text-image-to-video model with per-frame timesteps; the Lynx adapters "
                              f"act on text-to-video Wan: use {BASES_THAT_FIT}")
    if config.get("in_channels", 16) != config.get("out_channels", 16) or config.get("image_dim"):
        raise CheckpointError(f"{what}, an image-to-video model; the Lynx adapters act on text-to-video Wan: "
                              f"use {BASES_THAT_FIT}")
    if adapter_dir is not None:
        width, depth = adapter_shape(adapter_dir)
        blocks, base_width = transformer_dims(config)
        if width is not None and (width != base_width or depth not in (None, blocks)):
            made = f"{depth} blocks of width {width}" if depth else f"width {width}"
            name = next((n for (b, w, c), n in KNOWN_BASES.items() if w == width and c == 16 and depth in (None, b)),
                        None)
            raise CheckpointError(f"{what}; the Lynx adapters in {adapter_dir} were made for a transformer of "
                                  f"{made}" + (f" ({name})" if name else "") + f": use {BASES_THAT_FIT}, "
                                  "or adapters made for this base")
    for sub, file in files.items():
        check_gguf_fits(file, report.transformer_config if sub == "transformer" else
                        json.loads((report.path / sub / "config.json").read_text()), report.path / sub / "config.json")
    return report


def check_transformer_files(transformer_files: dict | None) -> dict[str, Path]:
    """{"transformer" or "transformer_2": Path} of the given single files (None values dropped), each a GGUF
    file that exists; a file of another format is refused by its name."""
    files = {sub: Path(f) for sub, f in (transformer_files or {}).items() if f is not None}
    for sub, f in files.items():
        if sub not in ("transformer", SECOND_EXPERT):
            raise InputError(f"a single file replaces 'transformer' or '{SECOND_EXPERT}', not {sub!r}")
        if not is_gguf(f):
            raise InputError(f"{f}: a base transformer file must be a GGUF file (.gguf), such as city96's "
                             "Wan2.1-T2V-14B Q4/Q5/Q8 files")
        if f.is_dir():
            raise InputError(f"transformer file {f} is a folder, not a file")
        if not f.is_file():
            raise WeightsNotFoundError(f"transformer file {f} does not exist")
    return files


def check_model_dirs(base_dir, adapter_dir, transformer_files: dict | None = None) -> AdapterConfig:
    """Both directories (and any GGUF transformer files) checked against each other without loading a weight;
    raises with what to download."""
    report = check_base_fits(base_dir, adapter_dir, transformer_files)
    return read_adapter_config(adapter_dir, *report.transformer_shape)[0]


def transformer_shape(base_dir) -> tuple[int, int]:
    """(blocks, width) of a checked base directory's transformer."""
    return inspect_base_dir(require_base_dir(base_dir)).transformer_shape


# ----- adapters ---------------------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                       "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: Path, meta: bool = False) -> dict[str, torch.Tensor]:
    """Read a whole safetensors file (`meta`: only its header, as meta tensors of the stored shapes and dtypes);
    a truncated or foreign file becomes a CheckpointError naming it."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if meta:
                slices = {k: f.get_slice(k) for k in f.keys()}
                return {k: torch.empty(s.get_shape(), dtype=_SAFETENSORS_DTYPES.get(s.get_dtype(), torch.float32),
                                       device="meta") for k, s in slices.items()}
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise CheckpointError(f"{path} could not be read as safetensors ({e}). The file is damaged or "
                              "incomplete (an interrupted download or save): fetch or write it again.") from None


def _keys_by_block(state: dict, names: tuple[str, ...], path: Path) -> dict[int, dict[str, torch.Tensor]]:
    blocks: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        index, _, rest = key.partition(".")
        if not index.isdigit() or not any(rest.startswith(n) for n in names):
            raise CheckpointError(f"{path} has an unexpected key '{key}'; expected keys like "
                                  f"'0.{names[0]}.weight'. Is this the right file?")
        blocks.setdefault(int(index), {})[rest] = value
    if sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError(f"{path}: block indices are not 0..{len(blocks) - 1} (found {sorted(blocks)[:8]}...)")
    return blocks


def read_adapter_config(adapter_dir, num_blocks: int, hidden_dim: int, meta: bool = False
                        ) -> tuple[AdapterConfig, dict]:
    """Inspect an adapter directory against a transformer of `num_blocks` x `hidden_dim`.

    Returns the detected config and the three state dicts. Raises with the file name and the
    expected shape on every mismatch (lite adapters on a base of another width, ref layers for another
    depth, missing files, corrupt files). `meta`: read only the files' headers (the states hold meta tensors),
    for a loader that reads each rank's shard itself.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise WeightsNotFoundError(f"Adapter directory {adapter_dir} not found.\n"
                                   + download_instructions(adapter_dir=adapter_dir))
    for name in (RESAMPLER_FILE, IP_LAYERS_FILE):
        if not (adapter_dir / name).is_file():
            raise WeightsNotFoundError(f"{adapter_dir / name} is missing: a Lynx adapter directory holds "
                                       f"{RESAMPLER_FILE}, {IP_LAYERS_FILE} (and {REF_LAYERS_FILE} for lynx_full).\n"
                                       + download_instructions(adapter_dir=adapter_dir))
    ip_path, res_path, ref_path = (adapter_dir / n for n in (IP_LAYERS_FILE, RESAMPLER_FILE, REF_LAYERS_FILE))
    ip_state = read_safetensors(ip_path, meta)
    res_state = read_safetensors(res_path, meta)
    ref_state = read_safetensors(ref_path, meta) if ref_path.is_file() else None

    extra = {}
    if (adapter_dir / ADAPTER_CONFIG_FILE).is_file():
        extra = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
    resampler = resampler_config_from_state_dict(res_state, heads=extra.get("resampler_heads"), source=str(res_path))

    ip_blocks = _keys_by_block(ip_state, ("to_k_ip", "to_v_ip", "registers"), ip_path)
    first = ip_blocks[0]
    if "to_k_ip.weight" not in first or "to_v_ip.weight" not in first:
        raise CheckpointError(f"{ip_path}: block 0 lacks to_k_ip.weight / to_v_ip.weight")
    out_dim, in_dim = first["to_k_ip.weight"].shape
    bias = "to_k_ip.bias" in first
    registers = first["registers"].shape[1] if "registers" in first else 0
    if out_dim != hidden_dim:
        raise CheckpointError(f"{ip_path} projects identity tokens to width {out_dim}, but the transformer is "
                              f"{hidden_dim} wide: these adapters belong to another base model.")
    if in_dim != resampler.output_dim:
        raise CheckpointError(f"{ip_path} expects {in_dim}-d identity tokens but {res_path} makes "
                              f"{resampler.output_dim}-d ones: the two files come from different releases.")

    if ref_state is not None:
        config = full_adapter_config(num_blocks, hidden_dim, registers, resampler)
        if len(ip_blocks) != num_blocks:
            raise CheckpointError(f"{ip_path} has ID layers for {len(ip_blocks)} blocks; the full adapter needs "
                                  f"one per transformer block ({num_blocks}).")
        ref_blocks = _keys_by_block(ref_state, ("to_k_ref", "to_v_ref"), ref_path)
        if len(ref_blocks) != num_blocks:
            raise CheckpointError(f"{ref_path} has Ref layers for {len(ref_blocks)} blocks, but the transformer "
                                  f"has {num_blocks}: these adapters were made for a model of another depth.")
        shape = ref_blocks[0].get("to_k_ref.weight", torch.empty(0)).shape
        if tuple(shape) != (hidden_dim, hidden_dim):
            raise CheckpointError(f"{ref_path}: to_k_ref.weight is {tuple(shape)}, expected "
                                  f"({hidden_dim}, {hidden_dim}) for this transformer.")
    else:
        if bias or registers:
            raise CheckpointError(f"{adapter_dir} looks like lynx_full ({IP_LAYERS_FILE} has biases/registers) "
                                  f"but {REF_LAYERS_FILE} is missing; download it too.\n"
                                  + download_instructions(adapter_dir=adapter_dir))
        config = lite_adapter_config(num_blocks, hidden_dim, in_dim, resampler)
        if len(ip_blocks) != len(config.ip_blocks):
            raise CheckpointError(f"{ip_path} has ID layers for {len(ip_blocks)} blocks; lynx_lite on a "
                                  f"{num_blocks}-block transformer needs {len(config.ip_blocks)} (every second block).")
    return config, {"resampler": res_state, "ip_layers": ip_state, "ref_layers": ref_state}


def load_adapters(transformer, adapter_dir, processor_class=None, dtype: torch.dtype | None = None,
                  read: tuple[AdapterConfig, dict] | None = None) -> Resampler:
    """Install the adapters of `adapter_dir` into `transformer` (every tensor loaded strictly) and return the
    resampler. The processors take the transformer's device and dtype (or `dtype`); nothing is changed when
    a file does not fit. `read`: what `read_adapter_config` already returned for this directory."""
    # Here, not at the top: checking model directories (`check_model_dirs`) must not import diffusers.
    from .adapters import install_adapters, model_keys, processors

    config, states = read or read_adapter_config(adapter_dir, *transformer_dims(transformer.config))
    adapter_dir = Path(adapter_dir)
    # Built on the meta device and given the file's tensors: no randomly initialised 4.2 B-parameter copy
    # is ever allocated beside the loaded one.
    with torch.device("meta"):
        resampler = Resampler(config.resampler)
    _load_strict(resampler, states["resampler"], adapter_dir / RESAMPLER_FILE, config.variant)
    files = {IP_LAYERS_FILE: states["ip_layers"]}
    if config.use_ref:
        files[REF_LAYERS_FILE] = states["ref_layers"]
    saved = {id(b): (b.attn1.processor, b.attn2.processor) for b in transformer.blocks}
    with torch.device("meta"):
        install_adapters(transformer, config, *([processor_class] if processor_class else []))
    try:
        for name, state in files.items():
            keyed = model_keys(config, name, state)
            procs = {}
            for key, value in keyed.items():
                prefix, _, param = key.partition(".processor.")
                procs.setdefault(prefix, {})[param] = value
            expected = {f"blocks.{p.block}.attn{1 if p.branch == 'ref' else 2}" for p in processors(transformer)
                        if p.branch == ("ref" if name == REF_LAYERS_FILE else "ip")}
            if set(procs) != expected:
                raise CheckpointError(f"{adapter_dir / name} does not match the {config.variant} adapter layout: "
                                      f"it has weights for {len(procs)} blocks, the layout {len(expected)}")
            for prefix, sd in procs.items():
                _load_strict(transformer.get_submodule(prefix).processor, sd, adapter_dir / name, config.variant)
    except BaseException:
        for block in transformer.blocks:
            block.attn1.set_processor(saved[id(block)][0])
            block.attn2.set_processor(saved[id(block)][1])
        transformer.lynx_config = None
        raise
    p = next(transformer.parameters())
    for proc in processors(transformer):
        proc.to(device=p.device, dtype=dtype or p.dtype).eval().requires_grad_(False)
    return resampler.to(device=p.device, dtype=dtype or p.dtype).eval().requires_grad_(False)


def _load_strict(module, state, path: Path, variant: str) -> None:
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match the {variant} adapter layout: "
                              f"{' '.join(str(e).split())[:600]}") from None


def save_adapters(directory, transformer, resampler: Resampler | dict[str, torch.Tensor],
                  state: dict[str, torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> None:
    """Write the released files (`resampler`, `ip_layers`, `ref_layers` for full) from the adapters inside
    `transformer` (or from its state dict `state`, e.g. gathered from FSDP shards) and the `resampler` (or its
    state dict), loadable by the authors' code and ours."""
    from .adapters import official_state_dicts

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    res_state = resampler if isinstance(resampler, dict) else resampler.state_dict()
    files = {RESAMPLER_FILE: res_state, **official_state_dicts(transformer, state)}
    for name, sd in files.items():
        sd = {k: v.detach().to(dtype or v.dtype).contiguous().cpu() for k, v in sd.items()}
        atomic_write(directory / name, lambda p, sd=sd: save_file(sd, str(p), metadata={"format": "pt"}))
