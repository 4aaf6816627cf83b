"""The recipe schema: TOML/JSON files, the Python dataclasses, validation messages, file checks."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from ipadapter.errors import InputError
from ipadapter.prompt.blocks import CURVE_NAMES, PRESET_NAMES
from ipadapter.prompt.recipe import COMBINE_MODES, CROP_MODES, AdapterRecipe, Control, Recipe, Reference

HUB = "h94/IP-Adapter/models/ip-adapter-plus_sd15.safetensors"

FULL_TOML = f"""
[[adapter]]
path = "{HUB}"
image_encoder = "h94/IP-Adapter/models/image_encoder"
scale = 0.7
combine = "concat"
start = 0.1
end = 0.8
preset = "style"
composition_weight = 0.5
layer_weights = {{ t4 = 1.0, 6 = 0.25 }}
curve = "ease-in"
negative_image = "neg.png"
  [[adapter.image]]
  path = "a.png"
  weight = 0.5
  mask = "left.png"
  crop = "pad"
  [[adapter.image]]
  embeds = "b.safetensors"

[[adapter]]
path = "mini"
combine = "average"
image = ["c.png", {{ path = "sub/d.png", weight = 2 }}]
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def minimal(**adapter: object) -> dict:
    """A valid recipe dict with ``adapter`` keys overriding the one adapter's."""
    entry = {"path": "mini", "image": [{"path": "a.png"}]}
    entry.update(adapter)
    return {"adapter": [entry]}


def error_of(data: dict, source: str = "ip.toml") -> str:
    with pytest.raises(InputError) as info:
        Recipe.from_dict(data, source=source)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message
    return message


# ---------------------------------------------------------------------------------------------- reading


def test_full_toml_loads_with_paths_resolved(tmp_path: Path) -> None:
    recipe = Recipe.load(write(tmp_path, "ip.toml", FULL_TOML))
    first, second = recipe.adapters
    assert first.path == HUB and second.path == "mini"  # hub paths and names stay as given
    assert first.image_encoder == "h94/IP-Adapter/models/image_encoder"
    assert (first.scale, first.combine, first.start, first.end) == (0.7, "concat", 0.1, 0.8)
    assert (first.preset, first.composition_weight, first.curve) == ("style", 0.5, "ease-in")
    assert first.layer_weights == {"t4": 1.0, "t6": 0.25}
    assert first.negative_image == str(tmp_path / "neg.png")
    a, b = first.images
    assert a == Reference(
        path=str(tmp_path / "a.png"), weight=0.5, mask=str(tmp_path / "left.png"), crop="pad"
    )
    assert b == Reference(embeds=str(tmp_path / "b.safetensors"))
    assert second.scale is None and second.combine == "average"
    assert [r.path for r in second.images] == [str(tmp_path / "c.png"), str(tmp_path / "sub" / "d.png")]
    assert second.images[1].weight == 2.0 and isinstance(second.images[1].weight, float)


def test_round_trip_toml_and_json(tmp_path: Path) -> None:
    recipe = Recipe.load(write(tmp_path, "ip.toml", FULL_TOML))
    data = recipe.to_dict()
    assert Recipe.from_dict(data) == recipe
    assert Recipe.from_dict(data, base_dir=tmp_path) == recipe  # absolute paths are not resolved twice
    again = Recipe.load(write(tmp_path / "elsewhere", "ip.json", json.dumps(data)))
    assert again == recipe and again.to_dict() == data
    assert data["adapter"][1] == {
        "path": "mini",
        "combine": "average",
        "image": [
            {"path": str(tmp_path / "c.png"), "weight": 1.0, "crop": "center"},
            {"path": str(tmp_path / "sub" / "d.png"), "weight": 2.0, "crop": "center"},
        ],
    }


def test_json_file_same_schema(tmp_path: Path) -> None:
    body = {"adapter": [{"path": HUB, "scale": 0.5, "image": ["x.png", {"embeds": "e.safetensors"}]}]}
    recipe = Recipe.load(write(tmp_path, "r.json", json.dumps(body)))
    refs = recipe.adapters[0].images
    assert refs[0].path == str(tmp_path / "x.png") and refs[1].embeds == str(tmp_path / "e.safetensors")


def test_single_image_and_single_adapter_without_lists() -> None:
    recipe = Recipe.from_dict({"adapter": {"path": "mini", "image": "a.png"}})
    assert recipe.adapters[0].images == [Reference("a.png")]


