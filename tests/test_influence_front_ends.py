"""Influence maps and the new per-adapter controls through every front end: the command line, batch manifests,
the REST API and the web page (tiny models, 2 steps, 32 px)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import b64_pixels, b64_png, ckpt, half_mask, png_pixels, reference_image
from PIL import Image
from test_browser import browser  # noqa: F401 - the fixture (headless Chromium)
from test_browser import pytestmark as needs_chromium

from ipadapter.batch import run_batch
from ipadapter.cli import main
from ipadapter.jobs.engine import Engine
from ipadapter.server import ServerConfig, create_app
from ipadapter.server.app import serve_in_thread

SIZE = 32
BASIC = {"prompt": "a cat", "negative_prompt": "blurry", "scale": 0.7, "steps": 2, "seed": 0, "width": SIZE,
         "height": SIZE}  # fmt: skip


def _generate(models: dict, ref: Path, out: Path, *extra: str) -> list[str]:
    return [
        "generate", "--base", str(models["sd15"]), "--adapter", ckpt(models), "--image", str(ref), "--prompt", "a cat",
        "--negative-prompt", "blurry", "--scale", "0.7", "--steps", "2", "--seed", "0", "--width", str(SIZE),
        "--height", str(SIZE), "--output", str(out), *extra,
    ]  # fmt: skip


def _one_error_line(capsys: Any) -> str:
    """stderr's error: exactly one ``ipadapter: error:`` line, no traceback (notes may come before it)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("ipadapter: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert err.strip().endswith(errors[0]), err  # the error is the last thing said
    return errors[0]


@pytest.fixture(scope="module")
def transformer_blocks(models: dict) -> int:
    """How many transformer blocks (cross-attention sites) the tiny SD1.5 UNet has."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    unet = UNet2DConditionModel.from_pretrained(models["sd15"], subfolder="unet")
    return sum(isinstance(m, Transformer2DModel) for m in unet.modules())


@pytest.fixture(scope="module")
def plain(models: dict, ref_png: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference generation without an influence map."""
    out = tmp_path_factory.mktemp("plain") / "plain.png"
    assert main(_generate(models, ref_png, out)) == 0
    return out


# -- the command line -----------------------------------------------------------------------------------------


