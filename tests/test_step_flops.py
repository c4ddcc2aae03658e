"""The FLOP count of docs/benchmarks.md (`benchmarks/step_time.py`, where the predicted step ratios come from)
against torch's own FLOP counter over a real denoising step of WanPipeline and LynxPipeline full and lite, and the
harness that times the steps: generations taking turns step by step, each unchanged by the others."""

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


class _Recorder:
    """A stand-in pipeline: `steps` steps, each logged, ending in the step callback as diffusers' loops do."""

    def __init__(self, name, log, fail_at=None):
        self.name, self.log, self.fail_at = name, log, fail_at

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, num_inference_steps, output_type, callback_on_step_end):
        for i in range(num_inference_steps):
            if i == self.fail_at:
                raise RuntimeError(f"{self.name} failed")
            self.log.append((self.name, i))
            callback_on_step_end(self, i, None, {})


def test_interleaved_generations_take_turns_one_step_at_a_time():
    log = []
    jobs = {name: (_Recorder(name, log), {}) for name in "abc"}
    times = step_time.interleaved(jobs, 4, "cpu")
    assert log == [(name, i) for i in range(4) for name in "abc"]
    assert {name: len(t) for name, t in times.items()} == {"a": 3, "b": 3, "c": 3}  # step 0 is not kept
    assert all(t >= 0 for ts in times.values() for t in ts)


def test_interleaved_reraises_a_failure_after_the_others_finish():
    log = []
    jobs = {"a": (_Recorder("a", log), {}), "b": (_Recorder("b", log, fail_at=1), {}), "c": (_Recorder("c", log), {})}
    with pytest.raises(RuntimeError, match="b failed"):
        step_time.interleaved(jobs, 3, "cpu")
    assert log == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2), ("c", 2)]


class _Keeper:
    """A pipeline whose output is kept (`interleaved` returns times only)."""

    def __init__(self, pipe, **kwargs):
        self.pipe, self.kwargs, self.output = pipe, kwargs, None

    def set_progress_bar_config(self, **kwargs):
        self.pipe.set_progress_bar_config(**kwargs)

    def __call__(self, **kwargs):
        self.output = self.pipe(**self.kwargs, **kwargs, generator=torch.Generator().manual_seed(0)).frames
        return self.output


def test_interleaved_pipelines_compute_what_each_computes_alone(parts, face_embedding):
    """The benchmark's pipelines share weights, VAE and text encoder but each has its own scheduler: interleaved
    step by step, each generation is the one it makes alone, bit for bit."""
    lynx = LynxPipeline(**{**parts, "scheduler": copy.deepcopy(parts["scheduler"]),
                           "transformer": copy.deepcopy(parts["transformer"])})
    lynx.register_modules(resampler=add_tiny_adapters(lynx.transformer, "lite", CFG))
    wan = WanPipeline(**{**parts, "scheduler": copy.deepcopy(parts["scheduler"])})
    common = dict(prompt="a person walks", negative_prompt="", **VIDEO)
    jobs = {"wan": _Keeper(wan, guidance_scale=5.0, **common),
            "lynx": _Keeper(lynx, face_embedding=face_embedding, **common)}
    step_time.interleaved({name: (job, {}) for name, job in jobs.items()}, 3, "cpu")
    for job in jobs.values():
        together = job.output
        alone = job(num_inference_steps=3, output_type="latent")
        assert torch.equal(together, alone)


def test_paired_ratio_is_the_median_with_its_order_statistic_interval():
    base = [2.0] * 100
    samples = {"base": base, "x": [2.0 * (i + 1) / 100 for i in reversed(range(100))]}  # ratios 0.01 .. 1.00
    median, low, high = step_time.paired_ratio(samples, "x", "base")
    assert median == pytest.approx(0.505)
    # n = 100: the median's 95 % interval runs from the 41st to the 60th of the sorted ratios
    assert (low, high) == (pytest.approx(0.41), pytest.approx(0.60))
    assert step_time.against((1.1, 1.0, 1.2), 1.0) == "+10.0% [+0.0%, +20.0%] > 5%"


def test_a_model_built_empty_gets_random_weights_and_its_real_buffers():
    """`build(..., empty=True)` + `random_fill`, how the benchmarks make a 14B model in host memory: every
    parameter is drawn (N(0, 0.02), in the asked dtype, nothing left on the meta device), every buffer (the RoPE
    tables) is the one a normal build computes, and a denoising step runs on it."""
    normal = step_time.build(CFG, "cpu", torch.float32)
    empty = step_time.build(CFG, "cpu", torch.float32, empty=True)
    assert all(p.is_meta for p in empty["transformer"].parameters())
    for name in ("text_encoder", "vae", "transformer"):
        step_time.random_fill(empty[name], "cpu", torch.float32)
        params = list(empty[name].parameters())
        assert not any(p.is_meta for p in params) and all(p.dtype == torch.float32 for p in params)
        values = torch.cat([p.flatten() for p in params])
        assert abs(values.std().item() - 0.02) < 0.002 and abs(values.mean().item()) < 0.002
        buffers = dict(normal[name].named_buffers())
        for key, buffer in empty[name].named_buffers():
            assert torch.equal(buffer, buffers[key]), key
    assert len(dict(empty["transformer"].named_buffers())) > 0  # the check above saw the RoPE tables
    pipe = WanPipeline(**empty)
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a person walks", **VIDEO, num_inference_steps=1, output_type="latent").frames
    assert torch.isfinite(latents).all()
    # A weight two modules share (tied embeddings) is drawn once and stays shared.
    with torch.device("meta"):
        tied = torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)])
    tied[1].weight = tied[0].weight
    step_time.random_fill(tied, "cpu", torch.bfloat16)
    assert tied[1].weight is tied[0].weight and tied[0].weight.dtype == torch.bfloat16
