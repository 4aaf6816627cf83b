"""Write a diffusers SD1.5 / SDXL pipeline folder as one original-layout ("LDM") ``.safetensors`` file.

Community fine-tunes are shared in the layout of the original Stable Diffusion repositories (CompVis
``ldm`` for SD1.5, Stability ``sgm`` for SDXL); diffusers reads them with ``from_single_file``. We cannot
download one, so the tests make their own from the tiny pipelines. The key mapping is the inverse of
diffusers' ``single_file_utils`` converters (``convert_ldm_unet_checkpoint``,
``convert_ldm_vae_checkpoint``, ``convert_ldm_clip_checkpoint``, ``convert_open_clip_checkpoint``):

- UNet under ``model.diffusion_model.``: ``input_blocks`` / ``middle_block`` / ``output_blocks`` numbered
  as the original ``openaimodel.UNetModel`` does (one slot per resnet, plus one per down/upsampler),
  ``time_embed``, ``label_emb`` (SDXL's ``add_embedding``) and ``out``.
- VAE under ``first_stage_model.``: ``down.{i}.block.{j}``, ``up.{n-1-i}`` (reversed), ``mid.block_1/2``,
  ``mid.attn_1`` with ``q/k/v/proj_out`` stored as 1x1 convolutions.
- SD1.5 text encoder under ``cond_stage_model.transformer.`` (HF CLIP keys, ``text_model.`` prefixed).
- SDXL: CLIP-L under ``conditioner.embedders.0.transformer.`` (HF keys); the second encoder under
  ``conditioner.embedders.1.model.`` in OpenCLIP layout (fused ``in_proj`` qkv, ``ln_final``,
  ``positional_embedding``, ``token_embedding``, ``text_projection`` transposed).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD15_CLIP_PREFIX = "cond_stage_model.transformer."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

# Whole-name renames of the UNet's top-level layers (diffusers -> original).
_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}
# Layers inside a UNet ResBlock.
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
# Layers inside the VAE's mid-block attention.
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Layers inside one OpenCLIP residual block (the q/k/v projections are fused separately).
_OPENCLIP_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def _split_param(key: str) -> tuple[str, str]:
    """``a.b.weight`` -> (``a.b``, ``weight``)."""
    module, _, param = key.rpartition(".")
    return module, param


def unet_key(key: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str:
    """The original-layout name (without prefix) of a diffusers ``UNet2DConditionModel`` parameter.

    Down block ``b`` owns input slots ``1 + b*(L+1) .. 1 + b*(L+1) + L`` (L resnets, then its downsampler);
    up block ``b`` owns output slots ``b*(L+1) ..`` (L+1 resnets, its upsampler sharing the last slot at
    position 2 after an attention, else 1). The middle block is resnet, attention, resnet.
    """
    module, param = _split_param(key)
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    span = layers_per_block + 1
    if m := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = 1 + block * span + layer
        if kind == "resnets":
            return f"input_blocks.{slot}.0.{_UNET_RESNET[rest]}.{param}"
        return f"input_blocks.{slot}.1.{rest}.{param}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"input_blocks.{1 + int(m[1]) * span + layers_per_block}.0.op.{param}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", module):
        return f"middle_block.{2 * int(m[1])}.{_UNET_RESNET[m[2]]}.{param}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
        return f"middle_block.1.{m[1]}.{param}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        slot = block * span + layer
        if kind == "resnets":
            return f"output_blocks.{slot}.0.{_UNET_RESNET[rest]}.{param}"
        return f"output_blocks.{slot}.1.{rest}.{param}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        block = int(m[1])
        position = 2 if block in up_blocks_with_attention else 1
        return f"output_blocks.{block * span + layers_per_block}.{position}.conv.{param}"
    raise KeyError(f"no original-layout name for UNet parameter '{key}'")


def vae_key(key: str, num_up_blocks: int) -> str:
    """The original-layout name (without prefix) of a diffusers ``AutoencoderKL`` parameter."""
    module, param = _split_param(key)
    if m := re.fullmatch(r"(encoder|decoder)\.conv_norm_out", module):
        return f"{m[1]}.norm_out.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
        return f"encoder.down.{m[1]}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{param}"
    if m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
        return f"encoder.down.{m[1]}.downsample.conv.{param}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", module):
        level = num_up_blocks - 1 - int(m[1])
        return f"decoder.up.{level}.block.{m[2]}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{param}"
    if m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
        return f"decoder.up.{num_up_blocks - 1 - int(m[1])}.upsample.conv.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", module):
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}.{param}"
    if m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", module):
        return f"{m[1]}.mid.attn_1.{_VAE_ATTN[m[2]]}.{param}"
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)|quant_conv|post_quant_conv", module):
        return key
    raise KeyError(f"no original-layout name for VAE parameter '{key}'")


def _hf_clip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF CLIP text keys as the original checkpoints hold them: ``text_model.``-prefixed.

    transformers >= 5.6 flattened ``CLIPTextModel`` (no ``text_model.`` level); older versions and
    ``CLIPTextModelWithProjection`` keep it.
    """
    return {
        k if k.startswith("text_model.") or k.startswith("text_projection") else f"text_model.{k}": v
        for k, v in state.items()
    }


