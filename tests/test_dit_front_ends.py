"""Flux and SD3 bases through every front end: the CLI's image commands, batch manifests and the server.

The same flags give diffusers' picture (its defaults for guidance, true_cfg_scale, max_sequence_length and the
scheduler are the pipelines' own), and what a family cannot use is refused in one line before anything runs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import FluxPipeline, StableDiffusion3Pipeline  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from helpers import b64_png, fails, png_pixels, reference_image  # noqa: E402
from PIL import Image  # noqa: E402

from ipadapter.batch import run_batch  # noqa: E402
from ipadapter.cli import main  # noqa: E402
from ipadapter.jobs.engine import Engine  # noqa: E402
from ipadapter.pipelines import mode_pipeline  # noqa: E402
from ipadapter.server import ServerConfig, create_app  # noqa: E402

SIZE = ["--width", "32", "--height", "32", "--steps", "2", "--seed", "0", "--max-sequence-length", "16"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("dit_inputs")
    out = {"ref": folder / "ref.png", "init": folder / "init.png", "mask": folder / "mask.png"}
    reference_image().save(out["ref"])
    reference_image(7, (32, 32)).save(out["init"])
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(out["mask"])
    return out


def _diffusers(dit: dict, family: str, mode: str, scale: float, **call: object) -> np.ndarray:
    """diffusers' own picture: its IP-Adapter loading, a seeded CPU generator, the pipeline's defaults."""
    if family == "flux":
        pipe = FluxPipeline.from_pretrained(dit["flux"])
        pipe.load_ip_adapter(
            str(dit["xlabs"].parent),
            weight_name=dit["xlabs"].name,
            image_encoder_pretrained_model_name_or_path=str(dit["clip"]),
            image_encoder_dtype=torch.float32,
        )
    else:
        pipe = StableDiffusion3Pipeline.from_pretrained(dit["sd3"])
        pipe.load_ip_adapter(
            str(dit["instantx_sd3"].parent),
            weight_name=dit["instantx_sd3"].name,
            image_encoder_folder=str(dit["siglip"]),
            low_cpu_mem_usage=False,
        )
    pipe.set_ip_adapter_scale(scale)
    pipe = mode_pipeline(pipe, mode)
    generator = torch.Generator("cpu").manual_seed(0)
    image = pipe(ip_adapter_image=reference_image(), generator=generator, output_type="pil", **call).images[0]
    return np.asarray(image, dtype=np.int16)


def _argv(command: str, dit: dict, files: dict, out: Path, family: str, *extra: str) -> list[str]:
    adapter, encoder = ("xlabs", "clip") if family == "flux" else ("instantx_sd3", "siglip")
    return [
        command, "--base", str(dit[family]), "--adapter", str(dit[adapter]), "--image-encoder", str(dit[encoder]),
        "--image", str(files["ref"]), "--prompt", "a red cube", "--scale", "0.7", *SIZE, "--output", str(out),
        *extra,
    ]  # fmt: skip


def test_cli_generate_on_flux_with_true_cfg_equals_diffusers(dit: dict, files: dict, tmp_path: Path) -> None:
    out = tmp_path / "flux.png"
    extra = ("--negative-prompt", "blurry", "--true-cfg-scale", "2.5")
    assert main(_argv("generate", dit, files, out, "flux", *extra)) == 0
    want = _diffusers(
        dit, "flux", "t2i", 0.7, prompt="a red cube", negative_prompt="blurry", true_cfg_scale=2.5,
        height=32, width=32, num_inference_steps=2, max_sequence_length=16,
    )  # fmt: skip
    assert np.abs(png_pixels(out) - want).max() <= 2
    params = json.loads(Image.open(out).text["parameters"])
    assert params["true_cfg_scale"] == 2.5 and params["max_sequence_length"] == 16
    assert params["variant"] == "xlabs-flux" and params["scheduler"] == "FlowMatchEulerDiscreteScheduler"


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_cli_init_modes_on_sd3_equal_diffusers(dit: dict, files: dict, tmp_path: Path, mode: str) -> None:
    out = tmp_path / f"{mode}.png"
    extra = ["--init", str(files["init"])] + (["--mask", str(files["mask"])] if mode == "inpaint" else [])
    assert main(_argv(mode, dit, files, out, "sd3", *extra)) == 0
    init = Image.open(files["init"]).convert("RGB")
    call = dict(
        prompt="a red cube", image=init, height=32, width=32, num_inference_steps=2, max_sequence_length=16
    )
    if mode == "inpaint":
        call.update(mask_image=Image.open(files["mask"]), strength=1.0)
    else:
        call.update(strength=0.8)
    want = _diffusers(dit, "sd3", mode, 0.7, **call)
    assert png_pixels(out).shape == (32, 32, 3)  # the init image's size
    assert np.abs(png_pixels(out) - want).max() <= 2


def test_cli_flux_controlnet_and_inpaint_run(dit: dict, files: dict, tmp_path: Path) -> None:
    out = tmp_path / "cn.png"
    cn = ("--controlnet", str(dit["flux_cn"]), "--control-image", str(files["init"]))
    assert main(_argv("generate", dit, files, out, "flux", *cn)) == 0
    assert Image.open(out).size == (32, 32)
    out2 = tmp_path / "inpaint.png"
    assert main(_argv("inpaint", dit, files, out2, "flux", "--init", str(files["init"]), "--mask", str(files["mask"]))) == 0  # fmt: skip
    kept = np.abs(png_pixels(out2)[:4, :4] - png_pixels(files["init"])[:4, :4]).mean()
    painted = np.abs(png_pixels(out2)[12:20, 12:20] - png_pixels(files["init"])[12:20, 12:20]).mean()
    assert painted > kept  # the white part of the mask was repainted, the black corner kept


def test_family_options_are_refused_by_name(
    dit: dict, models: dict, files: dict, tmp_path: Path, capsys
) -> None:  # noqa: ANN001
    out = tmp_path / "x.png"
    sd3 = _argv("generate", dit, files, out, "sd3", "--true-cfg-scale", "2")
    fails(capsys, sd3, "true_cfg_scale is for Flux bases", "SD3")
    sd15 = ["generate", "--base", str(models["sd15"]), "--prompt", "a", "--steps", "1", "--output", str(out)]
    fails(capsys, [*sd15, "--max-sequence-length", "16"], "max_sequence_length", "no T5 encoder")
    fails(
        capsys,
        [*_argv("generate", dit, files, out, "flux"), "--scheduler", "ddim"],
        "flow-matching",
        "flow-euler",
    )
    fails(capsys, [*sd15, "--scheduler", "flow-euler"], "scheduler 'flow-euler' does not fit", "ddim")
    assert not out.exists()


def test_batch_manifest_with_flux_and_sd3_jobs(dit: dict, files: dict, tmp_path: Path) -> None:
    manifest = tmp_path / "jobs.jsonl"
    common = {
        "prompt": "a red cube",
        "width": 32,
        "height": 32,
        "steps": 2,
        "seed": 0,
        "max_sequence_length": 16,
    }
    lines = [
        {**common, "base": str(dit["flux"]), "adapter": str(dit["xlabs"]), "image_encoder": str(dit["clip"]),
         "image": str(files["ref"]), "scale": 0.7},
        {**common, "base": str(dit["sd3"]), "adapter": str(dit["instantx_sd3"]), "image_encoder": str(dit["siglip"]),
         "image": str(files["ref"]), "scale": 0.7, "mode": "img2img", "init": str(files["init"])},
    ]  # fmt: skip
    manifest.write_text("\n".join(json.dumps(line) for line in lines))
    report = run_batch(manifest, tmp_path / "out", device="cpu", quiet=True)
    assert report is not None and report["counts"] == {"done": 2, "failed": 0, "skipped": 0}
    first = sorted((tmp_path / "out").glob("*.png"))[0]
    want = _diffusers(dit, "flux", "t2i", 0.7, prompt="a red cube", height=32, width=32, num_inference_steps=2,
                      max_sequence_length=16)  # fmt: skip
    assert np.abs(png_pixels(first) - want).max() <= 2


def test_server_serves_a_flux_base(dit: dict, files: dict) -> None:
    config = ServerConfig(base=str(dit["flux"]), adapters=[str(dit["xlabs"])], image_encoder=str(dit["clip"]))
    with TestClient(create_app(config, Engine("cpu"))) as client:
        models = client.get("/v1/models").json()
        assert models["family"] == "flux" and models["schedulers"] == ["flow-euler", "flow-heun"]
        assert models["modes"] == ["t2i", "img2img", "inpaint"]
        body = {"prompt": "a red cube", "image": b64_png(reference_image()), "scale": 0.7, "width": 32,
                "height": 32, "steps": 2, "seed": 0, "max_sequence_length": 16, "true_cfg_scale": 2.0,
                "negative_prompt": "blurry"}  # fmt: skip
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        want = _diffusers(dit, "flux", "t2i", 0.7, prompt="a red cube", negative_prompt="blurry", true_cfg_scale=2.0,
                          height=32, width=32, num_inference_steps=2, max_sequence_length=16)  # fmt: skip
        got = r.json()["images"][0]
        import base64
        import io

        pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(got))).convert("RGB"), dtype=np.int16)
        assert np.abs(pixels - want).max() <= 2
