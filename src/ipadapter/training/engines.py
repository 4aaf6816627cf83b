"""The engines accelerate can wrap the adapter in: ``plain`` (one process or DDP), ``deepspeed`` or ``fsdp``.

Each needs something of its own: a DeepSpeed / FSDP config fitted to the run (or refused, before any model is
loaded), whole weights outside the wrapped forward (FSDP gathers its shards), and its own optimizer state in
a checkpoint (DeepSpeed and FSDP write each process's part; plain keeps it in ``optimizer.pt``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from accelerate.utils import DistributedType, load_fsdp_optimizer, save_fsdp_optimizer
from torch import nn

from ..errors import InputError
from .config import TrainConfig


def engine_of(accelerator: Any) -> str:
    """How ``accelerator`` wraps the adapter: ``plain`` (one process or DDP), ``deepspeed`` or ``fsdp``."""
    kind = accelerator.distributed_type
    return {DistributedType.DEEPSPEED: "deepspeed", DistributedType.FSDP: "fsdp"}.get(kind, "plain")


def configure_engine(config: TrainConfig, accelerator: Any) -> None:
    """Fit an accelerate DeepSpeed / FSDP config to this run, or say why it cannot (before any loading)."""
    engine = engine_of(accelerator)
    if engine == "deepspeed":
        _fit_deepspeed(config, accelerator)
    elif engine == "fsdp":
        _fit_fsdp(accelerator)


def _fit_deepspeed(c: TrainConfig, acc: Any) -> None:
    """ZeRO 1/2 only; the config's batch, accumulation and clipping follow the command line or agree with it."""
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


def _fit_fsdp(acc: Any) -> None:
    """A wrap policy that gathers the UNet's layers, and (FSDP1) the adapter's parameters kept apart."""
    # FSDP runs only: some torch builds have no torch.distributed
    from torch.distributed.fsdp.wrap import size_based_auto_wrap_policy

    plugin = acc.state.fsdp_plugin
    policy = plugin.auto_wrap_policy
    if (policy.func if isinstance(policy, functools.partial) else policy) is size_based_auto_wrap_policy:
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


def whole_weights(engine: str, accelerator: Any, module: nn.Module) -> Any:
    """A context in which every module holds its whole weights outside the wrapped forward (FSDP gathers)."""
    if engine != "fsdp":
        return contextlib.nullcontext()
    if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) == 1:
        # FSDP runs only: some torch builds have no torch.distributed
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(module, writeback=False)
    from torch.distributed.fsdp import FSDPModule  # FSDP2 only: older torch has no FSDPModule

    @contextlib.contextmanager
    def unsharded() -> Iterator[None]:
        sharded = [m for m in module.modules() if isinstance(m, FSDPModule)]
        for m in sharded:
            m.unshard()
        try:
            yield
        finally:
            for m in sharded:
                m.reshard()

    return unsharded()


def save_optimizer(
    engine: str, accelerator: Any, module: Any, optimizer: Any, folder: Path
) -> dict[str, Any]:
    """The optimizer state for a checkpoint being written in ``folder`` (every process calls).

    DeepSpeed and FSDP write each process's part into ``folder`` themselves (and this returns nothing); plain
    returns ``{"optimizer": state}`` for the main process to save in ``optimizer.pt``.
    """
    if engine == "deepspeed":
        module.save_checkpoint(str(folder / "deepspeed"), tag="state", exclude_frozen_parameters=True)
    elif engine == "fsdp":
        save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, module, str(folder))
    else:
        return {"optimizer": optimizer.state_dict()}
    return {}


def load_optimizer(
    engine: str, accelerator: Any, module: Any, optimizer: Any, folder: Path, state: dict[str, Any]
) -> None:
    """Restore the optimizer from a checkpoint's ``folder`` (``state``: its ``optimizer.pt``)."""
    if engine == "deepspeed":
        module.load_checkpoint(
            str(folder / "deepspeed"),
            tag="state",
            load_module_strict=False,
            load_lr_scheduler_states=False,
        )
    elif engine == "fsdp":
        load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, module, str(folder))
    else:
        optimizer.load_state_dict(state["optimizer"])
