"""`ipadapter generate` with fine control flags, `--recipe` files and `ipadapter embed`: same pixels as the
Python API, and one clear line for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tiny_models as tm
from helpers import ckpt, fails, load_pipe, png_pixels, reference_image, run
from PIL import Image

from ipadapter import Control, Reference, apply, attach
from ipadapter.cli import main
from ipadapter.prompt.recipe import Recipe


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("control")
    out = {name: folder / f"{name}.png" for name in ("a", "b", "neg", "left", "right", "black", "wide")}
    reference_image().save(out["a"])
    reference_image(seed=4).save(out["b"])
    reference_image(seed=9).save(out["neg"])
    reference_image(seed=3, size=(96, 32)).save(out["wide"])
    for side in ("left", "right"):
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 16, 32) if side == "left" else (16, 0, 32, 32))
        mask.save(out[side])
    Image.new("L", (32, 32), 0).save(out["black"])
    return out


def argv(models: dict, out: Path, *extra: str, adapter: bool = True, variant: str = "sd15") -> list[str]:
    head = ["generate", "--base", str(models["sd15"])]
    if adapter:
        head += ["--adapter", ckpt(models, variant)]
    return [*head, "--prompt", "a cat", "--negative-prompt", "blurry", "--steps", "3", "--seed", "0",
            "--width", "32", "--height", "32", "--output", str(out), *extra]  # fmt: skip


def api(target, control=None, **kwargs) -> np.ndarray:  # noqa: ANN001
    call = {"prompt": "a cat", "negative_prompt": "blurry", "num_inference_steps": 3, "height": 32, "width": 32,
            "output_type": "pil", **kwargs}  # fmt: skip
    images = run(target, control, **call) if control is not None else run(target, **call)
    return np.asarray(images[0], dtype=np.int16)


def test_flags_give_the_same_pixels_as_the_python_api(models: dict, files: dict, tmp_path: Path) -> None:
    out = tmp_path / "o.png"
    flags = ["--image", f"{files['a']}:1.0", "--image", f"{files['b']}:0.5", "--combine", "average",
             "--negative-image", str(files["neg"]), "--layer-weights", "t1=1,t3=0.5", "--curve", "ease-out",
             "--start", "0.1", "--end", "0.9", "--scale", "0.8"]  # fmt: skip
    assert main(argv(models, out, *flags)) == 0
    ip = attach(load_pipe(models, "sd15"), ckpt(models), scale=0.8)
    control = Control(images=[Reference(files["a"]), Reference(files["b"], weight=0.5)], combine="average",
                      negative_image=files["neg"], layer_weights={"t1": 1, "t3": 0.5}, curve="ease-out",
                      start=0.1, end=0.9)  # fmt: skip
    assert np.array_equal(png_pixels(out), api(ip, control))
    params = json.loads(Image.open(out).text["parameters"])
    assert params["recipe"]["adapter"][0]["combine"] == "average" and len(params["image_sha1"]) == 2


def test_masks_and_crop_flags(models: dict, files: dict, tmp_path: Path) -> None:
    out = tmp_path / "m.png"
    flags = ["--image", str(files["a"]), "--image", str(files["wide"]), "--image-mask", str(files["left"]),
             "--image-mask", str(files["right"]), "--crop", "pad", "--scale", "0.7"]  # fmt: skip
    assert main(argv(models, out, *flags)) == 0
    ip = attach(load_pipe(models, "sd15"), ckpt(models), scale=0.7)
    control = Control(images=[Reference(files["a"], mask=files["left"], crop="pad"),
                              Reference(files["wide"], mask=files["right"], crop="pad")])  # fmt: skip
    assert np.array_equal(png_pixels(out), api(ip, control))


def test_recipe_file_with_two_adapters(models: dict, files: dict, tmp_path: Path) -> None:
    recipe = tmp_path / "ip.toml"
    recipe.write_text(f"""
[[adapter]]
path = "{ckpt(models)}"
scale = 0.7
preset = "style"

  [[adapter.image]]
  path = "{files["a"].name}"