def test_adapter_path_resolved_only_when_it_exists(tmp_path: Path) -> None:
    (tmp_path / "local.safetensors").write_bytes(b"x")
    (tmp_path / "enc").mkdir()
    text = '[[adapter]]\npath = "local.safetensors"\nimage_encoder = "enc"\nimage = ["a.png"]\n'
    text += '[[adapter]]\npath = "mini"\nimage_encoder = "h94/IP-Adapter/models/image_encoder"\nimage = ["a.png"]\n'
    recipe = Recipe.load(write(tmp_path, "ip.toml", text))
    first, second = recipe.adapters
    assert first.path == str(tmp_path / "local.safetensors") and first.image_encoder == str(tmp_path / "enc")
    assert second.path == "mini" and second.image_encoder == "h94/IP-Adapter/models/image_encoder"


def test_absolute_paths_stay(tmp_path: Path) -> None:
    where = str(tmp_path / "elsewhere" / "a.png")
    recipe = Recipe.from_dict(minimal(image=[where]), base_dir=tmp_path / "recipes")
    assert recipe.adapters[0].images[0].path == where


def test_recipe_does_not_import_heavy_libraries() -> None:
    code = "import sys, ipadapter.prompt.recipe; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"  # noqa: E501
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONPATH": src},
    )
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------------------ file errors


@pytest.mark.parametrize(
    "name,text,expected",
    [
        ("ip.toml", "[[adapter]\npath = 1\n", ["ip.toml", "not valid TOML", "line 1"]),
        ("ip.json", '{"adapter": [\n  {"path": }\n]}', ["ip.json", "not valid JSON", "line 2, column"]),
    ],
)
def test_syntax_errors_name_file_and_line(tmp_path: Path, name: str, text: str, expected: list[str]) -> None:
    with pytest.raises(InputError) as info:
        Recipe.load(write(tmp_path, name, text))
    message = str(info.value)
    assert all(part in message for part in expected) and "\n" not in message


def test_bad_suffix_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"ip\.yaml.*\.toml or \.json"):
        Recipe.load(write(tmp_path, "ip.yaml", "adapter: []"))
    with pytest.raises(InputError, match="does not exist"):
        Recipe.load(tmp_path / "nope.toml")


def test_json_nan_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "ip.json", '{"adapter": [{"path": "mini", "scale": NaN, "image": ["a.png"]}]}')
    with pytest.raises(InputError, match=r"ip\.json: adapter\[0\]\.scale: got nan; expected a finite number"):
        Recipe.load(path)


# ----------------------------------------------------------------------------------- validation messages


