"""A FaceID adapter's LoRA from a separate file (h94's ``*_lora.safetensors`` for A1111 / ComfyUI, DESIGN.md §3.6).

The checkpoint's own LoRA is written out under each naming a LoRA file uses (kohya / A1111 with diffusers or SGM
block names and ``.alpha``; peft / diffusers with or without the metadata alpha; diffusers' attention processors;
ours), read back by ``build_lora(..., lora_file=...)`` and compared to the in-checkpoint LoRA through a UNet
forward with the hooks installed. Every refusal is one line and leaves the UNet without hooks.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from faceid_checkpoints import save_faceid  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ipadapter.adapters.checkpoint import load_checkpoint  # noqa: E402
from ipadapter.adapters.variants import detect  # noqa: E402
from ipadapter.errors import CheckpointError, IncompatibleModelError  # noqa: E402
from ipadapter.fitting import build_lora  # noqa: E402
from ipadapter.hosts.lora import LoRASet, lora_modules, read_lora_state  # noqa: E402
from ipadapter.pipelines import load_pipeline  # noqa: E402

ATOL = 1e-5
Lora = dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


@pytest.fixture(scope="module")
def setup(models: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("faceid_lora")
    unet = load_pipeline(models["sd15"]).unet.eval()
    gen = torch.Generator().manual_seed(0)
    inputs = (
        torch.randn(1, 4, 8, 8, generator=gen),
        torch.tensor(10),
        torch.randn(1, 6, unet.config.cross_attention_dim, generator=gen),
    )
    return {
        "folder": folder,
        "unet": unet,
        "inputs": inputs,
        "faceid": save_faceid(folder, "faceid", "sd15", "safetensors"),
        "other": save_faceid(folder, "faceid", "sd15", "safetensors", seed=1, name="other-faceid"),
        "portrait": save_faceid(folder, "faceid-portrait", "sd15", "safetensors"),
    }


def _module(unet, layer_id: int, part: str) -> str:  # noqa: ANN001
    """The module path of one projection: ``<attention>.to_q`` ... ``<attention>.to_out.0``."""
    attn = list(unet.attn_processors)[layer_id].removesuffix(".processor")
    return f"{attn}.{'to_out.0' if part == 'to_out' else part}"


def _official(path: Path) -> Lora:
    """The checkpoint's own LoRA: ``{i}.{part}_lora.{down|up}.weight``."""
    out: dict = {}
    for key, value in load_checkpoint(path).ip_adapter.items():
        if m := re.fullmatch(r"(\d+)\.(to_\w+)_lora\.(down|up)\.weight", key):
            out.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = value
    return {slot: (d["down"], d["up"]) for slot, d in out.items()}


def _to_sgm(name: str, per_block: int) -> str:
    """kohya's diffusers block names -> the original UNet's (SGM) ones, as kohya writes SDXL LoRAs."""
    if m := re.match(r"lora_unet_down_blocks_(\d+)_attentions_(\d+)_(.+)", name):
        return f"lora_unet_input_blocks_{int(m[1]) * (per_block + 1) + int(m[2]) + 1}_1_{m[3]}"
    if m := re.match(r"lora_unet_up_blocks_(\d+)_attentions_(\d+)_(.+)", name):
        return f"lora_unet_output_blocks_{int(m[1]) * (per_block + 1) + int(m[2])}_1_{m[3]}"
    return name.replace("lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_")


def _kohya(lora: Lora, unet, alpha: str | None = None, sgm: bool = False) -> dict:  # noqa: ANN001
    """``lora_unet_<path with _>.lora_down/lora_up.weight`` (+ ``.alpha``). alpha "rank": alpha = rank;
    "half": alpha = rank / 2 with up doubled (the same update); "half-unscaled": alpha = rank / 2 alone."""
    out = {}
    for (layer_id, part), (down, up) in lora.items():
        name = "lora_unet_" + _module(unet, layer_id, part).replace(".", "_")
        if sgm:
            name = _to_sgm(name, unet.config.layers_per_block)
        rank = down.shape[0]
        out[f"{name}.lora_down.weight"] = down
        out[f"{name}.lora_up.weight"] = up * 2 if alpha == "half" else up
        if alpha is not None:
            out[f"{name}.alpha"] = torch.tensor(rank if alpha == "rank" else rank / 2, dtype=torch.float16)
    return out


