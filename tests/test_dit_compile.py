"""torch.compile with DiT adapters attached (XLabs Flux, InstantX Flux, InstantX SD3.5; DESIGN.md §1, §3.5).

For each adapter and each idiom (``pipe.transformer = torch.compile(...)``, ``pipe.transformer.compile(...)`` and
regional compilation, the repeated blocks one by one), with ``fullgraph=True`` and the ``aot_eager`` backend: compiled output equals eager within 1e-3, and a later call
with the same shapes but another reference, scale, step window or negative image makes no new graph. The
mechanisms special to the DiT hosts are exercised under compile: Flux's true CFG (a second transformer call per
step, told apart by a timestep kept in a tensor, with the negative image tokens chosen by ``torch.where``),
XLabs' third attention output, SD3's time-conditioned resampler run in the pre-hook, and two adapters at once.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

import dit_checkpoints as dc  # noqa: E402
import dit_models as dm  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tiny_models as tm  # noqa: E402
import torch  # noqa: E402
from helpers import reference_image  # noqa: E402
from torch._dynamo.utils import counters  # noqa: E402

import ipadapter  # noqa: E402
from ipadapter.pipelines import load_pipeline  # noqa: E402
from ipadapter.prompt.recipe import Control, Reference  # noqa: E402

pytestmark = pytest.mark.heavy  # every test here compiles
TOL = 1e-3  # compiled vs eager, float32, output_type="np"
CALL = dict(prompt="a red cube", height=32, width=32, num_inference_steps=3, max_sequence_length=16, output_type="np")  # fmt: skip
TRUE_CFG = dict(negative_prompt="blurry", true_cfg_scale=3.0)  # Flux: two transformer calls per step
ADAPTERS = {  # name -> (family folder, checkpoint, encoder)
    "xlabs": ("flux", "xlabs", "clip"),
    "instantx_flux": ("flux", "instantx_flux", "siglip"),
    "instantx_sd3": ("sd3", "instantx_sd3", "siglip"),
}


@pytest.fixture(scope="module")
def dit(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("dit_compile")
    out = {
        "flux": dm.build_flux(root / "flux"),
        "sd3": dm.build_sd3(root / "sd3"),
        "clip": tm.build_encoder(root / "clip", tm.VIT_H, seed=1),
        "siglip": dc.build_siglip(root / "siglip"),
    }
    (root / "ckpt").mkdir()
    out["xlabs"] = dc.xlabs_flux(root / "ckpt" / "xlabs.safetensors")
    out["instantx_flux"] = dc.instantx_flux(root / "ckpt" / "ip-adapter.bin")
    out["instantx_sd3"] = dc.instantx_sd3(root / "ckpt" / "sd3-ip-adapter.safetensors")
    return out


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def compile_transformer(pipe: Any, idiom: str) -> None:
    """The ways users compile a denoiser, all with fullgraph=True (a graph break is an error): the whole model
    wrapped or in place, or its repeated blocks one by one (regional compilation; diffusers'
    ``compile_repeated_blocks`` where the model declares its blocks, as Flux does, else each block by hand)."""
    options = dict(fullgraph=True, backend="aot_eager")
    model = pipe.transformer
    if idiom == "wrap":
        pipe.transformer = torch.compile(model, **options)
    elif idiom == "inplace":
        model.compile(**options)
    elif getattr(model, "_repeated_blocks", None):
        model.compile_repeated_blocks(**options)
    else:
        for block in model.transformer_blocks:
            block.compile(**options)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def check_compiled(
    pipe: Any, calls: list[Callable[[], np.ndarray]], idiom: str
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Run ``calls`` eagerly, compile, run them again: equal within TOL, no graph break, and no graph made after
    the first call (every later call differs from it in values only). Returns (eager, compiled) outputs."""
    eager = [call() for call in calls]
    torch._dynamo.reset()
    counters.clear()
    compile_transformer(pipe, idiom)
    got = [calls[0]()]
    made = graphs()
    assert made >= 1
    for i, call in enumerate(calls[1:], start=1):
        got.append(call())
        assert graphs() == made, f"call {i}: other values, same shapes, but a new graph"
    assert not counters["graph_break"], dict(counters["graph_break"])
    for i, (a, b) in enumerate(zip(got, eager, strict=True)):
        assert np.abs(a - b).max() <= TOL, f"call {i}: compiled differs from eager by {np.abs(a - b).max()}"
    return eager, got


def _attach(dit: dict, key: str, **kw: Any) -> tuple[Any, Any]:
    family, ckpt, encoder = ADAPTERS[key]
    pipe = load_pipeline(dit[family])
    pipe.set_progress_bar_config(disable=True)
    return pipe, ipadapter.attach(pipe, dit[ckpt], dit[encoder], **kw)