def test_cli_writes_a_figure_and_raw_maps_without_changing_the_picture(
    models: dict, ref_png: Path, plain: Path, tmp_path: Path, transformer_blocks: int, capsys: Any
) -> None:
    out = tmp_path / "fig.png"
    assert main(_generate(models, ref_png, out, "--influence-map", str(tmp_path / "m.png"), "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["outputs"] == [str(out)] and report["influence_maps"] == [str(tmp_path / "m.png")]
    figure = Image.open(tmp_path / "m.png")
    assert figure.width > SIZE and figure.height > SIZE  # panels and block tiles, larger than the picture
    assert np.array_equal(png_pixels(out), png_pixels(plain))  # recording changes nothing

    out = tmp_path / "raw.png"
    assert main(_generate(models, ref_png, out, "--influence-map", str(tmp_path / "m.npy"))) == 0
    assert f"wrote {tmp_path / 'm.npy'}" in capsys.readouterr().out
    assert np.array_equal(png_pixels(out), png_pixels(plain))
    norms, ratios = np.load(tmp_path / "m.npy"), np.load(tmp_path / "m.ratio.npy")
    assert norms.shape == (1, transformer_blocks, SIZE, SIZE) and norms.dtype == np.float32
    assert ratios.shape == norms.shape and ratios.dtype == np.float32
    assert np.isfinite(norms).all() and (norms >= 0).all() and norms.sum() > 0
    meta = json.loads((tmp_path / "m.json").read_text())
    assert len(meta["panels"]) == 1 and len(meta["blocks"]) == transformer_blocks
    assert meta["shape"] == list(norms.shape) and meta["ratios"] == "m.ratio.npy"


def test_cli_numbers_the_maps_of_several_images(
    models: dict, ref_png: Path, tmp_path: Path, transformer_blocks: int, capsys: Any
) -> None:
    argv = _generate(models, ref_png, tmp_path / "o.png", "--num-images", "2", "--influence-map",
                     str(tmp_path / "m.npy"), "--json")  # fmt: skip
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["influence_maps"] == [str(tmp_path / "m-1.npy"), str(tmp_path / "m-2.npy")]
    assert not (tmp_path / "m.npy").exists()
    for k in (1, 2):
        assert np.load(tmp_path / f"m-{k}.npy").shape == (1, transformer_blocks, SIZE, SIZE)
        assert (tmp_path / f"m-{k}.ratio.npy").is_file()
        assert json.loads((tmp_path / f"m-{k}.json").read_text())["picture"] == k
    assert not np.array_equal(np.load(tmp_path / "m-1.npy"), np.load(tmp_path / "m-2.npy"))


def test_cli_refuses_a_bad_suffix_before_loading_models(
    models: dict, ref_png: Path, tmp_path: Path, capsys: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[Any] = []
    monkeypatch.setattr(Engine, "run", lambda self, job, *a, **kw: runs.append(job))
    assert (
        main(_generate(models, ref_png, tmp_path / "o.png", "--influence-map", str(tmp_path / "m.jpg"))) == 2
    )
    line = _one_error_line(capsys)
    assert "m.jpg" in line and ".png" in line and ".npy" in line
    assert runs == [] and not list(tmp_path.iterdir())


def test_cli_refuses_an_influence_map_of_a_compiled_denoiser(
    models: dict, ref_png: Path, tmp_path: Path, capsys: Any
) -> None:
    argv = _generate(
        models, ref_png, tmp_path / "o.png", "--influence-map", str(tmp_path / "m.png"), "--compile"
    )
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "compile" in line and "influence" in line
    assert not list(tmp_path.iterdir())  # neither the picture nor the map


def test_a_masked_reference_acts_where_its_mask_is_white(models: dict, ref_png: Path, tmp_path: Path) -> None:
    half_mask("left", SIZE).save(tmp_path / "left.png")
    argv = _generate(models, ref_png, tmp_path / "o.png", "--image-mask", str(tmp_path / "left.png"),
                     "--influence-map", str(tmp_path / "m.npy"))  # fmt: skip
    assert main(argv) == 0
    total = np.load(tmp_path / "m.npy").sum(axis=1)  # (panels, H, W): all blocks
    left = total[..., : SIZE // 2].sum()
    assert left > 0.8 * total.sum(), left / total.sum()


def test_new_controls_on_the_command_line_change_the_picture(
    models: dict, ref_png: Path, plain: Path, tmp_path: Path
) -> None:
    out = tmp_path / "controls.png"
    argv = _generate(models, ref_png, out, "--embeds-scaling", "K+V w/ C penalty", "--negative-noise", "fade",
                     "--negative-noise-strength", "0.5", "--encode-batch-size", "2")  # fmt: skip
    assert main(argv) == 0
    assert np.abs(png_pixels(out) - png_pixels(plain)).max() > 2
    params = json.loads(Image.open(out).text["parameters"])
    assert "K+V w/ C penalty" in json.dumps(params) and "fade" in json.dumps(params)


# -- batch manifests ------------------------------------------------------------------------------------------


def test_batch_writes_influence_maps_inside_the_output_folder_and_resumes(
    models: dict, tmp_path: Path, transformer_blocks: int
) -> None:
    reference_image(0).save(tmp_path / "ref.png")
    common = {"base": str(models["sd15"]), "adapter": ckpt(models), "image": "ref.png", **BASIC}
    lines = [{**common, "output": "a.png", "influence_map": "m1.npy"},
             {**common, "output": "b.png", "influence_map": "../x.npy"}]  # fmt: skip
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    report = run_batch(manifest, out, quiet=True)
    assert report["done"] == [str(out / "a.png"), str(out / "m1.npy")]
    assert np.load(out / "m1.npy").shape == (1, transformer_blocks, SIZE, SIZE)
    assert (out / "m1.ratio.npy").is_file() and (out / "m1.json").is_file()
    assert [f["line"] for f in report["failed"]] == [2]
    assert (
        "outside the output folder" in report["failed"][0]["error"]
        and "influence_map" in report["failed"][0]["error"]
    )
    assert not (tmp_path / "x.npy").exists() and not (out / "b.png").exists()

    manifest.write_text(json.dumps(lines[0]) + "\n")
    again = run_batch(manifest, out, quiet=True)
    assert again["done"] == [] and sorted(again["skipped"]) == [str(out / "a.png"), str(out / "m1.npy")]


def test_batch_unfold_batch_gives_each_image_its_own_reference(models: dict, tmp_path: Path) -> None:
    """With unfold_batch, picture k uses reference k alone: as a job of that reference alone makes picture k."""
    reference_image(0).save(tmp_path / "a.png")
    reference_image(1, size=(40, 40)).save(tmp_path / "b.png")
    common = {"base": str(models["sd15"]), "adapter": ckpt(models), **BASIC, "num_images": 2}
    lines = [{**common, "image": ["a.png", "b.png"], "unfold_batch": True, "output": "unfold.png"},
             {**common, "image": "a.png", "output": "a.png"},
             {**common, "image": "b.png", "output": "b.png"}]  # fmt: skip
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    report = run_batch(manifest, out, quiet=True)
    assert report["failed"] == [] and len(report["done"]) == 6
    first, second = png_pixels(out / "unfold-1.png"), png_pixels(out / "unfold-2.png")
    assert np.abs(first - png_pixels(out / "a-1.png")).max() <= 2
    assert np.abs(second - png_pixels(out / "b-2.png")).max() <= 2
    assert np.abs(second - png_pixels(out / "a-2.png")).max() > 2  # not the first reference's picture


# -- the REST API ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(models: dict) -> TestClient:
    config = ServerConfig(base=str(models["sd15"]), adapters=[ckpt(models)])
    with TestClient(create_app(config, Engine("cpu"))) as client:
        yield client


def _png(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_api_returns_a_figure_per_image_and_an_overlay_per_panel(client: TestClient) -> None:
    refs = [b64_png(reference_image(0)), b64_png(reference_image(1))]
    r = client.post("/v1/generate", json={**BASIC, "image": refs, "num_images": 2, "influence_map": True})
    assert r.status_code == 200, r.text
    out = r.json()
    influence = out["influence"]
    assert set(influence) == {"panels", "blocks", "figures", "overlays", "max"}
    assert len(influence["panels"]) == 2  # one per reference
    assert len(influence["figures"]) == len(out["images"]) == 2 == len(influence["max"])
    assert [len(per_image) for per_image in influence["overlays"]] == [2, 2]
    for i, image in enumerate(out["images"]):
        figure = _png(influence["figures"][i])
        assert figure.width > SIZE and figure.height > SIZE
        for data in influence["overlays"][i]:
            assert _png(data).size == (SIZE, SIZE)
            assert not np.array_equal(b64_pixels(data), b64_pixels(image))
    plain = client.post("/v1/generate", json={**BASIC, "image": refs, "num_images": 2})
    assert plain.status_code == 200 and "influence" not in plain.json()
    assert plain.json()["images"] == out["images"]  # recording changes nothing


@pytest.mark.parametrize("value", ["yes", 1])
def test_api_refuses_an_influence_map_that_is_not_a_boolean(client: TestClient, value: Any) -> None:
    r = client.post(
        "/v1/generate", json={**BASIC, "image": b64_png(reference_image(0)), "influence_map": value}
    )
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert "influence_map" in message and "true or false" in message and "\n" not in message


def test_api_tiled_crop_of_a_wide_reference(client: TestClient) -> None:
    wide = b64_png(reference_image(4, size=(96, 32)))
    r = client.post("/v1/generate", json={**BASIC, "image": wide, "crop": "tiled", "influence_map": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert '"crop": "tiled"' in json.dumps(out["parameters"])  # the recipe records it per reference
    assert len(out["influence"]["panels"]) == 3  # a 96 x 32 reference is three square tiles
    center = client.post("/v1/generate", json={**BASIC, "image": wide})
    assert center.status_code == 200 and center.json()["images"] != out["images"]


# -- the web page ---------------------------------------------------------------------------------------------


def test_page_has_the_influence_control(client: TestClient) -> None:
    page = client.get("/").text
    assert '<input id="influence" type="checkbox">' in page
    assert "b.influence_map = true" in page  # what the form posts when it is ticked
    assert "show where the image prompt acted" in page and "Full figure" in page


@needs_chromium
def test_page_shows_where_the_image_prompt_acted(browser: Any, models: dict, tmp_path: Path) -> None:  # noqa: F811
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import Select, WebDriverWait

    for k in range(2):
        reference_image(k).save(tmp_path / f"ref{k}.png")
    config = ServerConfig(base=str(models["sd15"]), adapters=[ckpt(models)])
    with serve_in_thread(create_app(config, Engine("cpu"))) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: Select(d.find_element(By.ID, "mode")).options)
        browser.find_element(By.ID, "files").send_keys(f"{tmp_path / 'ref0.png'}\n{tmp_path / 'ref1.png'}")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#thumbs img")) == 2)
        for field, value in (("steps", "2"), ("seed", "7")):
            browser.find_element(By.ID, field).send_keys(value)
        browser.find_element(By.ID, "influence").click()
        browser.find_element(By.ID, "generate").click()

        card = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#gallery .card.result")))
        image = card.find_element(By.TAG_NAME, "img")
        picture = image.get_attribute("src")
        toggle = card.find_element(By.CSS_SELECTOR, "input.influence-toggle")
        assert "show where the image prompt acted" in card.text and not toggle.is_selected()
        panels = Select(card.find_element(By.CSS_SELECTOR, "select.influence-panel"))
        labels = [o.text for o in panels.options]
        assert len(labels) == 2 and len(set(labels)) == 2  # one per reference

        toggle.click()  # the first panel's overlay in place of the picture
        first = image.get_attribute("src")
        assert first.startswith("data:image/png;base64,") and first != picture
        panels.select_by_index(1)  # the second reference's
        second = image.get_attribute("src")
        assert second.startswith("data:image/png;base64,") and second not in (first, picture)
        toggle.click()  # back to the picture
        assert image.get_attribute("src") == picture

        link = card.find_element(By.CSS_SELECTOR, "a.influence-figure")
        assert link.get_attribute("href").startswith("blob:") and link.get_attribute("target") == "_blank"
        size = browser.execute_async_script(
            "const done = arguments[1], img = new Image();"
            "img.onload = () => done([img.naturalWidth, img.naturalHeight]); img.onerror = () => done(null);"
            "img.src = arguments[0];",
            link.get_attribute("href"),
        )
        assert size is not None and size[0] > SIZE and size[1] > SIZE  # the full figure
        logs = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert not logs, logs


def test_an_influence_map_never_overwrites_the_output(tmp_path: Path, capsys: Any) -> None:
    from helpers import fails

    out = tmp_path / "o.png"
    fails(capsys, ["generate", "--base", "b", "--adapter", "a", "--image", "x.png", "--output", str(out),
                   "--influence-map", str(out)], "would overwrite the output")  # fmt: skip
    fails(capsys, ["generate", "--base", "b", "--adapter", "a", "--image", "x.png", "--output", str(out),
                   "--influence-map", str(tmp_path / "m.png"), "--compile"], "compiled one (--compile)")  # fmt: skip


def test_a_manifest_line_cannot_write_its_map_over_its_picture(tmp_path: Path) -> None:
    from ipadapter.batch import read_manifest

    manifest = tmp_path / "jobs.jsonl"
    line = {"base": "b", "adapter": "a", "image": "x.png", "influence_map": "00001.png"}
    manifest.write_text(json.dumps(line) + "\n")
    (entry,) = read_manifest(manifest, tmp_path / "out")
    assert entry.error is not None and "would overwrite the line's own output" in entry.error
