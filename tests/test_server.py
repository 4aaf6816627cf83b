"""The REST API on tiny models: same pixels as the CLI, the queue's bounds, jobs, limits, auth, errors as JSON."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from helpers import b64_pixels, b64_png, reference_image
from PIL import Image

from ipadapter.cli import main
from ipadapter.jobs.engine import Engine
from ipadapter.jobs.options import OPTIONS
from ipadapter.server import ServerConfig, create_app
from ipadapter.server.app import serve_in_thread
from ipadapter.server.bodies import FIELDS, REFUSED, RESULT_FIELDS

TOKEN = "s3cret-token"
BASIC = {"prompt": "a cat", "negative_prompt": "blurry", "scale": 0.7, "steps": 2, "seed": 0, "width": 32,
         "height": 32}  # fmt: skip


def png_params(data: str) -> dict[str, Any]:
    return json.loads(Image.open(io.BytesIO(base64.b64decode(data))).text["parameters"])


def cli_pixels(args: list[str], out: Path) -> np.ndarray:
    assert main([*args, "--output", str(out)]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


def assert_error(response: httpx.Response, status: int, *words: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"type", "message"} and "\n" not in error["message"] and len(error["message"]) < 500
    assert "Traceback" not in response.text
    for word in words:
        assert word in error["message"], error["message"]
    return error


def wait_for(client: Any, job_id: str, until: Any, timeout: float = 60.0, **kw: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job_id}", **kw).json()
        if until(view):
            return view
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not get there in {timeout} s: {view}")


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine("cpu")


@pytest.fixture(scope="module")
def config(models: dict) -> ServerConfig:
    adapters = [str(models["ckpt"][v, "safetensors"]) for v in ("sd15", "plus_sd15")]
    return ServerConfig(base=str(models["sd15"]), adapters=adapters, controlnets=[str(models["controlnet"]["sd15"])],
                        motion_adapter=str(models["motion"]), max_queue=8, max_pixels=64 * 64,
                        max_body_bytes=256 * 1024)  # fmt: skip


@pytest.fixture(scope="module")
def client(config: ServerConfig, engine: Engine) -> TestClient:
    with TestClient(create_app(config, engine)) as client:
        yield client


def small_app(models: dict, engine: Engine, **kw: Any) -> Any:
    return create_app(ServerConfig(base=str(models["sd15"]), adapters=[str(models["ckpt"]["sd15", "safetensors"])],
                                   **kw), engine)  # fmt: skip


# -- same pixels as the command line --------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sd15", "plus_sd15"])
def test_api_pixels_equal_the_cli(
    client: TestClient, models: dict, ref_png: Path, tmp_path: Path, variant: str
) -> None:
    """Both adapters are attached to the server's UNet at once; each request's pixels still equal the CLI's."""
    adapter = str(models["ckpt"][variant, "safetensors"])
    r = client.post("/v1/generate", json={**BASIC, "image": b64_png(Image.open(ref_png)), "adapter": adapter})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["seed"] == 0 and out["mime"] == "image/png" and len(out["images"]) == 1
    assert {"load", "generate", "encode"} <= set(out["seconds"])
    args = ["generate", "--base", str(models["sd15"]), "--adapter", adapter, "--image", str(ref_png), "--prompt",
            "a cat", "--negative-prompt", "blurry", "--scale", "0.7", "--steps", "2", "--seed", "0", "--width", "32",
            "--height", "32"]  # fmt: skip
    assert np.array_equal(b64_pixels(out["images"][0]), cli_pixels(args, tmp_path / "cli.png"))
    params = png_params(out["images"][0])  # the PNG carries its parameters, as the CLI's files do
    assert (
        params["seed"] == 0
        and params["scale"] == 0.7
        and params["adapter"] == adapter
        and params["index"] == 0
    )
    assert params == {**out["parameters"], "index": 0}
    assert (
        params["image_sha1"] == json.loads(Image.open(tmp_path / "cli.png").text["parameters"])["image_sha1"]
    )


