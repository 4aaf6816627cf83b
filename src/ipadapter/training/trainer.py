"""The paper's training recipe (Ye et al. 2023, DESIGN.md §3.4) on accelerate.

Frozen UNet, VAE, text and image encoders; trained: the image projection and every layer's ``to_k_ip`` /
``to_v_ip`` (initialised as copies of that layer's ``to_k`` / ``to_v``). Text, image or both are dropped at
set rates (a dropped text is the empty string, a dropped image the adapter's own negative: a zero embedding
for pooled features, the encoder on an all-zero input for hidden states), so the result supports
classifier-free guidance. Loss: MSE to the noise (or the velocity, when the base predicts v).

Every random choice of a step (which example is dropped, the noise, the timesteps, the latent sample) comes
from a generator seeded by (seed, step, micro-batch, rank), and the data order from (seed, epoch): so a run
resumed from a checkpoint repeats exactly what the uninterrupted run would have done.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from ..errors import IncompatibleModelError, InputError
from ..variants import AdapterSpec, ResamplerConfig

VARIANTS = ("basic", "plus")
CHECKPOINTS = "checkpoints"
FINAL = "ip-adapter.safetensors"
CONFIG = "train_config.json"

# Fields that may change when a run is resumed (they do not change what the finished run computes).
RESUMABLE_CHANGES = {"max_steps", "checkpoint_every", "keep_checkpoints", "validate_every", "validation_image",
                     "validation_prompt", "num_workers", "report_to", "log_every", "resume", "export_dtype",
                     "output", "base_config", "cache_dir", "deterministic"}  # fmt: skip


@dataclass
class TrainConfig:
    """Everything a training run depends on. ``output`` is the run folder."""

    base: str
    data: str
    output: str
    variant: str = "plus"
    image_encoder: str | None = None
    base_config: str | None = None
    init_adapter: str | None = None
    resolution: int = 512
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    max_steps: int = 1000
    num_tokens: int | None = None  # default: 4 (basic), 16 (plus)
    drop_text: float = 0.05
    drop_image: float = 0.05
    drop_both: float = 0.05
    seed: int = 42
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    max_grad_norm: float | None = None
    random_crop: bool = False
    random_flip: bool = False
    cache_dir: str | None = None  # precomputed latents/features (centre crops only)
    image_column: str = "image"
    text_column: str = "text"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    validate_every: int = 0
    validation_image: str | None = None
    validation_prompt: str = ""
    export_dtype: str = "float16"
    num_workers: int = 0
    log_every: int = 10
    report_to: str = "auto"  # auto (tensorboard when installed) | tensorboard | none
    deterministic: bool = False  # deterministic CUDA kernels: a rerun or a resumed run repeats bit for bit
    resume: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.variant not in VARIANTS:
            problems.append(
                f"variant '{self.variant}' is not trainable; expected one of {', '.join(VARIANTS)}"
            )
        if self.resolution <= 0 or self.resolution % 8:
            problems.append(
                f"resolution {self.resolution} is not a positive multiple of 8 (try "
                f"{max(8, self.resolution // 8 * 8)})"
            )
        for name in (
            "batch_size",
            "grad_accum",
            "max_steps",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} {getattr(self, name)} must be at least 1")
        if self.num_tokens is not None and self.num_tokens < 1:
            problems.append(f"num_tokens {self.num_tokens} must be at least 1")
        for name in ("warmup_steps", "validate_every", "num_workers"):
            if getattr(self, name) < 0:
                problems.append(f"{name} {getattr(self, name)} must be >= 0")
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr {self.lr} must be a positive number")
        drops = (self.drop_text, self.drop_image, self.drop_both)
        if any(not 0 <= d <= 1 for d in drops) or sum(drops) > 1:
            problems.append(
                f"drop rates text {self.drop_text}, image {self.drop_image}, both {self.drop_both} "
                "must each be in [0, 1] and sum to at most 1"
            )
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            problems.append(f"mixed precision '{self.mixed_precision}' is not one of no, fp16, bf16")
        if self.export_dtype not in ("float16", "float32", "bfloat16"):
            problems.append(f"export dtype '{self.export_dtype}' is not one of float16, float32, bfloat16")
        if self.report_to not in ("auto", "tensorboard", "none"):
            problems.append(f"report_to '{self.report_to}' is not one of auto, tensorboard, none")
        if self.cache_dir and (self.random_crop or self.random_flip):
            problems.append(
                "a feature cache stores centre crops; it cannot be used with random crops or flips"
            )
        if self.validate_every and not self.validation_image:
            problems.append("validate_every is set but no validation image is given (--validation-image)")
        if problems:
            raise InputError("; ".join(problems))

    @property
    def tokens(self) -> int:
        return self.num_tokens or (4 if self.variant == "basic" else 16)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, saved: dict[str, Any]) -> list[str]:
        """Fields that differ from a saved run's config in a way that would change its result."""
        out = []
        for f in fields(self):
            if f.name in RESUMABLE_CHANGES or f.name not in saved:
                continue
            if saved[f.name] != getattr(self, f.name):
                out.append(f"{f.name}: run has {saved[f.name]!r}, now {getattr(self, f.name)!r}")
        return out


