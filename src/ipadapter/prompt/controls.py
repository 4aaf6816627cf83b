"""The options of one adapter's image prompt in a call: its references and how they are used.

Declared once here (:class:`~ipadapter.fields.Option` rows); the recipe's fields
(:class:`~ipadapter.prompt.recipe.Control`), the command line's flags, batch keys and the server's JSON schema
are made from them (:data:`ipadapter.jobs.options.OPTIONS` holds them with the other generation options).
"""

from __future__ import annotations

from ..fields import Option, table
from .blocks import CURVE_NAMES, PRESET_NAMES
from .images import CROP_MODES

MAX_SCALE = (
    5.0  # beyond this an image prompt only burns the picture (all black at 1e30): refused as a mistake
)
COMBINE_MODES = ("concat", "average", "norm-average", "add", "subtract")
# How the branch's weight enters its attention (ComfyUI's names and formulas; ``C``: the layer's inner width):
# V only: w * Attn(Q, K, V); K+V: Attn(Q, wK, wV); "w/ C penalty": w * C / 1280 instead of w; K+mean(V): the
# values' mean over the tokens is scaled, their spread around it kept.
EMBEDS_SCALINGS = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
NOISE_KINDS = ("fade", "dissolve", "gaussian", "shuffle")

# The references of the single-adapter form (flags, batch keys, JSON); a recipe lists them as image tables.
REFERENCES = table(
    Option("image", "image", "reference image PATH[:WEIGHT]; repeat for several references (see combine)",
           many=True),
    Option("embeds", "file", "reference from an `ipadapter embed` file, FILE[:WEIGHT]; repeatable", many=True,
           server="is not accepted by the server (embeddings files are server-side files); send the reference "
           "image as base64 in 'image'"),
    Option("face_embeds", "faces", "FaceID: a face-embeddings FILE[:WEIGHT] (.npy / .safetensors, e.g. from "
           "`ipadapter face-embed`); repeatable. The server's JSON: a face's 512 numbers, or a list of faces",
           many=True),
    Option("face_image", "image", "FaceID: a face image PATH[:WEIGHT], its largest face detected with InsightFace "
           "(pip install 'ipadapter[face]'); repeatable", many=True),
    Option("image_mask", "image", "regional mask per reference (white = where it acts), in the order of image, "
           "embeds, face_embeds, face_image", many=True),
    Option("crop", "choice", "how a non-square reference is fitted (tiled: split into square tiles, each acting "
           "on its part of the picture)", default="center", choices=CROP_MODES),
)  # fmt: skip

# How one adapter uses its references; in recipe files' order (a recipe's [[adapter]] keys).
CONTROLS = table(
    Option("scale", "number", "image prompt strength, 0 to 5 (0 = off, 1.0 = full strength)", default=1.0,
           low=0, high=MAX_SCALE, example="0.7"),
    Option("combine", "choice", "how several references combine", default="concat", choices=COMBINE_MODES),
    Option("start", "number", "denoising progress at which the image prompt starts (0-1)", default=0.0, low=0,
           high=1, expect="a fraction of the denoising run in [0, 1]", example="0.0"),
    Option("end", "number", "denoising progress at which it ends (0-1)", default=1.0, low=0, high=1,
           expect="a fraction of the denoising run in [0, 1]", example="1.0"),
    Option("preset", "choice", "blocks for style / composition (SD1.5 and SDXL)", choices=PRESET_NAMES),
    Option("composition_weight", "number", "composition blocks' weight in style+composition", default=1.0,
           low=0, example="1.0"),
    Option("composition_image", "image", "style and composition from two images: this image's layout drives the "
           "composition blocks, the references the style (SD1.5 and SDXL; default preset style+composition)"),
    Option("style_boost", "number", "style-precise: the composition blocks' weight, absolute as in ComfyUI "
           "(default: the scale)", low=0, high=MAX_SCALE, example="1.0"),
    Option("composition_boost", "number", "composition-precise: the style blocks' weight, absolute as in ComfyUI "
           "(default: the scale)", low=0, high=MAX_SCALE, example="1.0"),
    Option("layer_weights", "weights", 'weight per transformer block, e.g. "t3=0.5,t6=1.0" (unlisted: 0)'),
    Option("curve", "choice", "weight curve over the transformer blocks", choices=CURVE_NAMES),
    Option("negative_image", "image", "image whose tokens replace the unconditional image tokens (FaceID: a face "
           "image)"),
    Option("negative_noise", "choice", "make the negative image from noise (ComfyUI's IPAdapter Noise), over "
           "negative_image if given, else black; deterministic from noise_seed", choices=NOISE_KINDS),
    Option("negative_noise_strength", "number", "how much noise the negative image gets, 0 to 1", default=1.0,
           low=0, high=1, example="0.6"),
    Option("negative_noise_blur", "int", "blur of the noise negative in pixels (0 = none)", default=0, low=0,
           high=32, example="0"),
    Option("noise_seed", "int", "seed of the noise negative (default: the generation's seed, else 0)", low=0,
           example="7"),
    Option("embeds_scaling", "choice", "how the weight enters the image attention (ComfyUI's embeds scaling)",
           default="V only", choices=EMBEDS_SCALINGS),
    Option("unfold_batch", "bool", "spread the references one per generated image (or video frame) instead of "
           "using all of them everywhere; a shorter list repeats its last reference", default=False),
    Option("sharpening", "number", "tiled references: contrast-adaptive sharpening of the tiles, 0 to 1",
           default=0.0, low=0, high=1, example="0.3"),
    Option("enhance_tiles", "int", "ClipVision enhancer: also encode each reference as N x N tiles and merge "
           "their features (1 = off)", default=1, low=1, high=16, example="2"),
    Option("enhance_ratio", "number", "ClipVision enhancer: the whole image's share against the merged tiles",
           default=1.0, low=0, high=1, example="0.5"),
    Option("encode_batch_size", "int", "images per image-encoder call (0 = one at a time: each image's features "
           "are then independent of the others; larger is faster on a GPU, equal within float rounding)",
           default=0, low=0, example="16"),
    Option("lora_scale", "number", "FaceID: strength of the LoRA the adapter carries, 0 to 5 (default 1.0, as "
           "trained and as diffusers applies it)", low=0, high=MAX_SCALE, example="0.6"),
    Option("s_scale", "number", "FaceID-PlusV2: weight of the shortcut (ComfyUI's weight_faceidv2; default 1.0)",
           low=0, high=MAX_SCALE, example="1.0"),
    Option("face_index", "text", "FaceID, a face image with several faces: largest (default), score (the "
           "detector's best), all (portraits: every face), or an index, 0 = leftmost"),
    Option("face_model_root", "model", "FaceID: folder holding InsightFace's models/buffalo_l (default "
           "~/.insightface)", server="is a setting of the server's machine, not of a request; leave it out"),
    Option("plus_version", "choice", "FaceID-Plus: v1 or v2 (keys cannot tell them apart; default: the file "
           "name's hint, else v1)", choices=("v1", "v2")),
)  # fmt: skip

IMAGE_CONTROLS = tuple(
    name for name, option in CONTROLS.items() if option.kind == "image"
)  # negative_image...