def _peft(lora: Lora, unet, up_factor: float = 1.0) -> dict:  # noqa: ANN001
    out = {}
    for (layer_id, part), (down, up) in lora.items():
        out[f"unet.{_module(unet, layer_id, part)}.lora_A.weight"] = down
        out[f"unet.{_module(unet, layer_id, part)}.lora_B.weight"] = up * up_factor
    return out


def _processors(lora: Lora, unet) -> dict:  # noqa: ANN001
    """diffusers' attention-processor LoRA: ``unet.<attention>.processor.to_q_lora.down.weight``."""
    procs = list(unet.attn_processors)
    return {
        f"unet.{procs[i]}.{part}_lora.{side}.weight": mat
        for (i, part), (down, up) in lora.items()
        for side, mat in (("down", down), ("up", up))
    }


def _ours(lora: Lora) -> dict:
    return {
        f"{i}.{part}_lora.{side}.weight": mat
        for (i, part), (down, up) in lora.items()
        for side, mat in (("down", down), ("up", up))
    }


def _save(setup: dict, name: str, state: dict, metadata: dict | None = None) -> Path:
    path = setup["folder"] / f"{name}.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def _build(setup: dict, lora_file: Path | None = None, adapter: str = "faceid", strength: float = 1.0):
    ckpt = load_checkpoint(setup[adapter])
    spec = detect(ckpt)
    device, dtype = torch.device("cpu"), torch.float32
    return build_lora(spec, setup["unet"], ckpt, adapter, device, dtype, strength, lora_file=lora_file)


@torch.no_grad()
def _forward(setup: dict, lora: LoRASet | None) -> torch.Tensor:
    unet = setup["unet"]
    if lora is None:
        return unet(*setup["inputs"]).sample
    lora.install(lora_modules(unet, tuple(range(len(unet.attn_processors)))))
    try:
        return unet(*setup["inputs"]).sample
    finally:
        lora.remove()


def _no_hooks(unet) -> bool:  # noqa: ANN001
    return not any(m._forward_hooks for m in unet.modules())


