"""Encode a reference once and store its features, for ``--embeds`` / ``embeds =`` / ``Reference(embeds=)``.

The file holds the encoder features of one reference image, the negative (unconditional) features, and a probe
of the encoder that made them (:mod:`ipadapter.prompt.embeds`): a later run with the same encoder skips the
encoder, and one with another encoder is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import InputError
from .prompt.images import ImageInput, image_key, load_image


@dataclass(frozen=True)
class Embedded:
    """What :func:`embed_reference` wrote."""

    output: Path
    feature: str  # "pooled" | "hidden": the encoder output the adapter reads
    shape: list[int]  # of the reference's features
    variant: str  # the adapter's official name(s), else its layout

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": str(self.output),
            "feature": self.feature,
            "shape": self.shape,
            "variant": self.variant,
        }


def check_embed_output(output: str | Path, *, force: bool = False) -> Path:
    """``output`` as a Path, refused unless it can take the embeddings: a ``.safetensors`` name, not an existing
    file (unless ``force``), in an existing folder. Cheap: nothing heavy is loaded."""
    output = Path(output)
    if output.suffix != ".safetensors":
        raise InputError(f"--output '{output}' must end in .safetensors")
    if output.is_dir():
        raise InputError(f"--output '{output}' is a folder; give a file name ending in .safetensors")
    if output.exists() and not force:
        raise InputError(f"output '{output}' exists; pass --force to overwrite it")
    if not output.parent.is_dir():
        raise InputError(
            f"output folder '{output.parent}' does not exist; create it or choose another --output"
        )
    return output


def embed_reference(
    adapter: str | Path,
    image: ImageInput,
    output: str | Path,
    *,
    image_encoder: str | Path | None = None,
    crop: str = "center",
    device: str = "auto",
    force: bool = False,
) -> Embedded:
    """Encode reference ``image`` with the image encoder adapter ``adapter`` (file, hub path or name) reads, and
    write the features to ``output`` (a ``.safetensors`` file).

    ``image_encoder``: the CLIP vision model (default: the one beside the adapter, or the official one for its
    layout); it must give the features the adapter reads. ``crop``: how a non-square image is fitted
    (:data:`ipadapter.prompt.images.CROP_MODES`). ``device``: auto, cpu, cuda, cuda:N or mps. ``force``:
    overwrite an existing ``output``. The output path and the image are checked before any model loads.
    """
    output = check_embed_output(output, force=force)
    image = load_image(image)
    # torch / transformers / diffusers load only now: a bad output or image is reported at once (CLI start-up)
    from .adapters.variants import detect
    from .fitting import check_encoder, open_adapter
    from .pipelines import pick_device, pick_dtype
    from .prompt.embeds import save_embeds
    from .prompt.encoder import ImageEncoder
    from .sources import default_encoder, load_image_encoder

    ckpt, source = open_adapter(adapter)
    spec = detect(ckpt)
    where = image_encoder or default_encoder(source, spec)
    on = pick_device(device)
    encoder = ImageEncoder(load_image_encoder(where, dtype=pick_dtype(None, on), device=on))
    check_encoder(spec, encoder, source)
    features = encoder.features([image], spec.feature, crop)[0]
    variant = "/".join(spec.names) or spec.layout
    save_embeds(
        output,
        features,
        encoder.negative_features(spec.feature, how=spec.negative),
        feature=spec.feature,
        encoder=encoder,
        encoder_name=str(where),
        crop=crop,
        variant=variant,
        image_sha1=image_key(image),
    )
    return Embedded(output, spec.feature, list(features.shape), variant)
