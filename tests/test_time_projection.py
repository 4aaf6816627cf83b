"""The SD3.5 time-conditioned resampler against diffusers' IPAdapterTimeImageProjection (the reference)."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from functools import partial  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers.loaders import transformer_sd3  # noqa: E402
from diffusers.models.embeddings import IPAdapterTimeImageProjection  # noqa: E402

from ipadapter.adapters.time_projection import (  # noqa: E402
    TimeResampler,
    TimeResamplerConfig,
    time_resampler_config,
)
from ipadapter.errors import CheckpointError  # noqa: E402

# depth 4 / ff_mult 4 are what diffusers' converter hard-codes; the second config needs it patched
TINY = TimeResamplerConfig(
    embed_dim=24, hidden_dim=64, output_dim=128, depth=4, heads=1, num_queries=8, timestep_in_dim=32
)
ODD = TimeResamplerConfig(
    embed_dim=20, hidden_dim=64, output_dim=96, depth=2, heads=2, num_queries=5, timestep_in_dim=33, ff_mult=2
)


def instantx_state(cfg: TimeResamplerConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random image_proj state dict in the original InstantX key layout (every tensor random, norms too)."""
    g = torch.Generator().manual_seed(seed)
    h, inner, ff = cfg.hidden_dim, cfg.heads * cfg.dim_head, cfg.hidden_dim * cfg.ff_mult
    shapes = {
        "latents": (1, cfg.num_queries, h),
        "proj_in.weight": (h, cfg.embed_dim),
        "proj_in.bias": (h,),
        "proj_out.weight": (cfg.output_dim, h),
        "proj_out.bias": (cfg.output_dim,),
        "norm_out.weight": (cfg.output_dim,),
        "norm_out.bias": (cfg.output_dim,),
        "time_embedding.linear_1.weight": (h, cfg.timestep_in_dim),
        "time_embedding.linear_1.bias": (h,),
        "time_embedding.linear_2.weight": (h, h),
        "time_embedding.linear_2.bias": (h,),
    }
    for i in range(cfg.depth):
        for name in ("0.norm1", "0.norm2", "1.0"):
            shapes[f"layers.{i}.{name}.weight"] = shapes[f"layers.{i}.{name}.bias"] = (h,)
        shapes |= {
            f"layers.{i}.0.to_q.weight": (inner, h),
            f"layers.{i}.0.to_kv.weight": (2 * inner, h),
            f"layers.{i}.0.to_out.weight": (h, inner),
            f"layers.{i}.1.1.weight": (ff, h),
            f"layers.{i}.1.3.weight": (h, ff),
            f"layers.{i}.2.1.weight": (4 * h, h),
            f"layers.{i}.2.1.bias": (4 * h,),
        }
    state = {}
    for key, shape in shapes.items():
        t = torch.randn(shape, generator=g)
        if key.endswith("norm1.weight") or key.endswith("norm2.weight") or key.endswith("1.0.weight"):
            t = 1 + 0.2 * t  # LayerNorm gains near 1, each different
        elif len(shape) == 2:
            t = t / shape[1] ** 0.5
        else:
            t = 0.1 * t
        state[key] = t
    return state


def reference(cfg: TimeResamplerConfig, state: dict[str, torch.Tensor], monkeypatch) -> torch.nn.Module:
    """diffusers' own converter + class; its converter fixes depth 4 and ffn_ratio 4, so patch those in."""
    cls = partial(IPAdapterTimeImageProjection, depth=cfg.depth, ffn_ratio=cfg.ff_mult)
    monkeypatch.setattr(transformer_sd3, "IPAdapterTimeImageProjection", cls)
    convert = transformer_sd3.SD3Transformer2DLoadersMixin._convert_ip_adapter_image_proj_to_diffusers
    return convert(None, dict(state), low_cpu_mem_usage=False).eval()  # self is unused on this path


def ours(cfg: TimeResamplerConfig, state: dict[str, torch.Tensor]) -> TimeResampler:
    model = TimeResampler(cfg).eval()
    model.load_state_dict(state, strict=True)
    return model


