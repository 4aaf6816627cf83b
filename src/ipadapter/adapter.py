"""Attach / detach IP-Adapters to the UNet of a diffusers pipeline, set their scale, and call it.

Official ``ip_adapter`` key ids count the UNet's attention processors in ``unet.attn_processors`` order
(down blocks, up blocks, mid block last): cross-attention layer k has id 2k+1 (DESIGN.md §3.1).
Everything is checked before any processor is replaced; a failure leaves the pipeline untouched.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from .adapters.checkpoint import Checkpoint
from .adapters.checks import problems
from .adapters.projection import build_projection
from .adapters.variants import AdapterSpec, detect, plus_version_hint
from .calls import check_call, compiled, native_size, num_frames, output_size, vae_factor
from .errors import CheckpointError, InputError
from .fitting import (
    build_lora,
    check_encoder,
    check_scale,
    check_supported,
    host_layers,
    load_weights,
    open_adapter,
    pick_encoder,
)
from .hosts import host_of
from .hosts.base import Host
from .hosts.lora import LoRASet, lora_modules
from .prompt.blocks import Block
from .prompt.conditioning import BranchControl, ImagePrompt
from .prompt.encoder import ImageEncoder
from .prompt.faces import FaceEmbeds, as_faces
from .prompt.images import ImageInput, load_image
from .prompt.recipe import Control, Recipe
from .prompt.recording import panel_names
from .prompt.references import Prepared, prepare, prompt_of


def _denoiser(pipe: Any) -> tuple[Host, Any]:
    """``pipe``'s host and denoiser (from under torch.compile's wrapper), or a one-line error for anything else."""
    found = host_of(pipe)
    if found is None:
        what = "None" if pipe is None else type(pipe).__name__
        raise InputError(
            f"expected a diffusers Stable Diffusion (1.5 / XL) or Flux pipeline, got {what}; load one with "
            "diffusers, e.g. StableDiffusionPipeline.from_pretrained(...) or FluxPipeline.from_pretrained(...)"
        )
    return found


class IPAdapter:
    """An IP-Adapter attached to one pipeline. Made by :func:`attach`."""

    def __init__(
        self,
        pipe: Any,
        host: Host,
        denoiser: Any,
        name: str,
        spec: AdapterSpec,
        projection: nn.Module,
        encoder: ImageEncoder,
        branches: dict[str, nn.Module],
        source: str,
    ) -> None:
        self.pipe = pipe
        self.host, self.denoiser = host, denoiser  # where it is attached: the pipeline's denoiser
        self.name = name
        self.spec = spec
        self.projection = projection
        self.encoder = encoder
        self.source = source
        self._branches = branches  # processor name -> this adapter's branch in that layer
        self.encoder_key: Any = ("object", id(encoder))  # adapters with equal keys share the encoder
        self._scale = 1.0
        self.lora: LoRASet | None = None  # FaceID: the LoRA it carries (hooks on the attention projections)
        self.plus_version: str | None = None  # FaceID-Plus: "v1" or "v2" (v2 adds the shortcut)
        self.s_scale = 1.0  # FaceID-PlusV2: the shortcut's weight (ComfyUI's weight_faceidv2)

    @property
    def scale(self) -> float:
        """Strength of the image prompt in every layer (0 = exactly the model without adapter)."""
        return self._scale

    @scale.setter
    def scale(self, value: float) -> None:
        self.set_scale(value)

    def set_scale(self, value: float) -> IPAdapter:
        """Set the strength for later calls: it travels in each call's prompt as a tensor, so a compiled UNet
        never recompiles for a new scale."""
        self._scale = check_scale(value)
        return self

    @property
    def lora_scale(self) -> float | None:
        """Strength of the LoRA a FaceID adapter carries (None: it has none); 0 = exactly without it."""
        return None if self.lora is None else self.lora.strength

    @lora_scale.setter
    def lora_scale(self, value: float) -> None:
        if self.lora is None:
            raise InputError(f"adapter '{self.name}' ({self.spec.layout}) carries no LoRA; drop lora_scale")
        self.lora.set_strength(check_scale(value, "lora_scale"))

    @property
    def layer_names(self) -> list[str]:
        """The UNet's cross-attention processors this adapter serves, in official id order."""
        return list(self._branches)

    @property
    def blocks(self) -> dict[str, Block]:
        """The transformer block of each layer of the denoiser (its host's block map)."""
        return self.host.block_map(self.denoiser)

    def parameters(self) -> list[nn.Parameter]:
        """What training changes: the projection's, every layer's image key/value weights, and a LoRA's."""
        branches = [p for b in self._branches.values() for p in b.parameters()]
        return [*self.projection.parameters(), *branches, *(self.lora.parameters() if self.lora else [])]

    def _layer_keys(self) -> dict[str, tuple[str, str]]:
        """Official ``ip_adapter`` key -> (processor name, tensor name inside the branch)."""
        return {
            f"{layer_id}.{name}": (proc_name, name)
            for proc_name, layer_id in zip(self._branches, self.spec.layer_ids, strict=True)
            for name in self._branches[proc_name].state_dict()
        }

    def state_dict(self) -> Checkpoint:
        """The adapter's current weights in the official layout (the live tensors, detached)."""
        ip_adapter = {
            key: self._branches[proc].get_parameter(name).detach()
            for key, (proc, name) in self._layer_keys().items()
        }
        if self.lora is not None:
            ip_adapter.update({k: v.detach() for k, v in self.lora.official().items()})
        image_proj = {k: v.detach() for k, v in self.projection.state_dict().items()}
        return Checkpoint(image_proj, ip_adapter, source=self.source)

    def load_state_dict(self, ckpt: Checkpoint) -> None:
        """Copy a checkpoint of the same layout into the adapter (its dtype and device stay)."""
        keys = self._layer_keys()
        lora = self.lora.official() if self.lora is not None else {}
        if set(ckpt.ip_adapter) != set(keys) | set(lora):
            raise CheckpointError(
                f"{ckpt.source}: its ip_adapter keys do not match adapter '{self.name}' "
                f"({len(ckpt.ip_adapter)} vs {len(keys) + len(lora)} tensors); expected the same layout"
            )
        load_weights(self.projection, ckpt.image_proj, "image_proj", ckpt.source)
        with torch.no_grad():
            for key, (proc, name) in keys.items():
                self._branches[proc].get_parameter(name).copy_(ckpt.ip_adapter[key])
            for key, weight in lora.items():
                weight.copy_(ckpt.ip_adapter[key])

    def unet_names(self) -> dict[str, str]:
        """Official ``ip_adapter`` key -> that weight's name in ``unet.state_dict()`` (e.g. to read it from
        a state dict FSDP gathered)."""
        return {
            key: f"{proc}.{self.denoiser.get_submodule(proc).slot(self.name)}.{name}"
            for key, (proc, name) in self._layer_keys().items()
        }

    @property
    def attached(self) -> bool:
        state = self.host.attachment(self.denoiser)
        return state is not None and state.adapters.get(self.name) is self

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Image tokens for encoder features. A time-conditioned projection (SD3.5) runs inside the denoiser at
        every step instead: its call-time "tokens" are the features themselves."""
        return features if self.spec.time_resampler is not None else self.projection(features)

    @torch.no_grad()
    def tokens(self, images: ImageInput | Sequence[ImageInput]) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens for reference image(s): ``(positive, negative)``, each ``(R, N, D)`` for R images.
        A FaceID adapter takes faces instead (:meth:`face_tokens`)."""
        if self.spec.feature == "face":
            return self.face_tokens(images)
        if not isinstance(images, list | tuple):
            images = [images]
        if not images:
            raise InputError("no reference image given; expected at least one image")
        for i, img in enumerate(images):
            if not isinstance(img, str | Path | Image.Image | bytes | bytearray):
                raise InputError(
                    f"reference {i} is a {type(img).__name__}; expected a file path, a PIL image or encoded "
                    "bytes (convert a tensor first, e.g. torchvision.transforms.functional.to_pil_image)"
                )
        rgb = [load_image(img) for img in images]
        feature = self.spec.feature
        param = next(self.projection.parameters())
        pos = self.encoder.features(rgb, feature).to(device=param.device, dtype=param.dtype)
        neg = self.encoder.negative_features(feature, how=self.spec.negative)
        neg = neg.to(device=param.device, dtype=param.dtype)
        pos_tokens = self.project(pos)
        neg_tokens = self.project(neg.unsqueeze(0)).expand_as(pos_tokens)
        return pos_tokens, neg_tokens

    @torch.no_grad()
    def face_tokens(
        self,
        faces: Any,
        negative: Any = None,
        *,
        s_scale: float | None = None,
        plus_version: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Image tokens of a FaceID adapter for ``faces``: ``(positive, negative)``, each ``(1, F*N, D)`` for F
        faces (their tokens side by side, as a portrait's are). ``faces`` and ``negative``: see
        :func:`~ipadapter.prompt.faces.as_faces` (embeddings, a face-embeddings file, or a face image). The
        default negative is the zero embedding (and, for Plus, the encoder's features of an all-zero input), as
        the reference implementations make it. ``s_scale`` / ``plus_version``: for this call (default: the
        handle's).
        """
        normed = self.spec.layout != "faceid-portrait-unnorm"
        face = as_faces(faces, normed=normed)
        param = next(self.projection.parameters())

        def rows(f: FaceEmbeds) -> torch.Tensor:
            return torch.as_tensor(f.embeds).to(device=param.device, dtype=param.dtype)  # (F, 512)

        embeds = rows(face)
        neg_face = None if negative is None else as_faces(negative, normed=normed)
        neg_embeds = torch.zeros_like(embeds) if neg_face is None else rows(neg_face)[:1].expand_as(embeds)
        if self.spec.layout != "faceid-plus":
            return self.projection(embeds[None]), self.projection(neg_embeds[None])  # (1, F*N, D)
        if not face.crops:
            raise InputError(
                f"adapter '{self.name}' is a FaceID-Plus adapter: it also reads the CLIP features of the aligned "
                f"face, and {face.source or 'these face embeddings'} carry no face crop; pass the face image, or "
                "embeddings made by `ipadapter face-embed` (it stores the crops)"
            )
        clip = self.encoder.features(face.crops, "hidden").to(device=param.device, dtype=param.dtype)
        if neg_face is not None and neg_face.crops:
            clip_neg = self.encoder.features(neg_face.crops[:1], "hidden")[0]
        else:
            clip_neg = self.encoder.negative_features("hidden")
        clip_neg = clip_neg.to(device=param.device, dtype=param.dtype).expand_as(clip)
        shortcut = (plus_version or self.plus_version) == "v2"
        weight = self.s_scale if s_scale is None else s_scale
        pos = self.projection(embeds, clip, shortcut, weight)  # (F, N, D)
        neg = self.projection(neg_embeds, clip_neg, shortcut, weight)
        return pos.reshape(1, -1, pos.shape[-1]), neg.reshape(1, -1, neg.shape[-1])

    def image_prompt(
        self,
        images: ImageInput | Sequence[ImageInput] | Control,
        num_prompts: int = 1,
        frames: int | None = None,
        *,
        images_per_prompt: int = 1,
        output_size: tuple[int, int] | None = None,
    ) -> ImagePrompt:
        """The ``image_prompt`` for a pipeline call with ``num_prompts`` text prompts.

        One reference serves every prompt (and every frame); or give one reference per prompt; or, for a
        video of ``frames`` frames, one reference per frame (the same sequence for every prompt). When the
        count equals both the prompts and the frames of a video, it is read as one per frame. A
        :class:`~ipadapter.prompt.recipe.Control` serves every prompt and frame with its references and options.
        The prompt carries the adapter's current scale. ``images_per_prompt``: the call's
        ``num_images_per_prompt``. ``output_size``: ``(height, width)`` of the images, for regional masks
        (default: the pipeline's own size; eager mode adapts to another, a compiled UNet needs it right).
        """
        if isinstance(images, Control):
            prompt = prompt_of(
                [(self, prepare(self, images))], num_prompts, images_per_prompt * (frames or 1)
            )
        else:
            prompt = self._plain_prompt(images, num_prompts, frames)
        size = output_size or (native_size(self.pipe),) * 2
        return _with_facts(prompt, self.pipe, images_per_prompt, frames, size)

    def _plain_prompt(
        self, images: ImageInput | Sequence[ImageInput], num_prompts: int, frames: int | None
    ) -> ImagePrompt:
        pos, neg = self.tokens(images)
        count = pos.shape[0]
        if frames is not None and frames > 1 and count == frames:  # one per frame: (P, F, N, D)
            pos, neg = pos.unsqueeze(0), neg.unsqueeze(0)
        elif count not in (1, num_prompts):
            per_frame = f", or one per frame ({frames})" if frames and frames > 1 else ""
            raise InputError(
                f"{count} reference images for {num_prompts} prompt(s); give one reference for all "
                f"prompts or one per prompt{per_frame}"
            )
        if pos.shape[0] != num_prompts:
            pos, neg = pos.expand(num_prompts, *pos.shape[1:]), neg.expand(num_prompts, *neg.shape[1:])
        # Value weights of one, as a Control with one reference has: both make the same compiled graph
        ones = torch.ones(pos.shape[-2])
        control = BranchControl(
            scale=self.scale, layer_scales=(1.0,) * len(self.layer_names), value_weights=ones
        )
        return ImagePrompt({self.name: pos}, {self.name: neg.contiguous()}, controls={self.name: control})

    def __call__(
        self,
        reference: ImageInput | Sequence[ImageInput] | Control,
        /,
        *,
        pipeline: Any = None,
        **pipe_kwargs: Any,
    ) -> Any:
        """Run the pipeline with ``reference`` as the image prompt; other arguments go to the pipeline.

        ``reference``: an image (path, PIL image, bytes), a list of them (one per prompt, or for a video one
        per frame), or a :class:`~ipadapter.prompt.recipe.Control` (several weighted references, masks, a step
        window, layer weights...). It is positional so that the pipeline's own ``image`` (init or control
        image) passes through. ``pipeline``: another pipeline sharing this adapter's UNet (e.g. made with
        ``from_pipe`` for another mode); by default the one the adapter was attached to. ``influence=`` an
        :class:`~ipadapter.prompt.recording.InfluenceRecorder` records where each adapter and reference acted
        (its ``maps()`` after the call; not with a compiled denoiser); :func:`run` and a recipe run take it too.
        """
        if isinstance(reference, Control):
            return run(self.pipe if pipeline is None else pipeline, [(self, reference)], **pipe_kwargs)

        def build(num_prompts: int, frames: int | None, _items: int) -> ImagePrompt:
            return self._plain_prompt(reference, num_prompts, frames)

        return _call(pipeline or self.pipe, [self], build, pipe_kwargs)

    def detach(self) -> None:
        """Remove this adapter; the last one out restores the UNet's original processors exactly."""
        detach(self.pipe, self.name)

    def __repr__(self) -> str:
        names = "/".join(self.spec.names) or "custom"
        return f"IPAdapter(name={self.name!r}, layout={self.spec.layout!r}, names={names!r}, scale={self._scale})"


def run(pipe: Any, entries: Sequence[tuple[IPAdapter, Control]], /, **pipe_kwargs: Any) -> Any:
    """Call ``pipe`` with several attached adapters at once, each with its own :class:`Control`.

    Every input is read and checked before the pipeline runs. The image tokens of all adapters go to every
    prompt (and every frame of a video).
    """
    prepared = [(ip, prepare(ip, control, f"adapter '{ip.name}' ")) for ip, control in entries]
    with _lora_strengths(prepared):
        return _call(
            pipe, [ip for ip, _ in entries], lambda n, _f, items: prompt_of(prepared, n, items), pipe_kwargs
        )


@contextmanager
def _lora_strengths(prepared: Sequence[tuple[IPAdapter, Prepared]]) -> Iterator[None]:
    """The FaceID LoRA strengths a call's controls ask for, during that call only (a 0-d tensor each: a
    compiled UNet reads the new value without recompiling)."""
    before = [(ip, ip.lora.strength) for ip, ready in prepared if ip.lora is not None]
    for ip, ready in prepared:
        if ready.control.lora_scale is not None and ip.lora is not None:
            ip.lora.set_strength(ready.control.lora_scale)
    try:
        yield
    finally:
        for ip, strength in before:
            ip.lora.set_strength(strength)


def _call(pipe: Any, adapters: Sequence[IPAdapter], build: Any, pipe_kwargs: dict[str, Any]) -> Any:
    """The one way a pipeline runs with image prompts: check, build the prompt, pass it, call."""
    for ip in adapters:
        if not ip.attached:
            raise InputError(f"adapter '{ip.name}' is detached; attach it again before generating")
        if ip.host.denoiser(pipe) is not ip.denoiser:
            raise InputError(
                f"{type(pipe).__name__} does not share the {ip.host.noun} adapter '{ip.name}' is attached to (a video "
                "pipeline builds its own); attach the adapter to the pipeline you call"
            )
    recorder = pipe_kwargs.pop("influence", None)
    if recorder is not None and adapters and compiled(pipe, adapters[0].denoiser):
        raise InputError(
            "influence maps record inside the denoiser, which a torch.compile-d denoiser cannot do; generate "
            "without --compile (or an uncompiled pipeline) to record them"
        )
    frames = num_frames(pipe, pipe_kwargs)
    pipe_kwargs = check_call(pipe, pipe_kwargs)
    prompt = pipe_kwargs.get("prompt")
    embeds = pipe_kwargs.get("prompt_embeds")
    num_prompts = len(prompt) if isinstance(prompt, list) else embeds.shape[0] if embeds is not None else 1
    copies = int(pipe_kwargs.get("num_images_per_prompt") or 1)
    image_prompt = _with_facts(
        build(num_prompts, frames, copies * (frames or 1)),
        pipe,
        copies,
        frames,
        output_size(pipe, pipe_kwargs),
    )
    if recorder is not None:
        image_prompt.recorder = recorder
        blocks = {ip.name: [ip.blocks[n] for n in ip.layer_names] for ip in adapters}
        recorder.begin(image_prompt, blocks, panel_names({ip.name: str(ip.source) for ip in adapters}))
    key = adapters[0].host.attention_kwargs if adapters else "cross_attention_kwargs"
    kwargs = dict(pipe_kwargs.pop(key, None) or {})
    kwargs["image_prompt"] = image_prompt
    return pipe(**{key: kwargs}, **pipe_kwargs)


def _with_facts(
    prompt: ImagePrompt, pipe: Any, copies: int, frames: int | None, size: tuple[int, int]
) -> ImagePrompt:
    """``prompt`` told the facts of the pipeline call it serves (nothing in the UNet looks for them)."""
    prompt.images_per_prompt, prompt.frames, prompt.output_size = copies, frames or 1, size
    prompt.vae_scale = vae_factor(pipe)
    scheduler = getattr(getattr(pipe, "scheduler", None), "config", None)
    prompt.train_timesteps = int(getattr(scheduler, "num_train_timesteps", None) or 1000)
    return prompt.prepare()


class RecipeRun:
    """The adapters of a :class:`~ipadapter.prompt.recipe.Recipe`, attached to one pipeline, ready to call."""

    def __init__(
        self, pipe: Any, recipe: Recipe, adapters: list[IPAdapter], prepared: list[Prepared]
    ) -> None:
        self.pipe = pipe
        self.recipe = recipe
        self.adapters = adapters
        self._prepared = prepared

    def __call__(self, *, pipeline: Any = None, **pipe_kwargs: Any) -> Any:
        """Run the pipeline (or another one sharing its UNet) with the recipe's image prompt."""
        pairs = list(zip(self.adapters, self._prepared, strict=True))
        with _lora_strengths(pairs):
            return _call(
                pipeline or self.pipe,
                self.adapters,
                lambda n, _f, items: prompt_of(pairs, n, items),
                pipe_kwargs,
            )

    def detach(self) -> None:
        """Remove the recipe's adapters (the UNet is restored when none is left)."""
        for ip in self.adapters:
            if ip.attached:
                ip.detach()


def apply(pipe: Any, recipe: Recipe) -> RecipeRun:
    """Attach every adapter of ``recipe`` to ``pipe`` and read all its inputs; all or nothing.

    Files are checked first, then each adapter is attached and its references read; if anything fails,
    the adapters attached so far are detached again and the error is raised.
    """
    recipe.check_files()
    taken = set(attached(pipe))
    names = [n for n in (f"adapter{i}" for i in range(len(taken) + len(recipe.adapters))) if n not in taken]
    adapters: list[IPAdapter] = []
    prepared: list[Prepared] = []
    try:
        for i, (entry, name) in enumerate(zip(recipe.adapters, names, strict=False)):
            scale = 1.0 if entry.scale is None else entry.scale
            ip = attach(
                pipe, entry.path, entry.image_encoder, scale=scale, name=name, lora_file=entry.lora_file
            )
            adapters.append(ip)
            prepared.append(prepare(ip, entry, f"adapter[{i}]."))
    except BaseException:
        for ip in adapters:
            ip.detach()
        raise
    return RecipeRun(pipe, recipe, adapters, prepared)


def attach(
    pipe: Any,
    adapter: str | Path | Checkpoint,
    image_encoder: str | Path | ImageEncoder | nn.Module | None = None,
    *,
    scale: float = 1.0,
    name: str = "default",
    lora_scale: float = 1.0,
    plus_version: str | None = None,
    lora_file: str | Path | None = None,
) -> IPAdapter:
    """Attach an IP-Adapter to ``pipe.unet`` and return its handle.

    ``adapter``: a local file, a hub path ``owner/repo/path/file.safetensors``, or a loaded
    :class:`Checkpoint`. ``image_encoder``: a folder, hub id, ``owner/repo/sub/folder``, a loaded CLIP vision
    model or :class:`ImageEncoder`; by default the one the adapter's repository layout implies.
    ``lora_scale``: the strength of the LoRA a FaceID adapter carries (1.0: as it was trained, and as diffusers
    and the official code apply it). ``plus_version``: for FaceID-Plus files, ``"v1"`` or ``"v2"`` (the
    shortcut): their keys cannot tell, so by default the file name decides (``plusv2`` in it: v2), else v1.
    ``lora_file``: a FaceID adapter's LoRA as a separate ``.safetensors`` (h94's ``*_lora.safetensors``, kohya,
    peft or diffusers names); it replaces the LoRA inside the checkpoint. Validates everything before touching
    the pipeline.
    """
    scale = check_scale(scale)
    lora_scale = check_scale(lora_scale, "lora_scale")
    if plus_version not in (None, "v1", "v2"):
        raise InputError(f"plus_version {plus_version!r} is not one of v1, v2 (FaceID-Plus / PlusV2)")
    host, model = _denoiser(pipe)  # from under torch.compile's wrapper, if compiled first
    state = host.attachment(model)
    if state is not None and name in state.adapters:
        raise InputError(
            f"an adapter named '{name}' is already attached; detach it first or choose another name"
        )
    ckpt, source = (adapter, adapter.source) if isinstance(adapter, Checkpoint) else open_adapter(adapter)
    spec = detect(ckpt)
    check_supported(spec, source)
    found = problems(ckpt, spec)
    if found:
        raise CheckpointError(f"{source}: {'; '.join(found)}; this adapter file cannot be used")
    layers = host_layers(spec, host, model, source)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    shared = {ip.encoder_key: ip.encoder for ip in state.adapters.values()} if state is not None else {}
    encoder, encoder_key = pick_encoder(image_encoder, spec, source, device, dtype, shared)
    check_encoder(spec, encoder, source)

    projection = build_projection(spec)
    load_weights(projection, ckpt.image_proj, "image_proj", source)
    projection.to(device=device, dtype=dtype).eval()  # fp16 checkpoint weights become the model's dtype
    branches: dict[str, nn.Module] = {}
    for layer, layer_id in zip(layers, spec.layer_ids, strict=True):
        branch = host.branch(spec, layer, model)
        prefix = f"{layer_id}."
        weights = {
            k.removeprefix(prefix): w
            for k, w in ckpt.ip_adapter.items()
            if k.startswith(prefix) and "_lora." not in k
        }
        load_weights(branch, weights, f"layer {layer_id}", source)
        branches[layer.name] = branch.to(device=device, dtype=dtype)

    lora = build_lora(spec, model, ckpt, source, device, dtype, lora_scale, lora_file=lora_file)

    # Everything is checked; from here on only the denoiser changes.
    if state is None:
        state = host.install(model, layers)
    handle = IPAdapter(pipe, host, model, name, spec, projection, encoder, branches, source)
    handle.encoder_key = encoder_key
    handle._scale = scale
    if lora is not None:
        lora.install(lora_modules(model, spec.lora_ids))
        handle.lora = lora
    if spec.layout == "faceid-plus":
        recorded = ckpt.metadata.get("ipadapter.plus_version")  # our own training's exports say it
        handle.plus_version = (
            plus_version or spec.plus_version or recorded or plus_version_hint(source) or "v1"
        )
    for proc_name, branch in branches.items():
        state.processors[proc_name].add_branch(name, branch)
    state.adapters[name] = handle
    return handle


def detach(pipe: Any, name: str | None = None) -> None:
    """Detach adapter ``name``, or every adapter (None). With none left, the original processors return.

    One rule: naming an adapter that is not attached (twice detached, or never attached) is an error; detaching
    all of none is nothing to do.
    """
    host, model = _denoiser(pipe)
    state = host.attachment(model)
    current = state.adapters if state is not None else {}
    names = list(current) if name is None else [name]
    if name is not None and name not in current:
        raise InputError(
            f"no adapter named '{name}' is attached (detached already?); attached: {sorted(current) or 'none'}"
        )
    if state is None:
        return
    for n in names:
        for proc in state.processors.values():
            proc.remove_branch(n)
        if state.adapters[n].lora is not None:
            state.adapters[n].lora.remove()
        del state.adapters[n]
    if not state.adapters:
        host.uninstall(model)


def attached(pipe: Any) -> dict[str, IPAdapter]:
    """The adapters attached to ``pipe``, by name."""
    host, model = _denoiser(pipe)
    state = host.attachment(model)
    return dict(state.adapters) if state is not None else {}