[[adapter]]
path = "{ckpt(models, "plus_sd15")}"
scale = 0.5
end = 0.6
image = ["{files["b"].name}"]
""")
    (tmp_path / files["a"].name).write_bytes(files["a"].read_bytes())  # relative to the recipe's folder
    (tmp_path / files["b"].name).write_bytes(files["b"].read_bytes())
    out = tmp_path / "r.png"
    # the tiny UNet has 7 transformer blocks: presets are for SD1.5 / SDXL layouts
    _fails_msg = main(argv(models, out, "--recipe", str(recipe), adapter=False))
    assert _fails_msg == 2 and not out.exists()
    recipe.write_text(
        recipe.read_text().replace('preset = "style"', "layer_weights = { t0 = 1.0, t6 = 0.5 }")
    )
    assert main(argv(models, out, "--recipe", str(recipe), adapter=False)) == 0
    runner = apply(load_pipe(models, "sd15"), Recipe.load(recipe))
    assert np.array_equal(png_pixels(out), api(lambda **kw: runner(**kw)))


def embed(models: dict, image: Path, out: Path, variant: str = "plus_sd15", *extra: str) -> int:
    return main(
        ["embed", "--adapter", ckpt(models, variant), "--image", str(image), "--output", str(out), *extra]
    )


def test_embed_then_embeds_gives_the_image_s_pixels(
    models: dict, files: dict, tmp_path: Path, capsys
) -> None:
    emb = tmp_path / "a.safetensors"
    assert embed(models, files["a"], emb) == 0
    from_image, from_file = tmp_path / "i.png", tmp_path / "e.png"
    assert main(argv(models, from_image, "--image", str(files["a"]), variant="plus_sd15")) == 0
    assert main(argv(models, from_file, "--embeds", str(emb), variant="plus_sd15")) == 0
    assert np.array_equal(png_pixels(from_image), png_pixels(from_file))
    capsys.readouterr()  # the runs' progress bars
    # the embeddings of one encoder serve no adapter of another kind or encoder
    fails(capsys, argv(models, tmp_path / "x.png", "--embeds", str(emb)), "hidden states", "pooled")
    other = tm.build_encoder(tmp_path / "other_encoder", tm.VIT_H, seed=5)  # same dims, other weights
    fails(capsys, argv(models, tmp_path / "x.png", "--embeds", str(emb), "--image-encoder", str(other),
                        variant="plus_sd15"), "a.safetensors", "not the encoder")  # fmt: skip
    assert embed(models, files["a"], emb, "sd15") == 2 and "exists" in capsys.readouterr().err
    fails(
        capsys,
        argv(models, tmp_path / "x.png", "--embeds", ckpt(models)),  # an adapter file, not embeddings
        "not an ipadapter embeddings file",
    )


def test_embeddings_skip_the_encoder(models: dict, files: dict, tmp_path: Path) -> None:
    emb = tmp_path / "b.safetensors"
    assert embed(models, files["b"], emb) == 0
    ip = attach(load_pipe(models, "sd15"), ckpt(models, "plus_sd15"))
    runs: list[int] = []
    ip.encoder.model.register_forward_pre_hook(lambda *a: runs.append(1))
    from_file = api(ip, Control(images=[Reference(embeds=emb)]))
    assert runs == []  # neither the reference nor the negative input went through the encoder
    assert np.array_equal(from_file, api(ip, Control(images=[files["b"]])))


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--layer-weights", "t3:0.5"], ["t3:0.5", "t3=0.5"]),
        (["--layer-weights", "t9=1"], ["t9", "t0"]),
        (["--preset", "painterly"], ["painterly", "style+composition"]),
        (["--curve", "wobbly"], ["wobbly", "ease-in-out"]),
        (["--combine", "max"], ["max", "norm-average"]),
        (["--start", "0.9", "--end", "0.1"], ["--start 0.9 --end 0.1", "0 <= start < end <= 1"]),
        (["--end", "1.5"], ["--end is 1.5", "[0, 1]"]),
        (["--image-mask", "{left}", "--image-mask", "{right}"], ["2 image masks for 1 reference"]),
        (["--image-mask", "{black}"], ["empty"]),
        (["--combine", "subtract"], ["subtract", "2"]),
        (["--image", "{b}:nan"], ["weight"]),
        (
            ["--image-mask", "{left}", "--image", "{b}", "--image-mask", "{right}", "--combine", "average"],
            ["concat"],
        ),
    ],
)
def test_bad_control_input_is_one_line(
    models: dict, files: dict, tmp_path: Path, capsys, extra, needles
) -> None:  # noqa: ANN001
    extra = [e.format(**{k: str(v) for k, v in files.items()}) for e in extra]
    fails(capsys, argv(models, tmp_path / "x.png", "--image", str(files["a"]), *extra), *needles)
    assert not (tmp_path / "x.png").exists()


def test_bad_recipe_files(models: dict, files: dict, tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text(f'[[adapter]]\npath = "{ckpt(models)}"\nscael = 0.5\nimage = ["{files["a"]}"]\n')
    fails(
        capsys, argv(models, tmp_path / "x.png", "--recipe", str(recipe), adapter=False), "scael", "bad.toml"
    )
    recipe.write_text(f'[[adapter]]\npath = "{ckpt(models)}"\nimage = ["{tmp_path / "gone.png"}"]\n')
    fails(capsys, argv(models, tmp_path / "x.png", "--recipe", str(recipe), adapter=False), "gone.png")
    fails(capsys, argv(models, tmp_path / "x.png", "--recipe", str(recipe)), "--recipe replaces", "--adapter")
    fails(capsys, argv(models, tmp_path / "x.png"), "no reference")


def test_video_combines_references_for_every_frame(models: dict, files: dict, tmp_path: Path) -> None:
    base = ["video", "--base", str(models["sd15"]), "--adapter", ckpt(models), "--motion-adapter",
            str(models["motion"]), "--frames", "2", "--steps", "2", "--seed", "0", "--width", "32", "--height", "32"]  # fmt: skip
    per_frame, combined = tmp_path / "f.gif", tmp_path / "c.gif"
    assert (
        main([*base, "--image", str(files["a"]), "--image", str(files["b"]), "--output", str(per_frame)]) == 0
    )
    flags = ["--image", str(files["a"]), "--image", str(files["b"]), "--combine", "average", "--end", "0.9"]
    assert main([*base, *flags, "--output", str(combined), "--json"]) == 0
    a, b = (np.asarray(Image.open(p).convert("RGB"), dtype=np.int16) for p in (per_frame, combined))
    assert a.shape == b.shape and np.abs(a - b).max() > 0