NAMINGS = {
    "kohya": lambda lora, unet: (_kohya(lora, unet), None),
    "kohya-alpha-rank": lambda lora, unet: (_kohya(lora, unet, "rank"), None),
    "kohya-alpha-half": lambda lora, unet: (_kohya(lora, unet, "half"), None),
    "kohya-sgm-blocks": lambda lora, unet: (_kohya(lora, unet, "half", sgm=True), None),
    "peft": lambda lora, unet: (_peft(lora, unet), None),
    "peft-metadata-alpha": lambda lora, unet: (
        _peft(lora, unet, up_factor=2.0),
        {"lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 2})},
    ),
    "diffusers-processors": lambda lora, unet: (_processors(lora, unet), None),
    "official": lambda lora, unet: (_ours(lora), None),
}


@pytest.mark.parametrize("naming", list(NAMINGS))
def test_lora_file_equals_the_checkpoint_lora(setup: dict, naming: str) -> None:
    lora = _official(setup["faceid"])
    state, metadata = NAMINGS[naming](lora, setup["unet"])
    path = _save(setup, naming, state, metadata)
    plain = _forward(setup, None)
    reference = _forward(setup, _build(setup))
    assert (reference - plain).abs().max() > 100 * ATOL  # the LoRA does something here
    from_file = _forward(setup, _build(setup, path))
    torch.testing.assert_close(from_file, reference, atol=ATOL, rtol=0)
    assert _no_hooks(setup["unet"])


def test_alpha_scales_the_update_by_alpha_over_rank(setup: dict) -> None:
    """alpha = rank / 2 without doubling up: half the update, i.e. the checkpoint's LoRA at strength 0.5."""
    lora = _official(setup["faceid"])
    path = _save(setup, "half-unscaled", _kohya(lora, setup["unet"], "half-unscaled"))
    from_file = _forward(setup, _build(setup, path))
    half = _forward(setup, _build(setup, strength=0.5))
    full = _forward(setup, _build(setup))
    torch.testing.assert_close(from_file, half, atol=ATOL, rtol=0)
    assert (from_file - full).abs().max() > 100 * ATOL
    # folded into up at load time: the exported official weights compute the same update
    exported = _build(setup, path).official()
    key = "0.to_q_lora.up.weight"
    torch.testing.assert_close(exported[key], lora[0, "to_q"][1] * 0.5)


def test_a1111_and_sgm_names_resolve_to_the_official_ids(setup: dict) -> None:
    """Literal kohya names (as in h94's files and ComfyUI's logs) -> positions in unet.attn_processors (the mid
    block LAST); SGM names checked against diffusers' own converter."""
    from diffusers.loaders.lora_conversion_utils import _maybe_map_sgm_blocks_to_diffusers

    unet = setup["unet"]
    last = len(unet.attn_processors) - 1
    lora = _official(setup["faceid"])
    shapes = {slot: (down, up) for slot, (down, up) in lora.items()}
    cases = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (0, "to_q"),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0": (1, "to_out"),
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_k": (last, "to_k"),
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v": (1, "to_v"),
        "lora_unet_middle_block_1_transformer_blocks_0_attn1_to_out_0": (last - 1, "to_out"),
    }
    for name, slot in cases.items():
        down, up = shapes[slot]
        state = {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
        assert list(read_lora_state(state, unet)) == [slot], name

    kohya = _kohya(lora, unet, "rank")
    sgm = _kohya(lora, unet, "rank", sgm=True)
    mapped = _maybe_map_sgm_blocks_to_diffusers(
        dict(sgm), unet.config
    )  # renumbered; renamed next, as diffusers does
    renames = {"input_blocks": "down_blocks", "output_blocks": "up_blocks", "middle_block": "mid_block"}
    assert {re.sub("|".join(renames), lambda m: renames[m[0]], k) for k in mapped} == set(
        kohya
    )  # the test's names
    a, b = read_lora_state(kohya, unet), read_lora_state(sgm, unet)
    assert list(a) == list(b) == sorted(lora)
    assert all(a[k][2] == b[k][2] == 1.0 for k in a)


def test_the_file_wins_over_the_checkpoint_lora(setup: dict) -> None:
    other = _official(setup["other"])
    path = _save(setup, "other-kohya", _kohya(other, setup["unet"]))
    from_file = _forward(setup, _build(setup, path))  # the faceid checkpoint + the other one's LoRA file
    torch.testing.assert_close(from_file, _forward(setup, _build(setup, adapter="other")), atol=ATOL, rtol=0)
    assert (from_file - _forward(setup, _build(setup))).abs().max() > 100 * ATOL


def test_text_encoder_tensors_are_ignored_beside_a_unet_lora(setup: dict) -> None:
    lora = _official(setup["faceid"])
    te = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 32),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(32, 4),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(4.0),
    }
    path = _save(setup, "with-te", _kohya(lora, setup["unet"]) | te)
    torch.testing.assert_close(
        _forward(setup, _build(setup, path)), _forward(setup, _build(setup)), atol=ATOL, rtol=0
    )
    only_te = _save(setup, "only-te", te)
    with pytest.raises(CheckpointError) as info:
        _build(setup, only_te)
    assert "no UNet attention LoRA in" in str(info.value) and "3 tensors" in str(info.value)


def _refusal(setup: dict, case: str) -> tuple[type, Path, str, str]:
    """(error class, lora file, adapter, needle) for one refusal."""
    unet = setup["unet"]
    lora = _official(setup["faceid"])
    kohya = _kohya(lora, unet, "rank")
    q0 = "lora_unet_" + _module(unet, 0, "to_q").replace(".", "_")
    folder = setup["folder"]
    if case == "other-module":
        extra = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"
        state = kohya | {
            f"{extra}.lora_down.weight": torch.randn(4, 128),
            f"{extra}.lora_up.weight": torch.randn(32, 4),
        }
        return CheckpointError, _save(setup, case, state), "faceid", "ff_net_2"
    if case == "shape":
        state = kohya | {f"{q0}.lora_down.weight": kohya[f"{q0}.lora_down.weight"][:, :-1]}
        return (
            CheckpointError,
            _save(setup, case, state),
            "faceid",
            f"{_module(unet, 0, 'to_q')} has down [4, 31] and up [32, 4]",
        )
    if case == "no-up":
        state = {k: v for k, v in kohya.items() if k != f"{q0}.lora_up.weight"}
        return CheckpointError, _save(setup, case, state), "faceid", "no up matrix"
    if case == "incomplete":
        state = {k: v for k, v in kohya.items() if not k.startswith(q0 + ".")}
        return CheckpointError, _save(setup, case, state), "faceid", "lacks 1 of them, e.g. layer 0 to_q"
    if case == "two-namings":
        state = kohya | {"0.to_q_lora.down.weight": lora[0, "to_q"][0].clone()}
        return CheckpointError, _save(setup, case, state), "faceid", "two LoRA tensors"
    if case == "alpha-not-scalar":
        state = kohya | {f"{q0}.alpha": torch.ones(2)}
        return CheckpointError, _save(setup, case, state), "faceid", "not one finite alpha"
    if case == "not-a-lora":
        state = {"proj.weight": torch.randn(4, 4), "norm.bias": torch.randn(4)}
        return CheckpointError, _save(setup, case, state), "faceid", "not a LoRA file"
    if case == "rslora":
        meta = {
            "lora_adapter_metadata": json.dumps({"unet.r": 4, "unet.lora_alpha": 4, "unet.use_rslora": True})
        }
        return CheckpointError, _save(setup, case, _peft(lora, unet), meta), "faceid", "rsLoRA"
    if case == "bin":
        path = folder / "lora.bin"
        torch.save(kohya, path)
        return CheckpointError, path, "faceid", "must be .safetensors"
    if case == "missing":
        return CheckpointError, folder / "nowhere.safetensors", "faceid", "no such LoRA file"
    if case == "truncated":
        good = _save(setup, "good", kohya)
        path = folder / "truncated.safetensors"
        path.write_bytes(good.read_bytes()[:1000])
        return CheckpointError, path, "faceid", "not a readable .safetensors"
    assert case == "portrait"
    return IncompatibleModelError, _save(setup, "for-portrait", kohya), "portrait", "has no LoRA"