def test_recipe_body_equals_the_cli_recipe_file(
    client: TestClient, models: dict, ref_png: Path, tmp_path: Path
) -> None:
    adapter = str(models["ckpt"]["sd15", "safetensors"])
    other = reference_image(seed=3, size=(40, 40))
    other.save(tmp_path / "other.png")
    recipe = {"adapter": [{"path": adapter, "scale": 0.6, "combine": "average",
                           "image": [{"path": "ref.png", "weight": 1.0}, {"path": "other.png", "weight": 0.5}],
                           "negative_image": "other.png"}]}  # fmt: skip
    (tmp_path / "ref.png").write_bytes(ref_png.read_bytes())
    (tmp_path / "ip.json").write_text(json.dumps(recipe))
    body_recipe = json.loads(json.dumps(recipe))
    entry = body_recipe["adapter"][0]
    entry["image"][0]["path"] = b64_png(Image.open(ref_png))
    entry["image"][1]["path"] = "data:image/png;base64," + b64_png(other)  # a data: URL works too
    entry["negative_image"] = b64_png(other)
    settings = {k: v for k, v in BASIC.items() if k != "scale"}
    r = client.post("/v1/generate", json={**settings, "recipe": body_recipe, "num_images": 2})
    assert r.status_code == 200, r.text
    args = ["generate", "--base", str(models["sd15"]), "--recipe", str(tmp_path / "ip.json"), "--prompt", "a cat",
            "--negative-prompt", "blurry", "--steps", "2", "--seed", "0", "--width", "32", "--height", "32",
            "--num-images", "2", "--output", str(tmp_path / "cli.png")]  # fmt: skip
    assert main(args) == 0
    for i, data in enumerate(r.json()["images"]):
        assert np.array_equal(
            b64_pixels(data), np.asarray(Image.open(tmp_path / f"cli-{i + 1}.png").convert("RGB"))
        )
    recorded = r.json()["parameters"]["recipe"]["adapter"][0]
    assert recorded["combine"] == "average" and recorded["image"][1]["path"].startswith("sha1:")


def test_img2img_equals_the_cli_and_other_modes_run(
    client: TestClient, models: dict, ref_png: Path, tmp_path: Path
) -> None:
    init = reference_image(seed=5, size=(48, 40))
    init.save(tmp_path / "init.png")
    body = {
        **BASIC,
        "image": b64_png(Image.open(ref_png)),
        "mode": "img2img",
        "init": b64_png(init),
        "strength": 0.6,
    }
    del body["width"], body["height"]
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    args = ["img2img", "--base", str(models["sd15"]), "--adapter", str(models["ckpt"]["sd15", "safetensors"]),
            "--image", str(ref_png), "--init", str(tmp_path / "init.png"), "--strength", "0.6", "--prompt", "a cat",
            "--negative-prompt", "blurry", "--scale", "0.7", "--steps", "2", "--seed", "0"]  # fmt: skip
    ours = b64_pixels(r.json()["images"][0])
    assert ours.shape == (40, 48, 3) and np.array_equal(ours, cli_pixels(args, tmp_path / "cli.png"))

    mask = Image.new("L", (48, 40), 0)
    mask.paste(255, (8, 8, 40, 32))
    r = client.post("/v1/generate", json={**body, "mode": "inpaint", "mask": b64_png(mask), "strength": 1.0})
    assert r.status_code == 200 and b64_pixels(r.json()["images"][0]).shape == (40, 48, 3)

    control = {**BASIC, "image": b64_png(Image.open(ref_png)), "controlnet": client.app.state.served.config.controlnets[0],
               "control_image": b64_png(reference_image(seed=7, size=(32, 32)))}  # fmt: skip
    r = client.post("/v1/generate", json=control)
    assert r.status_code == 200, r.text
    assert r.json()["parameters"]["controlnet"] == [control["controlnet"]]


def test_video_is_a_gif_with_its_parameters(client: TestClient, ref_png: Path) -> None:
    body = {**BASIC, "image": b64_png(Image.open(ref_png)), "mode": "video", "frames": 2, "fps": 4}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["mime"] == "image/gif" and out["frames"] == 2 and "images" not in out
    with Image.open(io.BytesIO(base64.b64decode(out["video"]))) as gif:
        assert gif.format == "GIF" and gif.n_frames == 2 and gif.size == (32, 32)
        assert json.loads(gif.info["comment"])["fps"] == 4


# -- what is served, open routes, the page ----------------------------------------------------------------------