@pytest.mark.parametrize(
    "data,expected",
    [
        ({}, ["ip.toml", "no [[adapter]]"]),
        ({"adapter": []}, ["ip.toml: adapter", "is empty"]),
        ({"adapter": 3}, ["ip.toml: adapter", "got 3", "list of [[adapter]]"]),
        ({"adapters": []}, ["unknown key 'adapters'", "did you mean 'adapter'", "valid keys here: adapter"]),
        ({"adapter": ["x"]}, ["adapter[0]", "expected an [[adapter]] table"]),
        ({"adapter": [{"image": ["a.png"]}]}, ["adapter[0]", "missing key 'path'"]),
        ({"adapter": [{"path": "mini"}]}, ["adapter[0]", "missing key 'image'"]),
        (minimal(path=""), ["adapter[0].path", "empty path"]),
        (minimal(path=3), ["adapter[0].path", "got 3 (an integer)", "a file path (a string)"]),
        (
            minimal(scal=1.0),
            [
                "adapter[0]",
                "unknown key 'scal'",
                "did you mean 'scale'",
                "valid keys here: path, image_encoder, lora_file, scale",
            ],
        ),
        (
            minimal(scale="high"),
            ["adapter[0].scale", "got 'high' (a string)", "expected a number", "scale = 0.7"],
        ),
        (minimal(scale=True), ["adapter[0].scale", "a boolean", "expected a number"]),
        (minimal(scale=-1), ["adapter[0].scale", "got -1", "expected a finite number in [0, 5]"]),
        (minimal(scale=float("inf")), ["adapter[0].scale", "expected a finite number"]),
        (minimal(combine="avg"), ["adapter[0].combine", "'avg'", ", ".join(COMBINE_MODES)]),
        (minimal(preset="styel"), ["adapter[0].preset", "'styel'", ", ".join(PRESET_NAMES)]),
        (minimal(curve="linear"), ["adapter[0].curve", "'linear'", ", ".join(CURVE_NAMES)]),
        (
            minimal(start=0.8, end=0.5),
            ["adapter[0]", "start = 0.8 is not before end = 0.5", "0 <= start < end <= 1"],
        ),
        (minimal(start=0.5, end=0.5), ["adapter[0]", "not before end", "0 <= start < end <= 1"]),
        (minimal(start=-0.1), ["adapter[0].start", "got -0.1", "[0, 1]"]),
        (minimal(end=1.5), ["adapter[0].end", "got 1.5", "[0, 1]"]),
        (minimal(composition_weight="x"), ["adapter[0].composition_weight", "expected a number"]),
        (minimal(layer_weights=[1, 2]), ["adapter[0].layer_weights", "a list", "expected a table"]),
        (minimal(layer_weights={}), ["adapter[0].layer_weights", "is empty"]),
        (minimal(layer_weights={"up": 1.0}), ["adapter[0].layer_weights", "key 'up'", "'t3' or '3'"]),
        (minimal(layer_weights={"t3": 1.0, "3": 0.5}), ["adapter[0].layer_weights", "t3 is given twice"]),
        (minimal(layer_weights={"t3": -1}), ["adapter[0].layer_weights.t3", "expected a number >= 0"]),
        (minimal(layer_weights={"t3": "big"}), ["adapter[0].layer_weights.t3", "expected a number"]),
        (minimal(negative_image=5), ["adapter[0].negative_image", "got 5", "a file path"]),
        (minimal(image=3), ["adapter[0].image", "got 3 (an integer)", "expected a list of reference images"]),
        (minimal(image=[]), ["adapter[0].image", "is empty", "[[adapter.image]]"]),
        (minimal(image=[3]), ["adapter[0].image[0]", "got 3", "a file path (string) or a table"]),
        (
            minimal(image=[{"path": "a.png", "wieght": 1}]),
            [
                "adapter[0].image[0]",
                "unknown key 'wieght'",
                "did you mean 'weight'",
                "valid keys here: path, embeds, face, weight, mask, crop",
            ],
        ),
        (
            minimal(image=["a.png", {"path": "b.png", "weight": "x"}]),
            ["adapter[0].image[1].weight", "got 'x' (a string)", "weight = 0.8"],
        ),
        (
            minimal(image=[{"path": "a.png", "weight": float("nan")}]),
            ["adapter[0].image[0].weight", "got nan", "finite"],
        ),
        (
            minimal(image=[{"path": "a.png", "crop": "fill"}]),
            ["adapter[0].image[0].crop", "'fill'", ", ".join(CROP_MODES)],
        ),
        (
            minimal(image=[{"path": "a.png", "embeds": "a.safetensors"}]),
            ["adapter[0].image[0]", "both path and embeds", "exactly one"],
        ),
        (minimal(image=[{"weight": 1.0}]), ["adapter[0].image[0]", "neither path, embeds nor face"]),
        (minimal(image=[{"path": "a.png", "mask": 1}]), ["adapter[0].image[0].mask", "a file path"]),
        (
            minimal(combine="average", image=[{"path": "a.png", "mask": "m.png"}]),
            ["adapter[0].image[0].mask", 'combine = "concat"', "'average'"],
        ),
        (minimal(combine="subtract"), ["adapter[0].image", "at least 2 references", "got 1"]),
        (
            minimal(
                combine="norm-average", image=[{"path": "a.png", "weight": 0}, {"path": "b.png", "weight": 0}]
            ),
            ["adapter[0].image", "weights sum to 0", "'norm-average'"],
        ),
    ],
)
def test_dict_errors(data: dict, expected: list[str]) -> None:
    message = error_of(data)
    assert message.startswith("ip.toml")
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_error_names_second_adapter_and_file(tmp_path: Path) -> None:
    text = '[[adapter]]\npath = "mini"\nimage = ["a.png"]\n[[adapter]]\npath = "mini"\n'
    text += '  [[adapter.image]]\n  path = "a.png"\n  weight = -2\n'
    path = write(tmp_path, "ip.toml", text)
    with pytest.raises(InputError, match=r"^.*ip\.toml: adapter\[1\]\.image\[0\]\.weight: got -2; expected a number >= 0"):  # fmt: skip
        Recipe.load(path)