REFUSALS = [
    "other-module", "shape", "no-up", "incomplete", "two-namings", "alpha-not-scalar",
    "not-a-lora", "rslora", "bin", "missing", "truncated", "portrait",
]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_one_line_and_hook_nothing(setup: dict, case: str) -> None:
    error, path, adapter, needle = _refusal(setup, case)
    with pytest.raises(error) as info:
        _build(setup, path, adapter=adapter)
    message = str(info.value)
    assert needle in message and "\n" not in message, message
    assert _no_hooks(setup["unet"])


def test_attach_with_a_separate_lora_file_gives_the_checkpoint_lora_picture(
    setup: dict, models: dict
) -> None:
    """Through ``attach(..., lora_file=)``: h94's separate *_lora.safetensors (kohya names) in place of the
    checkpoint's own LoRA makes the same image."""
    from helpers import CALL

    import ipadapter
    from ipadapter.pipelines import load_pipeline

    face = np.ones((1, 512), np.float32) / 512**0.5
    path = _save(setup, "kohya_attach.safetensors", _kohya(_official(setup["faceid"]), setup["unet"]))
    images = []
    for lora_file in (None, path):
        pipe = load_pipeline(models["sd15"])
        ip = ipadapter.attach(pipe, setup["faceid"], scale=0.7, lora_file=lora_file)
        images.append(np.asarray(ip(face, **CALL, generator=torch.Generator().manual_seed(0)).images))
    assert np.abs(images[0] - images[1]).max() <= 1e-5


def test_cli_lora_file_replaces_the_adapter_lora(setup: dict, models: dict, tmp_path: Path) -> None:
    """`generate --lora-file`: the checkpoint's LoRA scaled by alpha/rank = 1/2 through a kohya file gives the
    picture of the checkpoint's own LoRA at strength 0.5."""
    from helpers import png_pixels

    from ipadapter.cli import main
    from ipadapter.prompt.faces import save_face_embeds

    face = save_face_embeds(tmp_path / "face.safetensors", np.ones((1, 512), np.float32) / 512**0.5)
    rank = next(iter(_official(setup["faceid"]).values()))[0].shape[0]
    halved = _save(
        setup, "kohya_half.safetensors", _kohya(_official(setup["faceid"]), setup["unet"], alpha=rank / 2)
    )
    common = ["generate", "--base", str(models["sd15"]), "--adapter", str(setup["faceid"]), "--face-embeds",
              str(face), "--prompt", "a cat", "--steps", "2", "--width", "32", "--height", "32", "--seed", "0"]  # fmt: skip
    assert main([*common, "--lora-file", str(halved), "--output", str(tmp_path / "file.png")]) == 0
    assert main([*common, "--lora-scale", "0.5", "--output", str(tmp_path / "half.png")]) == 0
    assert main([*common, "--output", str(tmp_path / "full.png")]) == 0
    file, half, full = (png_pixels(tmp_path / f"{n}.png") for n in ("file", "half", "full"))
    assert np.abs(file - half).max() <= 1 and np.abs(file - full).max() > 2