def test_models_health_docs_and_page(client: TestClient, config: ServerConfig) -> None:
    models = client.get("/v1/models").json()
    assert models["base"] == config.base and [a["name"] for a in models["adapters"]] == config.adapters
    assert [a["variant"] for a in models["adapters"]] == ["basic", "plus"]
    assert models["controlnets"] == config.controlnets and models["motion_adapter"] == config.motion_adapter
    assert models["modes"] == ["t2i", "img2img", "inpaint", "video"]
    assert models["device"] == "cpu" and models["dtype"] == "float32"
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["auth"] is False and health["queue"]["active"] == 0
    docs = client.get("/docs")
    # Swagger UI from local files: works offline
    assert docs.status_code == 200 and "https://" not in docs.text
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/generate", "/v1/jobs", "/v1/jobs/{job_id}", "/v1/models", "/healthz"} <= set(spec["paths"])
    schema = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(schema["properties"]) == set(FIELDS)
    page = client.get("/")
    assert page.status_code == 200 and "<title>ipadapter</title>" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # offline: no CDN, no external fonts
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert_error(client.get("/nope"), 404, "no route GET /nope")
    assert_error(client.put("/v1/models"), 405, "PUT /v1/models: method not allowed")


def test_every_generation_option_is_accepted_or_refused_on_purpose() -> None:
    options = set(FIELDS) - set(RESULT_FIELDS)  # the result's extras (influence maps) are not job options
    assert options | set(REFUSED) == set(OPTIONS) and not set(FIELDS) & set(REFUSED)