def test_masks_with_concat_and_zero_weights_allowed() -> None:
    recipe = Recipe.from_dict(minimal(image=[{"path": "a.png", "mask": "m.png", "weight": 0}]))
    assert recipe.adapters[0].images[0].mask == "m.png" and recipe.adapters[0].images[0].weight == 0.0
    subtract = Recipe.from_dict(minimal(combine="subtract", image=["a.png", "b.png"]))
    assert len(subtract.adapters[0].images) == 2


def test_not_a_table() -> None:
    message = error_of([1, 2])  # type: ignore[arg-type]
    assert message.startswith("ip.toml: got [1, 2] (a list)")


# ------------------------------------------------------------------------------------------- check_files


def test_check_files_names_key_path(tmp_path: Path) -> None:
    for name in ("a.png", "left.png", "b.safetensors", "c.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "neg.png").mkdir()  # a folder, not a file
    (tmp_path / "sub").mkdir()
    recipe = Recipe.load(write(tmp_path, "ip.toml", FULL_TOML))
    with pytest.raises(InputError) as info:
        recipe.check_files()
    assert "ip.toml: adapter[0].negative_image" in str(info.value) and "not a file" in str(info.value)
    (tmp_path / "neg.png").rmdir()
    (tmp_path / "neg.png").write_bytes(b"x")
    with pytest.raises(InputError) as info:
        recipe.check_files()
    message = str(info.value)
    assert "ip.toml: adapter[1].image[1].path" in message and str(tmp_path / "sub" / "d.png") in message
    (tmp_path / "sub" / "d.png").write_bytes(b"x")
    recipe.check_files()


def test_check_files_python_recipe_and_in_memory_images(tmp_path: Path) -> None:
    image = Image.new("RGB", (4, 4))
    recipe = Recipe(
        [AdapterRecipe(path="mini", images=[image, Reference(embeds=tmp_path / "e.safetensors")])]
    )
    with pytest.raises(InputError, match=r"^Recipe\.adapters\[0\]\.images\[1\]\.embeds: no such file"):
        recipe.check_files()


# -------------------------------------------------------------------------------------------- Python API


def test_control_wraps_plain_images() -> None:
    image = Image.new("RGB", (4, 4))
    control = Control(images=["a.png", Path("b.png"), image, b"\x89PNG", {"embeds": "e.safetensors"}])
    assert all(isinstance(ref, Reference) for ref in control.images)
    assert control.images[0] == Reference("a.png") and control.images[2].path is image
    assert control.images[4].embeds == "e.safetensors"
    assert Control(images="a.png").images == [Reference("a.png")]
    assert Control(images=(Reference("a.png"),)).images == [Reference("a.png")]


def test_control_defaults_and_layer_weight_keys() -> None:
    control = Control(images=["a.png"], layer_weights={3: 1, "t4": 0.5, "05": 0.0})
    assert control.layer_weights == {"t3": 1.0, "t4": 0.5, "t5": 0.0}
    assert (control.scale, control.combine, control.start, control.end) == (None, "concat", 0.0, 1.0)
    assert (control.preset, control.curve, control.negative_image, control.composition_weight) == (
        None,
        None,
        None,
        1.0,
    )


@pytest.mark.parametrize(
    "build,expected",
    [
        (lambda: Reference(weight=float("nan")), "Reference.weight: got nan"),
        (lambda: Reference(), "Reference: got neither path, embeds nor face"),
        (lambda: Reference("a.png", weight=True), "Reference.weight: got True (a boolean)"),
        (
            lambda: Reference(3),
            "Reference.path: got 3 (an integer); expected a file path (str or Path), a PIL image or bytes",
        ),
        (lambda: Control(images=[]), "Control.images: is empty"),
        (lambda: Control(images=3), "Control.images: got 3"),
        (lambda: Control(images=["a.png", 7]), "Control.images[1]: got 7"),
        (lambda: Control(images=[{"pth": "a.png"}]), "Control.images[0]: unknown key 'pth'"),
        (
            lambda: Control(images=["a.png"], scale="x"),
            "Control.scale: got 'x' (a string); expected a number; write e.g. scale=0.7",
        ),
        (lambda: Control(images=["a.png"], combine="mean"), "Control.combine: got 'mean'"),
        (lambda: Control(images=["a.png"], start=1.0), "Control: start = 1.0 is not before end = 1.0"),
        (lambda: Control(images=["a.png"], layer_weights={True: 1.0}), "Control.layer_weights: key True"),
        (
            lambda: Control(images=[Reference("a.png", mask="m.png")], combine="add"),
            "Control.images[0].mask: a mask needs combine='concat'",
        ),
        (lambda: AdapterRecipe(path=None, images=["a.png"]), "AdapterRecipe.path: got null/None"),
        (lambda: AdapterRecipe(path="mini", images=[], scale=-1), "AdapterRecipe.images: is empty"),
        (lambda: Recipe([]), "Recipe.adapters: is empty"),
        (lambda: Recipe([Control(images=["a.png"])]), "Recipe.adapters[0]: got Control("),
    ],
)
def test_python_errors(build, expected: str) -> None:  # noqa: ANN001
    with pytest.raises(InputError) as info:
        build()
    message = str(info.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_python_recipe_to_dict(tmp_path: Path) -> None:
    entry = AdapterRecipe(path=Path("x.safetensors"), images=[Path("a.png")], negative_image=Path("n.png"))
    assert entry.path == "x.safetensors"
    recipe = Recipe([entry])
    data = recipe.to_dict()
    assert data["adapter"][0]["image"] == [{"path": "a.png", "weight": 1.0, "crop": "center"}]
    assert data["adapter"][0]["negative_image"] == "n.png"
    json.dumps(data)  # plain types only
    back = Recipe.from_dict(data)
    assert back.adapters[0].images[0].path == "a.png" and back.adapters[0].path == "x.safetensors"


def test_in_memory_images_cannot_be_written() -> None:
    recipe = Recipe([AdapterRecipe(path="mini", images=["a.png", Image.new("RGB", (2, 2))])])
    with pytest.raises(InputError, match=r"^Recipe\.adapters\[0\]\.images\[1\]\.path: a PIL image .* cannot be written"):  # fmt: skip
        recipe.to_dict()
    loaded = Recipe.from_dict(minimal())
    loaded.adapters[0].images[0].mask = Image.new("L", (2, 2))
    with pytest.raises(InputError, match=r"^recipe: adapter\[0\]\.image\[0\]\.mask: .*cannot be written"):
        loaded.to_dict()


def test_python_context_does_not_leak_after_file_error() -> None:
    error_of(minimal(scale="x"))
    with pytest.raises(InputError, match=r"^Reference\.weight"):
        Reference("a.png", weight=-1)


def test_issue_20_keys_in_a_recipe_file(tmp_path: Path) -> None:
    text = """
[[adapter]]
path = "mini"
preset = "style+composition"
composition_image = "layout.png"
embeds_scaling = "K+mean(V) w/ C penalty"
unfold_batch = true
negative_noise = "shuffle"
negative_noise_strength = 0.4
enhance_tiles = 2
encode_batch_size = 8
  [[adapter.image]]
  path = "wide.png"
  crop = "tiled"
"""
    recipe = Recipe.load(write(tmp_path, "ip.toml", text))
    entry = recipe.adapters[0]
    assert entry.composition_image == str(tmp_path / "layout.png")  # relative to the recipe, as images
    assert (entry.embeds_scaling, entry.unfold_batch, entry.enhance_tiles) == (
        "K+mean(V) w/ C penalty",
        True,
        2,
    )
    assert entry.images[0].crop == "tiled" and entry.negative_noise_strength == 0.4
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    for bad, words in (
        ("unfold_batch = 1", "adapter[0].unfold_batch: got 1; expected true or false"),
        ("enhance_tiles = 2.5", "adapter[0].enhance_tiles: got 2.5; expected a whole number"),
        ('embeds_scaling = "KV"', "adapter[0].embeds_scaling"),
        ("enhance_tiles = 17", "adapter[0].enhance_tiles"),
    ):
        key = bad.split(" = ")[0]
        line = next(x for x in text.splitlines() if x.startswith(key))
        with pytest.raises(InputError, match=re.escape(words)):
            Recipe.load(write(tmp_path, "bad.toml", text.replace(line, bad)))
