"""torch.compile with adapters attached (issue 15): fullgraph works in both idioms, before or after attach, for
every variant, control and mode; compiled output equals eager; a later call with the same shapes but another
reference, scale, block weights, window, mask, negative image or prompt makes no new graph.

Most cases compile with the ``aot_eager`` backend (dynamo's tracing and AOT autograd, the parts that break or
recompile; a few seconds on the tiny models); one case runs inductor, the default backend, end to end.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import b64_png, ckpt, half_mask, load_pipe, mode_setup, reference_image, run, sixteen_block_pipe
from PIL import Image
from torch._dynamo.utils import counters

from ipadapter import InputError, attach
from ipadapter.adapter import run as run_adapters
from ipadapter.batch import run_batch
from ipadapter.cli import main
from ipadapter.jobs import engine as engine_module
from ipadapter.jobs.engine import Engine
from ipadapter.jobs.job import Job
from ipadapter.prompt.embeds import save_embeds
from ipadapter.prompt.recipe import AdapterRecipe, Control, Recipe, Reference
from ipadapter.server import ServerConfig, create_app

pytestmark = pytest.mark.heavy  # every test here compiles
TOL = 1e-3  # compiled vs eager, float32, output_type="np"


def compile_unet(pipe: Any, idiom: str, backend: str = "aot_eager") -> None:
    """The two ways users compile a denoiser, both with fullgraph=True (a graph break is an error)."""
    if idiom == "wrap":
        pipe.unet = torch.compile(pipe.unet, fullgraph=True, backend=backend)
    else:
        pipe.unet.compile(fullgraph=True, backend=backend)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def check_compiled(
    pipe: Any,
    calls: list[Callable[[], np.ndarray]],
    idiom: str = "wrap",
    before: Callable[[], Any] | None = None,
) -> list[np.ndarray]:
    """Run ``calls`` eagerly, compile, run them again: equal within TOL, no graph break, and no graph made
    after the first call (every later call differs from it in values only).

    ``before``: attach the adapters after compiling (the other calls' order: attach, then compile).
    """
    eager = [call() for call in calls] if before is None else None
    torch._dynamo.reset()
    counters.clear()
    compile_unet(pipe, idiom)
    if before is not None:
        before()
        eager = None
    got = [calls[0]()]
    made = graphs()
    assert made >= 1
    got += [call() for call in calls[1:]]
    assert graphs() == made, "a call with other values but the same shapes compiled a new graph"
    assert not counters["graph_break"], dict(counters["graph_break"])
    if eager is not None:
        for i, (a, b) in enumerate(zip(got, eager, strict=True)):
            assert np.abs(a - b).max() <= TOL, (
                f"call {i}: compiled differs from eager by {np.abs(a - b).max()}"
            )
    return got


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def everything(a: Image.Image, b: Image.Image, neg_seed: int = 9, end: float = 0.9) -> Control:
    """Every per-call control at once: weighted masked references, a window, block weights, a negative image."""
    return Control(images=[Reference(a, mask=half_mask("left")), Reference(b, weight=0.5, mask=half_mask("right"))],
                   start=0.1, end=end, layer_weights={"t0": 1.0, "t2": 0.5}, negative_image=reference_image(neg_seed),
                   scale=0.7)  # fmt: skip


def other_values(a: Image.Image, b: Image.Image) -> Control:
    """The same structure as :func:`everything` with every value changed (the mask content too)."""
    top = Image.new("L", (32, 32), 0)
    top.paste(255, (0, 0, 32, 12))
    return Control(images=[Reference(b, weight=0.8, mask=top), Reference(a, weight=1.3, mask=half_mask("left"))],
                   start=0.0, end=0.6, layer_weights={"t1": 0.3, "t3": 1.5}, preset=None,
                   negative_image=reference_image(11), scale=0.4)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Variants, idioms, before / after attach


@pytest.mark.parametrize(
    ("variant", "idiom", "after"),
    [
        ("sd15", "wrap", True),
        ("sd15", "inplace", True),
        ("plus_sd15", "wrap", False),
        ("full-face_sd15", "inplace", False),
        ("plus_sdxl_vit-h", "wrap", True),
    ],
)
def test_each_variant_compiles_fullgraph_and_a_new_reference_or_scale_recompiles_nothing(
    models: dict, variant: str, idiom: str, after: bool
) -> None:
    base = "sdxl" if "sdxl" in variant else "sd15"
    pipe = load_pipe(models, base)
    a, b = reference_image(), reference_image(seed=4)
    holder: dict[str, Any] = {}

    def attach_it() -> None:
        holder["ip"] = attach(pipe, ckpt(models, variant), scale=0.7)

    def first() -> np.ndarray:
        holder["ip"].scale = 0.7
        return run(holder["ip"], a)

    def second() -> np.ndarray:  # another reference, scale and prompt
        holder["ip"].scale = 0.3
        return run(holder["ip"], b, prompt="a dog on a hill", negative_prompt="dark")

    def third() -> np.ndarray:  # one reference through a Control: the same graph as a plain reference
        return run(holder["ip"], Control(images=[b], end=0.8, layer_weights={"t1": 0.5}, scale=0.9))

    if after:
        attach_it()
        check_compiled(pipe, [first, second, third], idiom)
    else:
        got = check_compiled(pipe, [first, second, third], idiom, before=attach_it)
        # compiled before attaching: compare with the same calls on a fresh eager pipeline
        eager_pipe = load_pipe(models, base)
        holder["ip"] = attach(eager_pipe, ckpt(models, variant))
        assert np.abs(got[0] - first()).max() <= TOL and np.abs(got[1] - second()).max() <= TOL


def test_every_control_changes_values_without_a_new_graph(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, ckpt(models, "plus_sd15"))
    a, b, c = reference_image(), reference_image(seed=4), reference_image(seed=5)
    got = check_compiled(
        pipe,
        [
            lambda: run(ip, everything(a, b), num_inference_steps=3),
            lambda: run(ip, other_values(c, a), num_inference_steps=3, prompt="a red house"),
            lambda: run(ip, dataclasses.replace(everything(b, c), scale=0.0), num_inference_steps=3),
        ],
    )  # fmt: skip
    plain = run(pipe, num_inference_steps=3)
    assert np.abs(got[0] - got[1]).max() > 1e-3  # the values did reach the compiled graph
    assert np.abs(got[2] - plain).max() <= TOL  # scale 0 under compile: the plain model


@pytest.mark.parametrize("combine", ["concat", "average", "norm-average", "add", "subtract"])
def test_each_combine_mode_compiles_once(models: dict, combine: str) -> None:
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, ckpt(models, "sd15"))
    a, b, c = reference_image(), reference_image(seed=4), reference_image(seed=5)
    check_compiled(
        pipe,
        [
            lambda: run(ip, Control(images=[a, Reference(b, weight=0.5)], combine=combine, scale=0.8)),
            lambda: run(ip, Control(images=[Reference(c, weight=1.5), a], combine=combine, scale=0.6)),
        ],
    )


def test_two_adapters_at_once(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    basic = attach(pipe, ckpt(models, "sd15"), name="basic")
    plus = attach(pipe, ckpt(models, "plus_sd15"), name="plus")
    a, b = reference_image(), reference_image(seed=4)

    def both(x: Image.Image, y: Image.Image, s: float) -> np.ndarray:
        out = run_adapters(pipe, [(basic, Control(images=[x], scale=s)), (plus, Control(images=[y], end=s))],
                           generator=torch.Generator().manual_seed(0), prompt="a cat", num_inference_steps=2,
                           height=32, width=32, output_type="np")  # fmt: skip
        return out.images

    check_compiled(pipe, [lambda: both(a, b, 0.7), lambda: both(b, a, 0.4)])


def test_embeddings_files(models: dict, tmp_path: Path) -> None:
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, ckpt(models, "plus_sd15"), scale=0.6)
    paths = []
    for seed in (0, 4):
        image = reference_image(seed=seed)
        feats = ip.encoder.features([image], ip.spec.feature)[0]
        path = tmp_path / f"e{seed}.safetensors"
        save_embeds(path, feats, ip.encoder.negative_features(ip.spec.feature), feature=ip.spec.feature,
                    encoder=ip.encoder, encoder_name="tiny", crop="center", variant="plus", image_sha1=str(seed))  # fmt: skip
        paths.append(path)
    got = check_compiled(pipe, [lambda p=p: run(ip, Control(images=[Reference(embeds=p)])) for p in paths])
    assert np.abs(got[0] - got[1]).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Modes


@pytest.mark.parametrize("mode", ["img2img", "inpaint", "controlnet", "video"])
def test_every_mode_compiles_with_every_control(models: dict, mode: str) -> None:
    pipe, extra = mode_setup(models, "sd15", mode)
    ip = attach(pipe, ckpt(models, "sd15"))
    a, b, c = reference_image(), reference_image(seed=4), reference_image(seed=5)
    check_compiled(
        pipe,
        [lambda: run(ip, everything(a, b), **extra), lambda: run(ip, other_values(c, a), **extra)],
        idiom="inplace" if mode == "video" else "wrap",
    )


def test_per_frame_references_compile(models: dict) -> None:
    pipe, extra = mode_setup(models, "sd15", "video")
    ip = attach(pipe, ckpt(models, "sd15"), scale=0.8)
    a, b, c = reference_image(), reference_image(seed=4), reference_image(seed=5)
    check_compiled(pipe, [lambda: run(ip, [a, b], **extra), lambda: run(ip, [c, a], **extra)])


# ---------------------------------------------------------------------------------------------------------
# Inductor end to end, and what does recompile


def test_inductor_equals_eager_and_detach_restores_the_plain_model(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, ckpt(models, "plus_sd15"))
    a, b = reference_image(), reference_image(seed=4)
    eager = [run(ip, everything(a, b)), run(ip, other_values(b, a))]
    counters.clear()
    pipe.unet = torch.compile(pipe.unet, fullgraph=True)  # inductor, the default backend
    got = [run(ip, everything(a, b))]
    made = graphs()
    got.append(run(ip, other_values(b, a)))
    assert graphs() == made and not counters["graph_break"]
    for x, y in zip(got, eager, strict=True):
        assert np.abs(x - y).max() <= TOL
    ip.detach()
    plain_eager = run(load_pipe(models, "sd15"))
    assert np.abs(run(pipe) - plain_eager).max() <= TOL


def test_a_new_size_or_reference_count_is_a_new_graph_and_still_right(models: dict) -> None:
    """What does recompile (README): a new output size, and another number of references or adapters."""
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, ckpt(models, "sd15"), scale=0.7)
    a, b = reference_image(), reference_image(seed=4)
    eager_wide = run(ip, a, width=48)
    eager_two = run(ip, Control(images=[a, b]))
    compile_unet(pipe, "wrap")
    counters.clear()
    run(ip, a)
    made = graphs()
    assert np.abs(run(ip, a, width=48) - eager_wide).max() <= TOL
    assert graphs() > made
    made = graphs()
    assert np.abs(run(ip, Control(images=[a, b])) - eager_two).max() <= TOL
    assert graphs() > made


def test_a_mask_prepared_for_another_size_is_refused_under_compile(models: dict) -> None:
    """A prompt built by hand for the default size, run at another: eager adapts, compiled says what to do."""
    pipe = load_pipe(models, "sd15")
    ip = attach(pipe, ckpt(models, "sd15"))
    control = Control(images=[Reference(reference_image(), mask=half_mask("left", 48))])
    prompt = ip.image_prompt(control)  # prepared for 32 x 32
    eager = run(pipe, cross_attention_kwargs={"image_prompt": prompt}, width=48)
    assert eager.shape == (1, 32, 48, 3)
    compile_unet(pipe, "wrap")
    with pytest.raises(Exception, match=r"output_size=\(height, width\)"):
        run(pipe, cross_attention_kwargs={"image_prompt": ip.image_prompt(control)}, width=48)
    ready = ip.image_prompt(control, output_size=(32, 48))
    assert np.abs(run(pipe, cross_attention_kwargs={"image_prompt": ready}, width=48) - eager).max() <= TOL


# ---------------------------------------------------------------------------------------------------------
# Front ends: --compile on the command line, batch and the server (the Engine compiles each denoiser once)


@pytest.fixture
def quick_compile(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Engine's compile options with the aot_eager backend (inductor is tested above)."""
    monkeypatch.setitem(engine_module.COMPILE_OPTIONS, "backend", "aot_eager")


def test_engine_compiles_each_denoiser_once_and_jobs_reuse_it(models: dict, quick_compile: None) -> None:
    adapter = str(models["ckpt"]["sd15", "safetensors"])
    a, b = reference_image(), reference_image(seed=4)

    def job(ref: Image.Image, scale: float, **kw: Any) -> Job:
        recipe = Recipe([AdapterRecipe(path=adapter, scale=scale, images=[Reference(ref)])])
        return Job(
            base=str(models["sd15"]),
            recipe=recipe,
            prompt="a cat",
            steps=2,
            width=32,
            height=32,
            seed=0,
            **kw,
        )

    eager = Engine("cpu")
    expected = [np.asarray(eager.run(job(a, 0.7)).images[0]), np.asarray(eager.run(job(b, 0.4)).images[0])]
    notices: list[str] = []
    engine = Engine("cpu", compile=True, notice=notices.append)
    counters.clear()
    first = np.asarray(engine.run(job(a, 0.7)).images[0])
    made = graphs()
    second = np.asarray(engine.run(job(b, 0.4)).images[0])
    assert graphs() == made and not counters["graph_break"]
    # img2img shares the compiled UNet; its latents come in another memory layout (one more graph, once)
    init = reference_image(7, (32, 32))
    engine.run(job(a, 0.5, mode="img2img", init=init, strength=0.8))
    made = graphs()
    engine.run(job(b, 0.9, mode="img2img", init=init, strength=0.8))
    assert graphs() == made and not counters["graph_break"]
    assert len(notices) == 1 and "compiling the denoiser" in notices[0]
    for got, want in zip((first, second), expected, strict=True):
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # PNG pixels: at most 1/255 apart
    with pytest.raises(InputError, match="one of --compile and --cpu-offload"):
        engine.run(job(a, 0.7, cpu_offload=True))


def test_generate_and_batch_take_compile(
    models: dict, tmp_path: Path, quick_compile: None, capsys: Any
) -> None:
    adapter = str(models["ckpt"]["sd15", "safetensors"])
    reference_image().save(tmp_path / "ref.png")
    args = ["generate", "--base", str(models["sd15"]), "--adapter", adapter, "--image", str(tmp_path / "ref.png"),
            "--prompt", "a cat", "--steps", "2", "--seed", "0", "--width", "32", "--height", "32", "--device", "cpu"]  # fmt: skip
    assert main([*args, "--output", str(tmp_path / "eager.png")]) == 0
    capsys.readouterr()
    assert main([*args, "--compile", "--output", str(tmp_path / "compiled.png")]) == 0
    err = capsys.readouterr().err
    assert err.count("compiling the denoiser") == 1
    eager, compiled = (
        np.asarray(Image.open(tmp_path / f"{n}.png"), dtype=int) for n in ("eager", "compiled")
    )
    assert np.abs(eager - compiled).max() <= 1
    line = {"base": str(models["sd15"]), "adapter": adapter, "image": "ref.png", "prompt": "a cat", "steps": 2, "width": 32,
            "height": 32, "seed": 0}  # fmt: skip
    (tmp_path / "jobs.jsonl").write_text(json.dumps(line) + "\n" + json.dumps({**line, "seed": 1}) + "\n")
    report = run_batch(tmp_path / "jobs.jsonl", tmp_path / "out", device="cpu", quiet=True, compile=True)
    assert report is not None and report["counts"] == {"done": 2, "failed": 0, "skipped": 0}
    assert np.abs(np.asarray(Image.open(tmp_path / "out" / "00001.png"), dtype=int) - eager).max() <= 1


@pytest.mark.parametrize("base", ["sd15", "sd15_inpaint"])  # an inpainting base warms up in its one mode
def test_the_server_warms_the_compiled_denoiser_up_at_start(
    models: dict, quick_compile: None, base: str
) -> None:
    config = ServerConfig(base=str(models[base]), adapters=[str(models["ckpt"]["sd15", "safetensors"])],
                          compile=True)  # fmt: skip
    counters.clear()
    engine = Engine("cpu", compile=True, notice=lambda _: None)
    app = create_app(config, engine)
    warmed = graphs()
    assert warmed >= 1  # compiled during start-up, before any request
    body = {"prompt": "a cat", "steps": 2, "seed": 0, "image": b64_png(reference_image())}
    if base == "sd15_inpaint":
        body.update(
            mode="inpaint", init=b64_png(reference_image(7, (32, 32))), mask=b64_png(half_mask("left"))
        )
    with TestClient(app) as client:
        response = client.post("/v1/generate", json=body)
    assert response.status_code == 200, response.text
    assert graphs() == warmed  # the first request of the native size compiled nothing


def test_presets_and_curves_change_block_weights_without_a_new_graph(models: dict, tmp_path: Path) -> None:
    """Presets need SD1.5's 16 transformer blocks: a tiny UNet of that topology, with an adapter that fits it."""
    pipe, path = sixteen_block_pipe(models, tmp_path)
    ip = attach(pipe, path, models["vit_h"])
    a, b = reference_image(), reference_image(seed=4)
    got = check_compiled(
        pipe,
        [
            lambda: run(ip, Control(images=[a], preset="style", scale=0.8)),
            lambda: run(ip, Control(images=[b], preset="composition", scale=0.8)),
            lambda: run(ip, Control(images=[a], preset="style+composition", composition_weight=0.4)),
            lambda: run(ip, Control(images=[a], curve="ease-in", layer_weights={"t3": 0.5})),
        ],
    )
    assert np.abs(got[0] - got[2]).max() > 1e-4  # the weights did reach the compiled graph


def test_issue_20_controls_compile_and_new_values_make_no_new_graph(models: dict, tmp_path: Path) -> None:
    """Embeds scaling, a precise preset with its boost, a composition image and unfolded references, each a
    structure of its own: compiled equals eager, and other values of that structure reuse the graph."""
    pipe, path = sixteen_block_pipe(models, tmp_path)
    ip = attach(pipe, path, models["vit_h"])
    a, b = reference_image(), reference_image(seed=4)
    structures = [
        [
            lambda: run(ip, Control(images=[a], embeds_scaling="K+mean(V) w/ C penalty", scale=0.8)),
            lambda: run(ip, Control(images=[b], embeds_scaling="K+mean(V) w/ C penalty", scale=0.5)),
        ],
        [
            lambda: run(ip, Control(images=[a], preset="style-precise", style_boost=1.0)),
            lambda: run(ip, Control(images=[b], preset="style-precise", style_boost=2.0, scale=0.6)),
        ],
        [
            lambda: run(ip, Control(images=[a], composition_image=b, composition_weight=0.7)),
            lambda: run(ip, Control(images=[b], composition_image=a, composition_weight=0.3)),
        ],
        [
            lambda: run(ip, Control(images=[a, Reference(b, weight=0.5)], unfold_batch=True), num_images_per_prompt=2),
            lambda: run(ip, Control(images=[Reference(b, weight=0.3), a], unfold_batch=True), num_images_per_prompt=2),
        ],
    ]  # fmt: skip
    for calls in structures:
        pipe.unet = ip.denoiser  # the plain UNet again: each structure compiles afresh
        got = check_compiled(pipe, calls)
        assert np.abs(got[0] - got[1]).max() > 1e-4  # the new values reached the compiled graph
