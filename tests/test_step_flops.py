"""The FLOP count of docs/benchmarks.md (`benchmarks/step_time.py`, where the predicted step ratios come from)
against torch's own FLOP counter over a real denoising step of WanPipeline and LynxPipeline full and lite."""

import copy
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from diffusers import WanPipeline
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from lynx import LynxPipeline
from lynx.testing import TinyModelConfig, add_tiny_adapters, tiny_components

_spec = importlib.util.spec_from_file_location(
    "step_time", Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py")
step_time = sys.modules.setdefault("step_time", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(step_time)

CFG = TinyModelConfig()
VIDEO = dict(height=32, width=64, num_frames=5)  # 2 latent frames x 2 x 4 patches: L = 16


def _cpu_attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


# torch counts the CUDA attention kernels but not the CPU one; its own formula for them, applied to it.
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention}


def second_step_flops(pipe, **kwargs) -> int:
    """FLOPs torch counts in denoising step 1 (step 0 also computes the keys/values kept for later steps)."""
    counter = FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION)

    def start_after_step_0(p, i, t, tensors):
        if i == 0:
            counter.__enter__()
        return {}

    pipe.set_progress_bar_config(disable=True)
    pipe("a person walks", negative_prompt="", **VIDEO, num_inference_steps=2, output_type="latent",
         callback_on_step_end=start_after_step_0, **kwargs)
    counter.__exit__(None, None, None)
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def parts():
    return tiny_components(CFG)


def test_wan_step_is_two_passes_of_the_formula(parts):
    assert step_time.tokens(VIDEO).video == 16
    assert second_step_flops(WanPipeline(**parts), guidance_scale=5.0) == 2 * step_time.pass_flops(CFG, VIDEO)


@pytest.mark.parametrize("variant, passes", [("full", 3), ("lite", 2), ("off", 2)])
def test_lynx_step_is_its_passes_of_the_formula(parts, variant, passes, face_embedding, reference_crop):
    """"off" is the benchmark's control: lite with ip_scale=0, Wan's passes less the text keys/values."""
    pipe = LynxPipeline(**{**parts, "transformer": copy.deepcopy(parts["transformer"])})
    pipe.register_modules(resampler=add_tiny_adapters(pipe.transformer, "full" if variant == "full" else "lite",
                                                      CFG))
    counted = second_step_flops(pipe, face_embedding=face_embedding,
                                reference_image=reference_crop if variant == "full" else None,
                                **({"ip_scale": 0.0} if variant == "off" else {}))
    assert counted == passes * step_time.pass_flops(CFG, VIDEO, variant)
    # The text keys/values are what a Lynx pass does not recompute: without them the formula would be Wan's.
    parts_lynx = step_time.flop_parts(CFG, VIDEO, variant)
    assert parts_lynx["cross-attention text k/v"] == 0
    assert step_time.flop_parts(CFG, VIDEO)["cross-attention text k/v"] > 0
