"""Text-to-image with an image prompt: equality with diffusers' IP-Adapter, invariants, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_models as tm
import torch
from helpers import CALL, diffusers_pipe, load_pipe, reference_image, run

from ipadapter import IncompatibleModelError, InputError, attach, attached, detach, load_checkpoint

TOL = 2 / 255  # the bound; in practice the difference is ~1e-6


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("variant", list(tm.VARIANTS))
def test_same_pixels_as_diffusers_ip_adapter(models: dict, variant: str, fmt: str) -> None:
    ref = reference_image()
    expected = run(diffusers_pipe(models, variant, fmt, scale=0.7), ip_adapter_image=ref)
    pipe = load_pipe(models, tm.VARIANTS[variant][1])
    plain = run(pipe)
    ip = attach(pipe, models["ckpt"][variant, fmt], scale=0.7)  # encoder found from the repo layout
    assert ip.encoder.feature_dim(ip.spec.feature) == ip.spec.feature_dim
    ours = run(ip, ref)
    assert np.abs(ours - expected).max() <= TOL
    assert np.abs(ours - plain).max() > 0.05  # the image prompt really does something


@pytest.mark.parametrize("variant", ["sd15", "plus_sdxl_vit-h"])
def test_scale_zero_and_detach_give_the_plain_model_exactly(models: dict, variant: str) -> None:
    pipe = load_pipe(models, tm.VARIANTS[variant][1])
    before = dict(pipe.unet.attn_processors)
    plain = run(pipe)
    ip = attach(pipe, models["ckpt"][variant, "safetensors"], scale=0.0)
    assert np.array_equal(run(ip, reference_image()), plain)
    ip.scale = 0.5
    assert not np.array_equal(run(ip, reference_image()), plain)
    ip.detach()
    assert pipe.unet.attn_processors == before and attached(pipe) == {}
    assert np.array_equal(run(pipe), plain)
    with pytest.raises(InputError, match="detached"):
        ip(reference_image())


def test_batch_layouts_match_diffusers_and_single_runs(models: dict) -> None:
    ref = reference_image()
    reference = diffusers_pipe(models, "sd15")
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, models["ckpt"]["sd15", "bin"], scale=0.7)
    # num_images_per_prompt repeats rows after the negatives
    want = run(reference, ip_adapter_image=ref, num_images_per_prompt=2)
    assert np.abs(run(ip, ref, num_images_per_prompt=2) - want).max() <= TOL
    # no classifier-free guidance: positives only
    want = run(reference, ip_adapter_image=ref, guidance_scale=1.0)
    assert np.abs(run(ip, ref, guidance_scale=1.0) - want).max() <= TOL
    # two prompts, one reference each: each row equals its prompt run alone
    other = reference_image(seed=5)
    gens = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    both = ip(
        [ref, other], **{**CALL, "prompt": ["a cat", "a dog"], "negative_prompt": ["", ""]}, generator=gens
    )
    alone = ip(
        other,
        **{**CALL, "prompt": "a dog", "negative_prompt": ""},
        generator=torch.Generator().manual_seed(2),
    )
    assert np.abs(both.images[1] - alone.images[0]).max() < 1e-4
    with pytest.raises(InputError, match="3 reference images for 2 prompt"):
        ip([ref, ref, ref], **{**CALL, "prompt": ["a", "b"]})


def test_encoder_runs_once_per_reference_and_negative_once(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, models["ckpt"]["plus_sd15", "safetensors"])
    calls = []
    ip.encoder.model.register_forward_hook(lambda *a: calls.append(1))
    ip.tokens(reference_image())
    assert len(calls) == 2  # the image and the all-zero negative input
    ip.tokens(reference_image())
    ip.tokens([reference_image(), reference_image(seed=3)])
    assert len(calls) == 3  # only the new image was encoded


def test_more_distinct_references_than_the_cache_holds(models: dict) -> None:
    """One call with 40 different references (the encoder cache keeps 32) still gets each its own tokens."""
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, models["ckpt"]["plus_sd15", "safetensors"])
    refs = [reference_image(seed=i) for i in range(40)]
    tokens, _ = ip.tokens(refs)
    assert tokens.shape[0] == 40
    alone, _ = ip.tokens(refs[5])
    torch.testing.assert_close(tokens[5], alone[0])
    assert not torch.equal(tokens[4], tokens[5])


def test_fp16_checkpoint_weights_take_the_model_dtype(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    assert load_checkpoint(models["ckpt"]["sd15", "bin"]).image_proj["proj.weight"].dtype == torch.float16
    ip = attach(pipe, models["ckpt"]["sd15", "bin"])
    assert {p.dtype for p in ip.projection.parameters()} == {torch.float32}
    branch_dtypes = {p.dtype for proc in pipe.unet.attn_processors.values() if hasattr(proc, "named_branches")
                     for p in proc.parameters()}  # fmt: skip
    assert branch_dtypes == {torch.float32}


def _untouched(pipe, before: dict) -> bool:
    return pipe.unet.attn_processors == before and attached(pipe) == {}


def test_sdxl_adapter_on_sd15_is_refused_and_pipeline_untouched(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(IncompatibleModelError, match=r"makes 64-dim tokens .* cross-attention dim is 32"):
        attach(pipe, models["ckpt"]["sdxl", "safetensors"], models["big_g"])
    assert _untouched(pipe, before)


def test_wrong_encoder_is_refused_with_both_dims(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    before = dict(pipe.unet.attn_processors)
    with pytest.raises(IncompatibleModelError, match=r"needs 24-dim pooled image_embeds .* gives 40-dim"):
        attach(pipe, models["ckpt"]["sd15", "safetensors"], models["big_g"])
    with pytest.raises(IncompatibleModelError, match=r"needs 32-dim hidden states .* gives 48-dim"):
        attach(pipe, models["ckpt"]["plus_sd15", "safetensors"], models["big_g"])
    assert _untouched(pipe, before)


def test_layer_count_and_size_mismatches_are_refused(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    before = dict(pipe.unet.attn_processors)
    ckpt = load_checkpoint(models["ckpt"]["sd15", "safetensors"])
    for key in ("13.to_k_ip.weight", "13.to_v_ip.weight"):
        del ckpt.ip_adapter[key]
    with pytest.raises(IncompatibleModelError, match=r"6 attention layers .* has 7 cross-attention layers"):
        attach(pipe, ckpt, models["vit_h"])
    ckpt = load_checkpoint(models["ckpt"]["sd15", "safetensors"])
    for key in ("1.to_k_ip.weight", "1.to_v_ip.weight"):
        ckpt.ip_adapter[key] = torch.zeros(64, 32)
    with pytest.raises(IncompatibleModelError, match=r"layer 1 has hidden size 64 .* has 32"):
        attach(pipe, ckpt, models["vit_h"])
    assert _untouched(pipe, before)


def test_two_adapters_and_names(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    first = attach(pipe, models["ckpt"]["sd15", "safetensors"])
    with pytest.raises(InputError, match="already attached"):
        attach(pipe, models["ckpt"]["plus_sd15", "safetensors"])
    second = attach(pipe, models["ckpt"]["plus_sd15", "safetensors"], name="plus")
    assert set(attached(pipe)) == {"default", "plus"}
    first.detach()
    assert set(attached(pipe)) == {"plus"} and second.attached
    detach(pipe)
    assert attached(pipe) == {}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -0.5, "x"])
def test_bad_scales_are_refused(models: dict, bad) -> None:
    pipe = load_pipe(models, "sd15")
    with pytest.raises(InputError, match="scale"):
        attach(pipe, models["ckpt"]["sd15", "safetensors"], scale=bad)
    ip = attach(pipe, models["ckpt"]["sd15", "safetensors"], scale=0.3)
    with pytest.raises(InputError, match="scale"):
        ip.scale = bad
    assert ip.scale == 0.3