def _images(out: Any) -> np.ndarray:
    return np.asarray(out.images, dtype=np.float32)


@pytest.mark.parametrize("idiom", ["wrap", "inplace", "regional"])
@pytest.mark.parametrize("key", ["xlabs", "instantx_flux", "instantx_sd3"])
def test_each_dit_adapter_compiles_once_and_equals_eager(dit: dict, key: str, idiom: str) -> None:
    pipe, ip = _attach(dit, key, scale=0.7)
    flux = ADAPTERS[key][0] == "flux"
    kw = {**CALL} if flux else {**CALL, "guidance_scale": 4.0}  # SD3: batched CFG, negatives first
    a, b, n1, n2 = (reference_image(seed=s) for s in (0, 4, 7, 8))

    def plain(ref: Any, scale: float, **extra: Any) -> Callable[[], np.ndarray]:
        def call() -> np.ndarray:
            ip.set_scale(scale)
            return _images(ip(ref, **{**kw, **extra}, generator=_gen()))

        return call

    def control(**options: Any) -> Callable[[], np.ndarray]:
        cfg = options.pop("cfg", False)
        ctl = Control(**options)
        extra = TRUE_CFG if cfg else {}
        return lambda: _images(ipadapter.run(pipe, [(ip, ctl)], **kw, **extra, generator=_gen()))

    calls = [
        plain(a, 0.7),
        plain(b, 0.3, prompt="a blue sphere"),  # another reference, scale and prompt
        # step windows (3 steps; progress 0, 1/3, 2/3 on Flux, 0, 0.25, 0.99 on SD3): only the window differs
        control(images=[Reference(path=a)], scale=0.7, start=0.2, end=0.8),
        control(images=[Reference(path=a)], scale=0.7, start=0.0, end=0.5),
        control(images=[a], scale=0.7, layer_weights={"t0": 0.3, "t1": 1.5}),  # per-block weights
        control(images=[a], negative_image=n1, scale=0.8, cfg=flux),  # a negative image (Flux: true CFG)
        control(images=[a], negative_image=n2, scale=0.8, cfg=flux),  # only the negative image differs
        plain(a, 0.0),  # scale 0
    ]
    if flux:
        calls.append(plain(b, 0.6, **TRUE_CFG))  # true CFG, the default (black) negative image
    eager, got = check_compiled(pipe, calls, idiom)
    # the new values reached the compiled graph: reference and scale, the window (vs the whole run and vs
    # another window), block weights, the negative image (Flux: the tokens of the negative call)
    for i, j in ((0, 1), (2, 3), (0, 2), (0, 4), (5, 6)):
        assert np.abs(got[i] - got[j]).max() > 1e-3, (i, j)
    ip.set_scale(0.7)
    # scale 0: bit-identical to the model without adapter in eager mode, within TOL compiled
    compile_free = load_pipeline(dit[ADAPTERS[key][0]])
    compile_free.set_progress_bar_config(disable=True)
    base = _images(compile_free(**kw, generator=_gen()))
    assert np.array_equal(eager[7], base)
    assert np.abs(got[7] - base).max() <= TOL


@pytest.mark.parametrize("idiom", ["wrap", "inplace", "regional"])
def test_two_flux_adapters_at_once_with_true_cfg(dit: dict, idiom: str) -> None:
    """XLabs (output handed to the block) and InstantX (added before to_out) in one compiled transformer."""
    pipe, xlabs = _attach(dit, "xlabs", name="xlabs")
    instantx = ipadapter.attach(pipe, dit["instantx_flux"], dit["siglip"], name="instantx")
    a, b, n1, n2 = (reference_image(seed=s) for s in (0, 4, 7, 8))

    def both(x: Any, y: Any, sx: float, sy: float, start: float, negative: Any, **extra: Any) -> Callable[[], np.ndarray]:  # fmt: skip
        entries = [
            (xlabs, Control(images=[Reference(path=x)], scale=sx, negative_image=negative)),
            (instantx, Control(images=[Reference(path=y)], scale=sy, start=start, end=1.0)),
        ]
        return lambda: _images(ipadapter.run(pipe, entries, **CALL, **extra, generator=_gen()))

    calls = [
        both(a, b, 0.7, 1.5, 0.0, None),
        both(b, a, 0.4, 0.8, 0.3, None),
        both(a, b, 0.7, 1.5, 0.0, n1, **TRUE_CFG),
        both(a, b, 0.7, 1.5, 0.0, n2, **TRUE_CFG),
        both(a, a, 0.0, 0.0, 0.5, n1, **TRUE_CFG),
    ]
    _, got = check_compiled(pipe, calls, idiom)
    assert np.abs(got[0] - got[1]).max() > 1e-3
    assert np.abs(got[2] - got[3]).max() > 1e-3