def deterministic_kernels(
    on: bool, warn_only: bool = False, benchmark: bool = False
) -> tuple[bool, bool, bool]:
    """Switch torch to deterministic kernels (or back); returns the previous (on, warn_only, cudnn benchmark).

    On CUDA the same run then gives the same weights bit for bit (at some speed: cuDNN's autotuner is off and
    attention's backward takes its slower ordered path); an op with no deterministic kernel raises. cuBLAS
    needs ``CUBLAS_WORKSPACE_CONFIG`` set before its first call, so this sets it when it is unset.
    """
    before = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.benchmark,
    )
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=warn_only)
    torch.backends.cudnn.benchmark = benchmark
    return before


def step_generator(seed: int, *parts: int) -> torch.Generator:
    """A CPU generator for one (step, micro-batch, rank): the same numbers whenever that step runs."""
    value = seed
    for part in parts:
        value = (value * 1_000_003 + part + 1) % (2**63 - 1)
    return torch.Generator("cpu").manual_seed(value)


def new_spec(variant: str, unet: nn.Module, encoder: nn.Module, num_tokens: int) -> AdapterSpec:
    """The adapter layout the recipe trains for this UNet and image encoder (official hyper-parameters)."""
    from ..adapter import cross_attention_layers

    layers = cross_attention_layers(unet)
    cross = layers[0].cross_attention_dim
    config = encoder.config
    resampler = None
    if variant == "basic":
        feature, feature_dim = "pooled", int(config.projection_dim)
    else:
        feature, feature_dim = "hidden", int(config.hidden_size)
        # SD1.5 plus: dim = cross dim (768), 12 heads; SDXL plus: dim 1280, 20 heads; heads of 64 dims.
        dim = 1280 if cross == 2048 else cross
        resampler = ResamplerConfig(
            dim=dim,
            depth=4,
            dim_head=64,
            heads=max(1, dim // 64),
            num_queries=num_tokens,
            embedding_dim=feature_dim,
            output_dim=cross,
            ff_mult=4,
        )
    return AdapterSpec(
        layout=variant,
        names=(),
        num_tokens=num_tokens,
        feature=feature,
        feature_dim=feature_dim,
        cross_attention_dim=cross,
        layer_ids=tuple(2 * layer.index + 1 for layer in layers),
        hidden_sizes=tuple(layer.hidden_size for layer in layers),
        resampler=resampler,
    )


def initial_checkpoint(spec: AdapterSpec, unet: nn.Module, seed: int) -> Any:
    """A fresh projection and ``to_k_ip``/``to_v_ip`` copied from each layer's ``to_k``/``to_v``."""
    from ..adapter import cross_attention_layers
    from ..checkpoint import Checkpoint, ip_key
    from ..projection import build_projection

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projection = build_projection(spec)
    ip_adapter = {}
    for layer, layer_id in zip(cross_attention_layers(unet), spec.layer_ids, strict=True):
        attn = unet.get_submodule(layer.name.removesuffix(".processor"))
        ip_adapter[ip_key(layer_id, "to_k_ip")] = attn.to_k.weight.detach().float().clone()
        ip_adapter[ip_key(layer_id, "to_v_ip")] = attn.to_v.weight.detach().float().clone()
    image_proj = {k: v.detach().float().clone() for k, v in projection.state_dict().items()}
    return Checkpoint(image_proj, ip_adapter, source="initialisation")


class AdapterTrainModule(nn.Module):
    """The trainable adapter and the frozen UNet it lives in: ``forward`` predicts the noise (or v)."""

    def __init__(self, unet: nn.Module, projection: nn.Module, name: str) -> None:
        super().__init__()
        self.unet = unet
        self.projection = projection
        self.name = name

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        text: torch.Tensor,
        features: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        from ..conditioning import ImagePrompt

        # DeepSpeed runs the whole module (adapter included) in fp16/bf16; elsewhere the adapter is float32
        tokens = self.projection(features.to(next(self.projection.parameters()).dtype))  # (B, N, D)
        prompt = ImagePrompt({self.name: tokens}, {self.name: tokens}, guidance=False)
        return self.unet(
            noisy,
            timesteps,
            encoder_hidden_states=text,
            added_cond_kwargs=added_cond_kwargs,
            cross_attention_kwargs={"image_prompt": prompt},
        ).sample


def trainable_state(handle: Any, gathered: dict[str, torch.Tensor] | None = None) -> Any:
    """The adapter's current weights as an official-layout :class:`Checkpoint` (float32, CPU).

    ``gathered``: a full state dict of the :class:`AdapterTrainModule` (FSDP gathers one from the shards);
    without it the weights are read from the live modules, which hold them whole (single process, DDP,
    DeepSpeed ZeRO 1/2).
    """
    from ..checkpoint import Checkpoint

    if gathered is None:
        live = handle.state_dict()
        image_proj, ip_adapter = live.image_proj, live.ip_adapter
    else:
        image_proj = {
            k.removeprefix("projection."): v for k, v in gathered.items() if k.startswith("projection.")
        }
        ip_adapter = {key: gathered[f"unet.{name}"] for key, name in handle.unet_names().items()}

    def copy(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().float().cpu().clone() for k, v in state.items()}

    return Checkpoint(copy(image_proj), copy(ip_adapter), source="training")


def checkpoints(output: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    folder = output / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir() and p.name.startswith("step-") and (p / "state.json").is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


class Trainer:
    """One training run: set up (validating everything first), train, checkpoint, resume, export."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.output = Path(config.output)
        self.skipped: list[tuple[str, str]] = []
        self.losses: list[float] = []  # per optimizer step, this process
        self.seconds = {"setup": 0.0, "cache": 0.0, "train": 0.0}
        self.samples = 0  # examples trained on in this session, all processes
        self._kernels_before: tuple[bool, bool, bool] | None = None  # torch's switches, while --deterministic

    # -- setup -------------------------------------------------------------------------------------------
    def _check_output(self) -> dict[str, Any] | None:
        """The saved config when resuming (after checking it matches), else None."""
        c = self.config
        saved_path = self.output / CONFIG
        if c.resume:
            if not saved_path.is_file():
                raise InputError(
                    f"--resume: '{self.output}' holds no training run ({CONFIG} missing); "
                    "start a new run with --output"
                )
            saved = json.loads(saved_path.read_text())
            diff = c.differences(saved)
            if diff:
                raise InputError(
                    f"--resume: '{self.output}' was trained with another configuration ("
                    + "; ".join(diff)
                    + "); resume with the same settings or start a new run"
                )
            return saved
        if saved_path.is_file() or checkpoints(self.output):
            raise InputError(
                f"output '{self.output}' already holds a training run; pass --resume to continue it "
                "or choose a new --output"
            )
        if self.output.exists() and not self.output.is_dir():
            raise InputError(f"output '{self.output}' is a file; expected a folder for the run")
        return None

    def setup(self) -> None:
        """Validate everything, load the models, wrap them for the engine, and restore a resumed run."""
        # deterministic kernels are chosen before anything runs on the GPU (cuBLAS reads its workspace
        # setting once); torch's process-wide switches are put back when the run ends or setup fails
        self._kernels_before = deterministic_kernels(True) if self.config.deterministic else None
        try:
            self._setup()
        except BaseException:
            self._restore_kernels()
            raise

    def _restore_kernels(self) -> None:
        if self._kernels_before is not None:
            deterministic_kernels(*self._kernels_before)
            self._kernels_before = None

    def _setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import ProjectConfiguration
        from diffusers import DDPMScheduler

        from ..adapter import attach
        from ..checkpoint import load_checkpoint
        from ..images import load_image
        from ..pipelines import load_pipeline
        from ..sources import load_image_encoder, resolve_adapter
        from ..variants import detect
        from .data import Transform, open_source

        started = time.perf_counter()
        c = self.config
        self._check_output()
        self.report_to = self._report_to()
        self.source = open_source(c.data, image_column=c.image_column, text_column=c.text_column)
        if c.validation_image:
            self.validation_reference = load_image(c.validation_image, "validation image")

        from accelerate.state import AcceleratorState

        # A second run in the same process (a notebook, tests) may use another precision: accelerate keeps
        # that in a process-wide singleton. Reset it; the distributed PartialState is kept.
        AcceleratorState._reset_state()
        # Without CUDA, processes started by `accelerate launch --multi_gpu` or torchrun form a gloo group on
        # the CPU; accelerate only does that when asked for the CPU explicitly.
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available() and not torch.backends.mps.is_available(),
            mixed_precision=c.mixed_precision,
            gradient_accumulation_steps=1,  # accumulation is done explicitly, step by step (DeepSpeed: see below)
            log_with=None if self.report_to == "none" else self.report_to,
            project_config=ProjectConfiguration(
                project_dir=str(self.output), logging_dir=str(self.output / "logs")
            ),
        )
        acc = self.accelerator
        if c.report_to == "auto" and self.report_to == "none" and acc.is_main_process:
            print(
                "ipadapter: note: no TensorBoard logging (the tensorboard package is not installed; "
                "`pip install tensorboard` turns it on)",
                file=sys.stderr,
            )
        self._configure_engine()
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(c.mixed_precision, torch.float32)
        self.weight_dtype = weight_dtype
        pipe = load_pipeline(c.base, dtype=torch.float32, device="cpu", base_config=c.base_config)
        pipe.set_progress_bar_config(disable=True)
        encoder_spec = c.image_encoder or default_training_encoder(pipe, c.variant)
        encoder_model = load_image_encoder(encoder_spec)
        spec = new_spec(c.variant, pipe.unet, encoder_model, c.tokens)
        if c.init_adapter:
            init = load_checkpoint(resolve_adapter(c.init_adapter))
            init_spec = detect(init)
            if (init_spec.layout, init_spec.feature_dim, init_spec.num_tokens) != (
                spec.layout,
                spec.feature_dim,
                spec.num_tokens,
            ):
                raise IncompatibleModelError(
                    f"--init-adapter '{c.init_adapter}' is a {init_spec.layout} adapter with {init_spec.num_tokens} "
                    f"tokens from {init_spec.feature_dim}-dim features; this run trains a {spec.layout} adapter with "
                    f"{spec.num_tokens} tokens from {spec.feature_dim}-dim features"
                )
            start = init
        else:
            start = initial_checkpoint(spec, pipe.unet, c.seed)
        # attach validates the layout against the UNet and the encoder before anything changes
        handle = attach(pipe, start, encoder_model, scale=1.0, name="train")
        self.transform = Transform(
            resolution=c.resolution,
            clip_size=int(encoder_model.config.image_size),
            random_crop=c.random_crop,
            random_flip=c.random_flip,
        )

        # Freeze everything, then unfreeze the adapter's weights (kept in float32).
        for module in (pipe.unet, pipe.vae, encoder_model, *self._text_encoders(pipe)):
            module.requires_grad_(False)
            module.eval()
        params = handle.parameters()
        device = acc.device
        for module in (pipe.unet, *self._text_encoders(pipe), encoder_model):
            _place(module, device, weight_dtype)
        _place(pipe.vae, device, torch.float32)  # the SDXL VAE overflows in float16
        for p in params:
            p.data = p.data.to(device=device, dtype=torch.float32)
            p.requires_grad_(True)
        handle.projection.train()
        if c.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
        self.pipe, self.handle, self.encoder_model, self.spec = pipe, handle, encoder_model, spec
        self.params = params
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

        self.cache = None
        if c.cache_dir:
            cache_started = time.perf_counter()
            self._build_cache(encoder_spec)
            self.seconds["cache"] = time.perf_counter() - cache_started
        module = AdapterTrainModule(pipe.unet, handle.projection, handle.name)
        optimizer = torch.optim.AdamW(params, lr=c.lr, weight_decay=c.weight_decay)
        lr_scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        )
        self.step = 0
        latest = self._latest_checkpoint() if c.resume else None
        if latest is not None:  # weights go in before wrapping: FSDP shards and DDP broadcasts what it finds
            handle.load_state_dict(load_checkpoint(latest[0] / "adapter.safetensors"))
        self.module, self.optimizer = acc.prepare(module, optimizer)
        self.lr_scheduler = lr_scheduler
        if latest is not None:
            self._load_state(*latest)
        # every rank has checked the output folder (_check_output) before it holds a run: wrapping need not
        # synchronise the ranks (FSDP2 shards locally), and a late rank would otherwise find this run's config
        acc.wait_for_everyone()
        if acc.is_main_process:
            self.output.mkdir(parents=True, exist_ok=True)
            (self.output / CONFIG).write_text(json.dumps(c.to_dict(), indent=2))
        self.seconds["setup"] = time.perf_counter() - started
        if self.report_to != "none":
            acc.init_trackers("ipadapter", config={k: v for k, v in c.to_dict().items() if v is not None})

    def _report_to(self) -> str:
        """Where losses go: TensorBoard when asked for (its package must be there) or, by default, when
        installed; without it a default run trains unlogged (and says so once it knows its main process)."""
        from accelerate.utils import is_tensorboard_available

        wanted = self.config.report_to
        if wanted == "none" or is_tensorboard_available():
            return "tensorboard" if wanted == "auto" else wanted
        if wanted == "tensorboard":
            raise InputError(
                "TensorBoard logging needs the tensorboard package: `pip install tensorboard` "
                "(or `pip install -e '.[train]'`), or pass --report-to none"
            )
        return "none"

    @property
    def engine(self) -> str:
        """How the adapter is wrapped: ``plain`` (one process or DDP), ``deepspeed`` or ``fsdp``."""
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        return {DistributedType.DEEPSPEED: "deepspeed", DistributedType.FSDP: "fsdp"}.get(kind, "plain")

    def _configure_engine(self) -> None:
        """Fit an accelerate DeepSpeed / FSDP config to this run, or say why it cannot (before any loading)."""
        c, acc = self.config, self.accelerator
        if self.engine == "deepspeed":
            plugin = acc.state.deepspeed_plugin
            cfg = plugin.deepspeed_config
            stage = cfg.get("zero_optimization", {}).get("stage", 0)
            if stage not in (0, 1, 2, "auto"):
                raise InputError(
                    f"DeepSpeed ZeRO stage {stage} is not supported: stage 3 partitions the frozen UNet, "
                    "whose layers the adapter's branches run inside; use zero_stage 1 or 2 (they "
                    "partition the adapter's optimizer state and gradients) or an FSDP config"
                )
            if stage == "auto":
                cfg.setdefault("zero_optimization", {})["stage"] = 2
            # "auto" (or absent) values follow the command line; explicit ones must agree with it
            wanted = {
                "train_micro_batch_size_per_gpu": (c.batch_size, "--batch-size"),
                "gradient_accumulation_steps": (c.grad_accum, "--grad-accum"),
                "gradient_clipping": (c.max_grad_norm or 0.0, "--max-grad-norm"),
            }
            for key, (value, flag) in wanted.items():
                current = cfg.get(key, "auto")
                if current == "auto":
                    cfg[key] = value
                elif float(current) != float(value):
                    raise InputError(
                        f"the DeepSpeed config sets {key} = {current} but this run has {flag} {value}; "
                        f'set it to "auto" in the config (it then follows {flag}) or pass {flag} {current}'
                    )
            if cfg.get("train_batch_size", "auto") == "auto":
                cfg["train_batch_size"] = c.batch_size * c.grad_accum * acc.num_processes
            acc.gradient_accumulation_steps = c.grad_accum  # DeepSpeed counts the micro-steps itself
        elif self.engine == "fsdp":
            import functools

            from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

            plugin = acc.state.fsdp_plugin
            policy = plugin.auto_wrap_policy
            if (
                policy.func if isinstance(policy, functools.partial) else policy
            ) is size_based_auto_wrap_policy:
                raise InputError(
                    "FSDP's SIZE_BASED_WRAP cannot wrap a diffusers UNet: it picks module lists whose "
                    "layers are called one by one, so their weights are never gathered; use "
                    "--fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_transformer_layer_cls_to_wrap "
                    "BasicTransformerBlock (or NO_WRAP)"
                )
            # FSDP1 flattens each wrapped module's parameters into one tensor that is trained or frozen as a
            # whole; the adapter's branches sit inside the frozen UNet's layers, so keep the parameters apart.
            if getattr(plugin, "fsdp_version", 1) == 1:
                plugin.use_orig_params = True

    @staticmethod
    def _text_encoders(pipe: Any) -> list[nn.Module]:
        return [
            m
            for m in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None))
            if m is not None
        ]

    # -- data --------------------------------------------------------------------------------------------
    def _batches(self) -> Iterator[dict[str, Any]]:
        """This rank's micro-batches from the run's current position onwards."""
        from .data import StreamingDataset, collate

        c, acc = self.config, self.accelerator
        per_rank = c.batch_size
        start = self.step * c.grad_accum * per_rank  # examples this rank has consumed
        if self.source.streaming:
            dataset = StreamingDataset(
                self.source,
                self.transform,
                seed=c.seed,
                rank=acc.process_index,
                world_size=acc.num_processes,
                start=start,
            )
            loader = torch.utils.data.DataLoader(dataset, batch_size=per_rank, collate_fn=collate)
            yield from loader
            return
        if self.cache is not None:
            from .cache import CachedExamples

            dataset = CachedExamples(self.cache, self.source)
        else:
            dataset = _EpochIndexed(self.source, self.transform, c.seed)
        sampler = _RankPositions(
            len(self.source), c.seed, acc.process_index, acc.num_processes, per_rank, start
        )
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=per_rank, sampler=sampler, collate_fn=collate, num_workers=c.num_workers
        )
        yield from loader

    # -- one step ----------------------------------------------------------------------------------------
    def _encode_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.pipe.encode_prompt(
            prompt=texts,
            device=self.accelerator.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
        )
        if len(out) == 4:  # SDXL: (embeds, negative, pooled, negative pooled)
            return out[0], out[2]
        return out[0], None

    def _loss(self, batch: dict[str, Any], gen: torch.Generator) -> torch.Tensor:
        c, device = self.config, self.accelerator.device
        pixels = batch.get("pixel_values")
        n = len(batch["texts"])
        # which examples lose their text, their image, or both (the official rule: one draw per example)
        draw = torch.rand(n, generator=gen)
        drop_image = draw < c.drop_image
        drop_text = (draw >= c.drop_image) & (draw < c.drop_image + c.drop_text)
        both = (draw >= c.drop_image + c.drop_text) & (draw < c.drop_image + c.drop_text + c.drop_both)
        drop_image, drop_text = drop_image | both, drop_text | both
        texts = ["" if d else t for t, d in zip(batch["texts"], drop_text.tolist(), strict=True)]
        with torch.no_grad():
            if "moments" in batch:  # cached: sample the stored latent distribution with this step's generator
                latents = DiagonalGaussianDistribution(batch["moments"].to(device)).sample(generator=gen)
            else:
                latents = self.pipe.vae.encode(pixels.to(device).float()).latent_dist.sample(generator=gen)
            shift = getattr(self.pipe.vae.config, "shift_factor", None) or 0.0
            latents = ((latents - shift) * self.pipe.vae.config.scaling_factor).to(self.weight_dtype)
            text, pooled = self._encode_text(texts)
            if "features" in batch:
                features = self._dropped(batch["features"].to(device), drop_image.to(device))
            else:
                features = self._features(batch["clip_pixel_values"].to(device), drop_image.to(device))
        noise = torch.randn(latents.shape, generator=gen).to(device=device, dtype=latents.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (n,), generator=gen).to(device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        added = None
        if pooled is not None:  # SDXL micro-conditioning: original size, crop top-left, target size
            target_size = torch.tensor([c.resolution, c.resolution]).expand(n, 2)
            time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], target_size], dim=1)
            added = {"text_embeds": pooled, "time_ids": time_ids.to(device=device, dtype=text.dtype)}
        with self.accelerator.autocast():
            pred = self.module(noisy, timesteps, text, features, added)
        return F.mse_loss(pred.float(), target.float())

    def _raw_features(self, clip: torch.Tensor) -> torch.Tensor:
        """Encoder features in the dtype the encoder runs in: pooled image_embeds or penultimate states."""
        model = self.encoder_model
        if self.spec.feature == "pooled":
            return model(pixel_values=clip.to(self.weight_dtype)).image_embeds
        return model(pixel_values=clip.to(self.weight_dtype), output_hidden_states=True).hidden_states[-2]

    def _features(self, clip: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """Features (float32); dropped images get the adapter's negative (zeros / encoder on zeros)."""
        if self.spec.feature == "pooled":
            feats = self._raw_features(clip)
            return torch.where(dropped[:, None], torch.zeros_like(feats), feats).float()
        clip = torch.where(dropped[:, None, None, None], torch.zeros_like(clip), clip)
        return self._raw_features(clip).float()

    def _dropped(self, feats: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """Cached features with the dropped rows replaced by the cached negative."""
        negative = self.negative.to(device=feats.device, dtype=feats.dtype).expand_as(feats)
        mask = dropped.view(-1, *([1] * (feats.ndim - 1)))
        return torch.where(mask, negative, feats).float()

    def _build_cache(self, encoder_spec: str) -> None:
        """Compute the missing cache shards (ranks share them), then read the negative features."""
        from .cache import SHARD, FeatureCache
        from .data import collate

        c, acc = self.config, self.accelerator
        if self.source.streaming:
            raise InputError(
                f"--cache-dir needs data with random access; '{c.data}' is streamed (hub dataset or "
                "tar shards): drop --cache-dir"
            )
        n = len(self.source)
        fingerprint = {
            "data": c.data,
            "examples": n,
            "base": c.base,
            "image_encoder": encoder_spec,
            "feature": self.spec.feature,
            "resolution": c.resolution,
            "dtype": str(self.weight_dtype),
        }
        cache = FeatureCache(c.cache_dir, fingerprint)
        if acc.is_main_process and not (cache.folder / "index.json").is_file():
            size = int(self.encoder_model.config.image_size)
            with torch.no_grad():
                if self.spec.feature == "pooled":
                    negative = torch.zeros(self.spec.feature_dim, dtype=self.weight_dtype)
                else:
                    zeros = torch.zeros(1, 3, size, size, device=acc.device)
                    negative = self._raw_features(zeros)[0]
            cache.write_index(negative)  # first: shards are only ever read under a matching fingerprint
        acc.wait_for_everyone()
        for shard in cache.missing_shards(n)[acc.process_index :: acc.num_processes]:
            tensors: dict[str, torch.Tensor] = {}
            skipped: dict[int, str] = {}
            indices = list(range(shard * SHARD, min(n, (shard + 1) * SHARD)))
            for chunk in range(0, len(indices), c.batch_size):
                part = indices[chunk : chunk + c.batch_size]
                examples = [self.transform(self.source[i]) for i in part]
                for i, e in zip(part, examples, strict=True):
                    if "skipped" in e:
                        skipped[i] = e["skipped"]
                good = [(i, e) for i, e in zip(part, examples, strict=True) if "skipped" not in e]
                if not good:
                    continue
                batch = collate([e for _, e in good])
                with torch.no_grad():
                    moments = self.pipe.vae.encode(
                        batch["pixel_values"].to(acc.device)
                    ).latent_dist.parameters
                    feats = self._raw_features(batch["clip_pixel_values"].to(acc.device))
                for row, (i, _) in enumerate(good):
                    tensors[f"{i}.moments"] = moments[row].float()
                    tensors[f"{i}.features"] = feats[row]
                    tensors[f"{i}.original_size"] = batch["original_size"][row]
                    tensors[f"{i}.crop_top_left"] = batch["crop_top_left"][row]
            cache.write_shard(shard, tensors, skipped)
        acc.wait_for_everyone()
        self.cache = cache
        self.negative = cache.negative()

    # -- the loop ----------------------------------------------------------------------------------------
    def train(self) -> Path:
        """Train to ``max_steps`` (checkpointing and validating on the way); export and return the adapter."""
        try:
            return self._train()
        except RuntimeError as e:
            if "deterministic" not in str(e) or not self.config.deterministic:
                raise
            raise InputError(
                f"--deterministic: {str(e).splitlines()[0]} Train without --deterministic (a "
                "resumed run then matches the whole one within float tolerance)."
            ) from e
        finally:
            self._restore_kernels()

    def _train(self) -> Path:
        from tqdm.auto import tqdm

        c, acc = self.config, self.accelerator
        batches = self._batches()
        bar = tqdm(
            total=c.max_steps, initial=self.step, disable=not acc.is_local_main_process, desc="training"
        )
        last_good: dict[str, Any] | None = None
        started, seen = time.perf_counter(), 0
        while self.step < c.max_steps:
            total = 0.0
            for micro in range(c.grad_accum):
                batch = next(batches)
                self.skipped.extend(batch.get("skipped", []))
                if not batch["texts"]:  # every image of this micro-batch was unreadable: repeat the last one
                    if last_good is None:
                        continue
                    batch = last_good
                last_good = batch
                gen = step_generator(c.seed, self.step, micro, acc.process_index)
                # accumulate() tells DeepSpeed which micro-batch ends a step (it counts and scales itself);
                # elsewhere accelerate's count is 1 and the loss is scaled here
                with acc.accumulate(self.module):
                    raw = self._loss(batch, gen)
                    acc.backward(raw if self.engine == "deepspeed" else raw / c.grad_accum)
                total += raw.detach().item() / c.grad_accum
                seen += len(batch["texts"]) * acc.num_processes
            if c.max_grad_norm:
                acc.clip_grad_norm_(self.params, c.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.losses.append(total)
            rate = seen / max(time.perf_counter() - started, 1e-9)
            lr = self.lr_scheduler.get_last_lr()[0]
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{lr:.2e}", samples_s=f"{rate:.2f}")
            if self.step % c.log_every == 0 or self.step == c.max_steps:
                acc.log({"loss": total, "lr": lr, "samples_per_second": rate}, step=self.step)
            if self.step % c.checkpoint_every == 0 or self.step == c.max_steps:
                self.save_checkpoint()
            if c.validate_every and (self.step % c.validate_every == 0 or self.step == c.max_steps):
                self.validate()
        bar.close()
        self.seconds["train"], self.samples = time.perf_counter() - started, seen
        final = self.export(self.output / FINAL)
        acc.end_training()
        return final

    # -- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path | None:
        """``checkpoints/step-N``: adapter weights, optimizer, lr schedule, position; written atomically.

        Every process takes part (FSDP gathers the adapter from its shards, DeepSpeed writes each rank's
        optimizer partition); the main process then renames the finished folder into place.
        """
        from ..checkpoint import save_checkpoint

        acc = self.accelerator
        folder = self.output / CHECKPOINTS / f"step-{self.step:07d}"
        tmp = folder.with_name(f".{folder.name}.tmp")
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        ckpt = self._adapter_checkpoint()
        state: dict[str, Any] = {"lr_scheduler": self.lr_scheduler.state_dict()}
        if self.engine == "deepspeed":
            self.module.save_checkpoint(str(tmp / "deepspeed"), tag="state", exclude_frozen_parameters=True)
        elif self.engine == "fsdp":
            from accelerate.utils import save_fsdp_optimizer

            save_fsdp_optimizer(acc.state.fsdp_plugin, acc, self.optimizer, self.module, str(tmp))
        else:
            state["optimizer"] = self.optimizer.state_dict()
        acc.wait_for_everyone()
        if acc.is_main_process:
            ckpt.metadata = self._metadata()
            save_checkpoint(ckpt, tmp / "adapter.safetensors")
            torch.save(state, tmp / "optimizer.pt")
            position = {
                "step": self.step,
                "skipped": len(self.skipped),
                "config": self.config.to_dict(),
                "engine": self.engine,
                "processes": acc.num_processes,
            }
            (tmp / "state.json").write_text(json.dumps(position, indent=2))
            if folder.exists():
                shutil.rmtree(folder)
            os.replace(tmp, folder)  # a checkpoint exists whole or not at all
            for old in checkpoints(self.output)[: -self.config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return folder

    def _adapter_checkpoint(self) -> Any:
        """The adapter's weights on the main process, None elsewhere (every process must call: FSDP gathers)."""
        gathered = self.accelerator.get_state_dict(self.module) if self.engine == "fsdp" else None
        return trainable_state(self.handle, gathered) if self.accelerator.is_main_process else None

    def _latest_checkpoint(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest complete checkpoint of the run being resumed and its state.json, checked against this
        launch."""
        if self.accelerator.is_main_process:  # a run killed while writing leaves its temporary folder
            for stale in (self.output / CHECKPOINTS).glob(".step-*.tmp*"):
                shutil.rmtree(stale, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        found = checkpoints(self.output)
        if not found:
            return None  # the run stopped before its first checkpoint: start from the beginning
        saved = json.loads((found[-1] / "state.json").read_text())
        engine = saved.get("engine", "plain")
        if engine != self.engine or (
            engine != "plain" and saved.get("processes") != self.accelerator.num_processes
        ):
            raise InputError(
                f"--resume: the last checkpoint {found[-1].name} was written by a {engine} run on "
                f"{saved.get('processes', '?')} process(es); this launch is {self.engine} on "
                f"{self.accelerator.num_processes}: launch it the same way to resume"
            )
        return found[-1], saved

    def _load_state(self, folder: Path, saved: dict[str, Any]) -> None:
        """Optimizer, lr schedule and position from a checkpoint (after the adapter is wrapped)."""
        state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        if self.engine == "deepspeed":
            self.module.load_checkpoint(
                str(folder / "deepspeed"),
                tag="state",
                load_module_strict=False,
                load_lr_scheduler_states=False,
            )
        elif self.engine == "fsdp":
            from accelerate.utils import load_fsdp_optimizer

            load_fsdp_optimizer(
                self.accelerator.state.fsdp_plugin, self.accelerator, self.optimizer, self.module, str(folder)
            )
        else:
            self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.step = int(saved["step"])

    def _metadata(self) -> dict[str, str]:
        c = self.config
        return {
            "ipadapter.base": c.base,
            "ipadapter.image_encoder": str(c.image_encoder or ""),
            "ipadapter.variant": c.variant,
            "ipadapter.steps": str(self.step),
            "ipadapter.num_tokens": str(c.tokens),
            "ipadapter.resolution": str(c.resolution),
        }

    # -- validation and export ---------------------------------------------------------------------------
    def validate(self) -> Path | None:
        """An image from the validation reference and prompt with the current weights (saved by the main process).

        Under FSDP every process renders it too: the sharded layers gather their weights collectively.
        """
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        with self._whole_weights():
            if self.engine == "fsdp" or acc.is_main_process:
                image = self._render_validation()
        if acc.is_main_process:
            path = self._save_validation(image)
        acc.wait_for_everyone()
        return path

    def _whole_weights(self) -> Any:
        """A context in which every module holds its whole weights outside the wrapped forward (FSDP gathers)."""
        import contextlib

        if self.engine != "fsdp":
            return contextlib.nullcontext()
        if getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1:
            from torch.distributed.fsdp import FullyShardedDataParallel

            return FullyShardedDataParallel.summon_full_params(self.module, writeback=False)
        from torch.distributed.fsdp import FSDPModule

        @contextlib.contextmanager
        def unsharded() -> Iterator[None]:
            sharded = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
            for m in sharded:
                m.unshard()
            try:
                yield
            finally:
                for m in sharded:
                    m.reshard()

        return unsharded()

    def _render_validation(self) -> Any:
        """The validation image (PIL) from the current weights."""
        acc = self.accelerator
        c = self.config
        self.handle.projection.eval()
        # the UNet may be in fp16/bf16 beside a float32 VAE (DeepSpeed casts the whole wrapped module)
        mixed = torch.autocast(
            acc.device.type, dtype=self.weight_dtype, enabled=self.weight_dtype != torch.float32
        )
        with torch.no_grad(), mixed:
            image = self.handle(
                self.validation_reference,
                prompt=c.validation_prompt,
                num_inference_steps=30 if c.resolution >= 256 else 4,
                height=c.resolution,
                width=c.resolution,
                generator=torch.Generator("cpu").manual_seed(c.seed),
            ).images[0]
        self.handle.projection.train()
        return image

    def _save_validation(self, image: Any) -> Path:
        acc = self.accelerator
        folder = self.output / "validation"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"step-{self.step:07d}.png"
        image.save(path)
        for tracker in acc.trackers:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image("validation", np.asarray(image), self.step, dataformats="HWC")
        return path

    def export(self, path: Path) -> Path:
        """The adapter as an official-format ``.safetensors`` in the export dtype, with run metadata."""
        from ..checkpoint import save_checkpoint

        acc = self.accelerator
        acc.wait_for_everyone()
        ckpt = self._adapter_checkpoint()
        if acc.is_main_process:
            dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(
                self.config.export_dtype, torch.float32
            )
            ckpt.image_proj = {k: v.to(dtype) for k, v in ckpt.image_proj.items()}
            ckpt.ip_adapter = {k: v.to(dtype) for k, v in ckpt.ip_adapter.items()}
            ckpt.metadata = self._metadata()
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            save_checkpoint(ckpt, tmp.with_suffix(".safetensors"))
            os.replace(tmp.with_suffix(".safetensors"), path)
            if self.skipped:
                print(
                    f"ipadapter: note: skipped {len(self.skipped)} unreadable image(s), e.g. "
                    f"{self.skipped[0][0]}: {self.skipped[0][1]}",
                    file=sys.stderr,
                )
        acc.wait_for_everyone()
        return path


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move a frozen model; cast only when needed (diffusers warns about every cast)."""
    if next(module.parameters()).dtype != dtype:
        module.to(dtype=dtype)
    module.to(device)


def default_training_encoder(pipe: Any, variant: str) -> str:
    """The official encoder a variant is trained with: ViT-H for SD1.5 and SDXL plus, bigG for SDXL basic."""
    sdxl = pipe.unet.config.cross_attention_dim == 2048
    sub = "sdxl_models/image_encoder" if sdxl and variant == "basic" else "models/image_encoder"
    return f"h94/IP-Adapter/{sub}"


class _EpochIndexed(torch.utils.data.Dataset):
    """Map-style examples addressed by (epoch, index): crops/flips seeded from both, so resume repeats them."""

    def __init__(self, source: Any, transform: Any, seed: int) -> None:
        self.source, self.transform, self.seed = source, transform, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, Any]:
        epoch, index = key
        return self.transform(self.source[index], step_generator(self.seed, 7, epoch, index))


class _RankPositions(torch.utils.data.Sampler):
    """(epoch, index) keys of this rank's examples from ``start`` on, forever: each epoch a seeded permutation,
    consecutive ``batch``-sized slices dealt round-robin to the ranks."""

    def __init__(self, n: int, seed: int, rank: int, world: int, batch: int, start: int) -> None:
        self.n, self.seed, self.rank, self.world, self.batch, self.start = n, seed, rank, world, batch, start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        from .data import epoch_order

        k = (
            self.start
        )  # this rank's k-th example is global example (k // batch * world + rank) * batch + k % batch
        orders: dict[int, list[int]] = {}
        while True:
            q = (k // self.batch * self.world + self.rank) * self.batch + k % self.batch
            epoch, pos = divmod(q, self.n)
            if epoch not in orders:
                orders = {epoch: epoch_order(self.n, self.seed, epoch)}
            yield epoch, orders[epoch][pos]
            k += 1

    def __len__(self) -> int:  # endless; DataLoader only needs a number for its length hint
        return 2**31


def train(config: TrainConfig) -> Path:
    """Run (or resume) training and return the exported adapter's path."""
    trainer = Trainer(config)
    trainer.setup()
    return trainer.train()