def openclip_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``CLIPTextModelWithProjection`` state dict in OpenCLIP ``TextTransformer`` layout."""
    state = _hf_clip_state(state)
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, param = _split_param(key)
        if module == "text_projection":  # nn.Linear (out, in) -> a matrix applied as x @ P: (in, out)
            out["text_projection"] = value.T.contiguous()
        elif module == "text_model.embeddings.position_embedding":
            out["positional_embedding"] = value
        elif module == "text_model.embeddings.token_embedding":
            out["token_embedding.weight"] = value
        elif module == "text_model.final_layer_norm":
            out[f"ln_final.{param}"] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj", module):
            qkv.setdefault((int(m[1]), param), {})[m[2]] = value
        elif m := re.fullmatch(r"text_model\.encoder\.layers\.(\d+)\.(.+)", module):
            out[f"transformer.resblocks.{m[1]}.{_OPENCLIP_BLOCK[m[2]]}.{param}"] = value
        else:
            raise KeyError(f"no OpenCLIP name for text encoder parameter '{key}'")
    for (layer, param), parts in qkv.items():  # nn.MultiheadAttention: one (3*d, d) in_proj, q;k;v
        fused = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = fused
    return out


def ldm_state_dict(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    """All weights of an SD1.5 / SDXL pipeline under their original single-file names."""
    out: dict[str, torch.Tensor] = {}

    unet_state = pipe.unet.state_dict()
    layers_per_block = pipe.unet.config.layers_per_block
    if not isinstance(layers_per_block, int):
        raise ValueError(f"per-block layers_per_block {layers_per_block} has no single-file layout")
    with_attention = {
        int(k.split(".")[1]) for k in unet_state if re.match(r"up_blocks\.\d+\.attentions\.", k)
    }
    for key, value in unet_state.items():
        out[UNET_PREFIX + unet_key(key, layers_per_block, with_attention)] = value

    num_up = len(pipe.vae.config.up_block_types)
    for key, value in pipe.vae.state_dict().items():
        name = vae_key(key, num_up)
        if ".mid.attn_1." in name and value.ndim == 2:  # linear (out, in) -> 1x1 conv (out, in, 1, 1)
            value = value[:, :, None, None]
        out[VAE_PREFIX + name] = value

    if getattr(pipe, "text_encoder_2", None) is None:
        for key, value in _hf_clip_state(pipe.text_encoder.state_dict()).items():
            out[SD15_CLIP_PREFIX + key] = value
    else:
        for key, value in _hf_clip_state(pipe.text_encoder.state_dict()).items():
            out[SDXL_CLIP_PREFIX + key] = value
        for key, value in openclip_state(pipe.text_encoder_2.state_dict()).items():
            out[SDXL_OPENCLIP_PREFIX + key] = value
    return out


def export_single_file(pipeline_folder: Path, out_file: Path) -> Path:
    """Load the diffusers pipeline at ``pipeline_folder`` and write it as one LDM-layout ``out_file``."""
    pipe = DiffusionPipeline.from_pretrained(str(pipeline_folder))
    state = {k: v.detach().contiguous().clone() for k, v in ldm_state_dict(pipe).items()}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out_file))
    return out_file