def test_cli_flags_openapi_schema_and_batch_keys_are_one_set(client: TestClient, tmp_path: Path) -> None:
    """One option table: the generation commands' flags, the server's schema (with the keys it refuses on
    purpose, each with a reason) and a manifest line's keys are the same set."""
    from ipadapter.batch import BATCH_KEYS, read_manifest
    from ipadapter.cli import build_parser
    from ipadapter.modes import COMMAND_OF

    front_end = {"help", "dtype", "device", "compile", "output", "json", "run", "mode", "debug", "command"}
    front_end |= {"influence_map"}  # what the result also holds: a flag, a manifest key and a server field
    front_end |= {
        "max_pixels",
        "max_images",
        "max_steps",
        "max_frames",
    }  # limits: each front end sets its own
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    flags = {
        action.dest
        for command in COMMAND_OF.values()
        for action in sub.choices[command]._actions
        if action.dest not in front_end
    }
    spec = client.get("/openapi.json").json()
    schema = spec["paths"]["/v1/generate"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(
        json.dumps({**dict.fromkeys(OPTIONS), "base": "b", "output": "a.png"})
        + "\n"
        + '{"base": "b", "bogus": 1}\n'
    )
    every_key, bogus = read_manifest(manifest, tmp_path)
    assert every_key.error is None and "unknown key(s) bogus" in bogus.error
    assert flags | {"mode"} == set(OPTIONS) == set(schema["properties"]) - set(RESULT_FIELDS) | set(REFUSED)
    # what a manifest line adds: where its result goes, and the result's extras (as the server's RESULT_FIELDS)
    assert set(BATCH_KEYS) == {"output", *RESULT_FIELDS}


# -- bad requests: each the right 4xx with a clear one-line message ---------------------------------------------


def _bad_bodies(ref: str, served: ServerConfig) -> list[tuple[Any, int, tuple[str, ...]]]:
    big = b64_png(reference_image(size=(80, 80)))  # 6,400 pixels > the test server's 4,096
    net = served.controlnets[0]
    return [
        (b'{"prompt": "a cat", ', 400, ("not valid JSON", "line 1")),
        (b"[1, 2]", 400, ("JSON list", "expected a JSON object")),
        (b"[" * 100_000, 400, ("nested too deeply",)),
        (b'{"prompt": "\xc3\x28"}', 400, ("not UTF-8",)),
        ({"image": "%%%not-base64%%%"}, 422, ("not base64 image data",)),
        ({"image": base64.b64encode(b"just some text").decode()}, 422, ("not a readable image",)),
        ({"image": "/home/user/secret.png"}, 422, ("paths are not accepted",)),
        ({"image": "ref.png"}, 422, ("paths are not accepted",)),
        (
            {"image": ref, "init": "../init.png", "mode": "img2img"},
            422,
            ("init image", "paths are not accepted"),
        ),
        ({"image": ref, "colour": "red"}, 422, ("unknown key(s) 'colour'",)),
        (
            {"image": ref, "adapter": "h94/IP-Adapter/models/ip-adapter_sd15.safetensors"},
            422,
            ("is not a served adapter",),
        ),
        (
            {"image": ref, "controlnet": "lllyasviel/sd-controlnet-canny", "control_image": ref},
            422,
            ("is not a served ControlNet",),
        ),
        (
            {"image": ref, "controlnet": [net, net], "control_image": [ref]},
            422,
            ("2 'controlnet' but 1 'control_image'",),
        ),
        (
            {"image": ref, "controlnet": net, "control_image": ref, "control_scale": [1, 2]},
            422,
            ("2 'control_scale' values for 1 ControlNet",),
        ),
        ({"image": ref, "control_scale": 0.5}, 422, ("'control_scale' without 'controlnet'",)),
        ({"image": ref, "mode": "inpaint", "init": ref, "mask": ref}, 422, ("mask has colour",)),
        (
            {"recipe": {"adapter": [{"path": "/etc/other.safetensors", "image": [ref]}]}},
            422,
            ("recipe: adapter[0].path", "is not a served adapter"),
        ),
        (
            {"recipe": {"adapter": [{"path": served.adapters[0], "image_encoder": "/x", "image": [ref]}]}},
            422,
            ("image_encoder is set by the server",),
        ),
        (
            {"recipe": {"adapter": [{"path": served.adapters[0], "image": [{"path": "/tmp/x.png"}]}]}},
            422,
            ("paths are not accepted",),
        ),
        (
            {"recipe": {"adapter": [{"path": served.adapters[0], "image": [{"embeds": "e.safetensors"}]}]}},
            422,
            ("embeds is not accepted",),
        ),
        ({"image": ref, "base": "/models/other"}, 422, ("'base' is set by the server",)),
        ({"image": ref, "motion_adapter": "/models/m"}, 422, ("'motion_adapter' is set by the server",)),
        ({"embeds": "/tmp/e.safetensors"}, 422, ("'embeds' is not accepted",)),
        ({"image": big}, 422, ("80x80 = 6,400 pixels", "at most 4,096")),
        ({"image": ref, "width": 128, "height": 128}, 422, ("128x128 = 16,384 pixels", "at most 4,096")),
        ({"image": ref, "width": 256}, 422, ("256x32 = 8,192 pixels",)),
        ({"image": ref, "steps": 10_000}, 422, ("'steps' is 10000", "at most 500")),
        ({"image": ref, "steps": "many"}, 422, ("'steps' is 'many'",)),
        ({"image": ref, "scheduler": "fast"}, 422, ("'scheduler' is 'fast'",)),
        ({"image": [ref, 5]}, 422, ("'image' is int", "expected an image")),
        ({"image": ref, "frames": 4}, 422, ("'frames' is for mode video", "leave it out")),
        ({"image": ref, "scheduler": ["ddim"]}, 422, ("'scheduler' is ['ddim']", "one of")),
        ({"image": ref, "seed": 2**64}, 422, ("'seed' is 18446744073709551616",)),
        (
            {
                "image": ref,
                "mode": "img2img",
                "init": b64_png(Image.new("RGB", (1, 1))),
                "width": None,
                "height": None,
            },
            422,
            ("init image is 1x1", "at least 8x8"),
        ),
        ({"image": ref, "mode": "img2img"}, 422, ("img2img needs 'init'",)),
        ({"image": ref, "mode": "dream"}, 422, ("'mode' is 'dream'",)),
        ({"prompt": "no reference"}, 422, ("no reference",)),
        ({"image": ref, "layer_weights": "t99=1"}, 422, ("t99",)),  # found by the engine, at run time
    ]


def test_bad_requests_get_clear_4xx(client: TestClient, config: ServerConfig, ref_png: Path) -> None:
    ref = b64_png(Image.open(ref_png))
    for body, status, words in _bad_bodies(ref, config):
        if isinstance(body, bytes):
            kw: dict[str, Any] = {"content": body}
        else:  # a recipe holds the scale itself
            kw = {
                "json": {**{k: v for k, v in BASIC.items() if k != "scale" or "recipe" not in body}, **body}
            }
        error = assert_error(client.post("/v1/generate", **kw), status, *words)
        assert error["type"] == ("invalid_json" if status == 400 else "invalid_input")
    assert client.get("/healthz").json()["queue"]["active"] == 0  # refused requests hold no slot


def test_body_limit_by_length_and_for_chunked_bodies(client: TestClient, ref_png: Path) -> None:
    huge = json.dumps({**BASIC, "prompt": "x" * 300_000}).encode()
    assert_error(client.post("/v1/generate", content=huge), 413, "262,144 bytes")

    def chunks():  # no Content-Length: the limit holds while the body streams
        for i in range(0, len(huge), 16_384):
            yield huge[i : i + 16_384]

    r = client.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"})
    assert_error(r, 413, "larger than this server's limit")
    assert client.get("/healthz").json()["queue"]["active"] == 0


def test_token_and_unserved_mode(models: dict, engine: Engine, ref_png: Path) -> None:
    with TestClient(small_app(models, engine, token=TOKEN)) as c:
        assert c.get("/healthz").status_code == 200 and c.get("/healthz").json()["auth"] is True
        assert c.get("/").status_code == 200  # the page is open; it asks for the token
        for method, path in (("GET", "/v1/models"), ("POST", "/v1/generate"), ("POST", "/v1/jobs"),
                             ("GET", "/v1/jobs/x"), ("DELETE", "/v1/jobs/x")):  # fmt: skip
            r = c.request(method, path, json={})
            assert_error(r, 401, "no bearer token")
            assert r.headers["www-authenticate"] == "Bearer"
        for header in (f"Bearer {TOKEN}x", "Bearer ", f"Basic {TOKEN}", TOKEN):
            assert c.get("/v1/models", headers={"Authorization": header}).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert c.get("/v1/models", headers=auth).json()["modes"] == ["t2i", "img2img", "inpaint"]
        body = {**BASIC, "image": b64_png(Image.open(ref_png)), "mode": "video"}
        assert_error(c.post("/v1/generate", json=body, headers=auth), 422, "mode 'video' is not available",
                     "no motion adapter")  # fmt: skip
        assert c.post("/v1/generate", json={**body, "mode": "t2i"}, headers=auth).status_code == 200


def test_unexpected_errors_are_short_json(
    client: TestClient, ref_png: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    body = {**BASIC, "image": b64_png(Image.open(ref_png))}
    engine = client.app.state.engine
    monkeypatch.setattr(
        engine, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom at /srv/secret"))
    )
    error = assert_error(client.post("/v1/generate", json=body), 500, "internal error (RuntimeError)")
    assert "secret" not in error["message"]
    monkeypatch.undo()
    import ipadapter.server.app as app_module

    monkeypatch.setattr(app_module, "_build", lambda *a: {}["missing"])
    c = TestClient(client.app, raise_server_exceptions=False)  # no `with`: its lifespan would close the queue
    assert_error(c.post("/v1/generate", json=body), 500, "internal error (KeyError)")  # the catch-all handler
    assert client.get("/healthz").json()["queue"]["active"] == 0


# -- jobs: create, progress, cancel, queue bounds, memory bounds -----------------------------------------------


def test_jobs_progress_cancel_and_queue_full(
    client: TestClient, ref_png: Path, models: dict, engine: Engine
) -> None:
    body = {**BASIC, "image": b64_png(Image.open(ref_png))}
    before = b64_pixels(client.post("/v1/generate", json=body).json()["images"][0])

    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 202 and r.headers["location"] == f"/v1/jobs/{r.json()['id']}"
    view = wait_for(client, r.json()["id"], lambda v: v["status"] == "done")
    assert view["progress"] == {"step": 2, "total": 2}
    assert np.array_equal(b64_pixels(view["result"]["images"][0]), before)
    assert view["result"]["seconds"]["total"] >= view["result"]["seconds"]["generate"]

    long = client.post("/v1/jobs", json={**body, "steps": 400}).json()["id"]
    queued = client.post("/v1/jobs", json=body).json()["id"]
    running = wait_for(client, long, lambda v: v["status"] == "running" and v["progress"]["step"] >= 1)
    assert running["progress"]["total"] == 400
    view = client.get(f"/v1/jobs/{queued}").json()
    assert view["status"] == "queued" and view["position"] == 1
    assert client.delete(f"/v1/jobs/{queued}").json()["status"] == "cancelled"  # while queued: at once
    client.delete(f"/v1/jobs/{long}")  # while running: at its next step
    view = wait_for(client, long, lambda v: v["status"] == "cancelled", timeout=30)
    assert view["progress"]["step"] < 400 and "result" not in view
    assert client.get("/healthz").json()["queue"]["active"] == 0
    # a cancelled run leaves nothing behind: the same request gives the same pixels
    assert np.array_equal(b64_pixels(client.post("/v1/generate", json=body).json()["images"][0]), before)

    deleted = client.delete(f"/v1/jobs/{view['id']}").json()  # a finished job: its record is dropped
    assert deleted == {"id": long, "status": "cancelled", "deleted": True}
    for method in ("GET", "DELETE"):
        assert_error(client.request(method, f"/v1/jobs/{long}"), 404, f"no job '{long}'")
    assert_error(client.get("/v1/jobs/unknown-id"), 404, "no job 'unknown-id'")

    with TestClient(small_app(models, engine, max_queue=2)) as c:  # a full queue: 429 + Retry-After
        ids = [c.post("/v1/jobs", json={**body, "steps": 400}).json()["id"] for _ in range(2)]
        for path in ("/v1/jobs", "/v1/generate"):
            r = c.post(path, json=body)
            assert_error(r, 429, "queue is full (2 jobs")
            assert int(r.headers["retry-after"]) >= 1
        for job_id in ids:
            c.delete(f"/v1/jobs/{job_id}")
        for job_id in ids:
            wait_for(c, job_id, lambda v: v["status"] == "cancelled")
        assert c.post("/v1/jobs", json=body).status_code == 202


def test_finished_jobs_are_kept_only_up_to_a_bound(models: dict, engine: Engine, ref_png: Path) -> None:
    body = {**BASIC, "image": b64_png(Image.open(ref_png))}
    with TestClient(small_app(models, engine, keep_finished=2, keep_seconds=30)) as c:
        ids = [c.post("/v1/jobs", json=body).json()["id"] for _ in range(4)]
        wait_for(c, ids[-1], lambda v: v["status"] == "done")
        assert [c.get(f"/v1/jobs/{i}").status_code for i in ids] == [404, 404, 200, 200]
        queue = c.app.state.queue
        assert all(t.job is None for t in queue._jobs.values())  # decoded inputs dropped after the run
    with TestClient(small_app(models, engine, keep_seconds=0.2)) as c:
        job_id = c.post("/v1/jobs", json=body).json()["id"]
        wait_for(c, job_id, lambda v: v["status"] == "done")
        time.sleep(0.3)
        assert c.get(f"/v1/jobs/{job_id}").status_code == 404


# -- a real server: concurrent clients, disconnects --------------------------------------------------------------


def test_concurrent_requests_get_200_or_429_and_the_server_lives(
    models: dict, engine: Engine, ref_png: Path
) -> None:
    body = {**BASIC, "image": b64_png(Image.open(ref_png))}
    with serve_in_thread(small_app(models, engine, max_queue=4)) as url:
        start, statuses, retry = threading.Barrier(16), [], []

        def client() -> None:
            start.wait(timeout=30)
            r = httpx.post(f"{url}/v1/generate", json=body, timeout=120)
            statuses.append(r.status_code)
            if r.status_code == 429:
                retry.append(int(r.headers["retry-after"]))
            else:
                assert len(r.json()["images"]) == 1

        threads = [threading.Thread(target=client) for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
        assert len(statuses) == 16 and set(statuses) <= {200, 429}, statuses
        assert statuses.count(200) >= 4 and statuses.count(429) >= 1 and all(s >= 1 for s in retry)
        health = httpx.get(f"{url}/healthz", timeout=10).json()
        assert health["status"] == "ok" and health["queue"]["active"] == 0
        assert httpx.post(f"{url}/v1/generate", json=body, timeout=60).status_code == 200


def test_a_client_that_disconnects_frees_its_slot_and_chunked_bodies_are_limited(
    models: dict, engine: Engine, ref_png: Path
) -> None:
    body = {**BASIC, "image": b64_png(Image.open(ref_png))}
    with serve_in_thread(small_app(models, engine, max_queue=1, max_body_bytes=256 * 1024)) as url:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/generate", json={**body, "steps": 400}, timeout=httpx.Timeout(10, read=1.0))
        deadline = time.monotonic() + 20
        while (
            httpx.get(f"{url}/healthz", timeout=10).json()["queue"]["active"] and time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert httpx.get(f"{url}/healthz", timeout=10).json()["queue"]["active"] == 0
        assert httpx.post(f"{url}/v1/generate", json=body, timeout=60).status_code == 200
