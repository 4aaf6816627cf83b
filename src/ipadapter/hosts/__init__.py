"""Where image tokens enter a denoiser: one host per kind of denoiser (:class:`~ipadapter.hosts.base.Host`)."""

from __future__ import annotations

from typing import Any

from .base import Host
from .flux import FLUX
from .sd3 import SD3
from .unet import UNET

HOSTS: tuple[Host, ...] = (UNET, FLUX, SD3)


def host_of(pipe: Any) -> tuple[Host, Any] | None:
    """The host that knows ``pipe``'s denoiser, and the denoiser; None when no host does."""
    for host in HOSTS:
        denoiser = host.denoiser(pipe)
        if denoiser is not None:
            return host, denoiser
    return None