@pytest.mark.parametrize("cfg", [TINY, ODD], ids=["tiny", "odd"])
def test_matches_diffusers_reference(cfg: TimeResamplerConfig, monkeypatch) -> None:
    state = instantx_state(cfg)
    ref, model = reference(cfg, state, monkeypatch), ours(cfg, state)
    features = torch.randn(2, 7, cfg.embed_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        t = torch.tensor([999.0, 500.0])
        tokens, temb = model(features, t)
        ref_tokens, ref_temb = ref(features, t)
        assert tokens.shape == (2, cfg.num_queries, cfg.output_dim) and temb.shape == (2, cfg.hidden_dim)
        assert (tokens - ref_tokens).abs().max() < 1e-5
        assert (temb - ref_temb).abs().max() < 1e-5
        assert (tokens[0] - tokens[1]).abs().max() > 1e-2  # the two timesteps really differ

        # a 0-d timestep serves the whole batch; diffusers needs a 1-D one (and broadcasts its temb)
        tokens0, temb0 = model(features, torch.tensor(250.0))
        ref_tokens0, ref_temb0 = ref(features, torch.tensor([250.0]))
        assert temb0.shape == (2, cfg.hidden_dim)
        assert (tokens0 - ref_tokens0).abs().max() < 1e-5
        assert (temb0 - ref_temb0).abs().max() < 1e-5


def test_derives_config_from_shapes() -> None:
    assert time_resampler_config(instantx_state(TINY)) == TINY
    assert time_resampler_config(instantx_state(ODD)) == ODD
    official = TimeResamplerConfig(1152, 1280, 2432, depth=4, heads=20, num_queries=64, timestep_in_dim=320)
    with torch.device("meta"):  # shapes only: no 400 MB of weights
        assert time_resampler_config(TimeResampler(official).state_dict()) == official
    assert sorted(TimeResampler(TINY).state_dict()) == sorted(instantx_state(TINY))


@pytest.mark.parametrize(
    ("key", "shape", "named"),
    [
        ("layers.1.0.to_kv.weight", (100, 64), "layers.1.0.to_kv.weight"),
        ("layers.0.0.to_q.weight", (96, 64), "layers.0.0.to_q.weight"),  # not a multiple of 64
        ("norm_out.bias", (127,), "norm_out.bias"),
    ],
)
def test_inconsistent_state_raises_naming_the_key(key: str, shape: tuple[int, ...], named: str) -> None:
    state = instantx_state(TINY)
    state[key] = torch.zeros(shape)
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")) as info:
        time_resampler_config(state)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("rows", [48, 32])  # 48: FF rows 256 no longer divide; 32: latents no longer chain
def test_proj_in_width_mismatch_is_named(rows: int) -> None:
    state = instantx_state(TINY)
    state["proj_in.weight"] = torch.zeros(rows, 24)
    with pytest.raises(CheckpointError, match=rf"'proj_in\.weight' \[{rows}, 24\]"):
        time_resampler_config(state)


def test_missing_and_unexpected_keys_raise() -> None:
    state = instantx_state(TINY)
    del state["layers.2.1.3.weight"]
    with pytest.raises(CheckpointError, match=r"layers\.2\.1\.3\.weight.*missing"):
        time_resampler_config(state)
    state = instantx_state(TINY) | {"layers.0.0.to_k.weight": torch.zeros(64, 64)}
    with pytest.raises(CheckpointError, match=r"unexpected.*layers\.0\.0\.to_k\.weight"):
        time_resampler_config(state)


def test_timestep_batch_mismatch_fails_loudly() -> None:
    model = TimeResampler(TINY)
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 3, 24), torch.tensor([1.0, 2.0, 3.0]))


def test_fullgraph_traces_once_for_new_timesteps() -> None:
    """No graph break (fullgraph) and a new timestep value recompiles nothing (fast: a counting backend)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model = ours(TINY, instantx_state(TINY))
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    features = torch.randn(2, 7, 24)
    with torch.no_grad():
        for t in (torch.tensor([999.0, 500.0]), torch.tensor([10.0, 1.0]), torch.tensor([3.0, 700.0])):
            tokens, _ = compiled(features, t)
            assert (tokens - model(features, t)[0]).abs().max() < 1e-6
    assert counter.frame_count == 1


@pytest.mark.slow  # inductor on CPU: ~15 s
@pytest.mark.heavy
def test_compiled_fullgraph_gives_same_values() -> None:
    torch._dynamo.reset()
    model = ours(TINY, instantx_state(TINY))
    compiled = torch.compile(model, fullgraph=True)
    features = torch.randn(2, 7, 24, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for t in (torch.tensor([999.0, 500.0]), torch.tensor([10.0, 1.0])):
            (tokens, temb), (ref_tokens, ref_temb) = compiled(features, t), model(features, t)
            assert (tokens - ref_tokens).abs().max() < 1e-5
            assert (temb - ref_temb).abs().max() < 1e-5
