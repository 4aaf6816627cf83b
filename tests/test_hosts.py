"""The host contract (hosts/base.py): the adapter finds a pipeline's denoiser only through its host."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from helpers import ckpt, load_pipe

from ipadapter import attach
from ipadapter.hosts import host_of
from ipadapter.hosts.unet import UNET


def test_the_unet_host_finds_the_denoiser_also_under_torch_compile(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    unet = pipe.unet
    assert host_of(pipe) == (UNET, unet)
    pipe.unet = torch.compile(unet)  # the wrapper is not the module the processors live in
    assert host_of(pipe) == (UNET, unet)
    assert host_of(SimpleNamespace(transformer=unet)) is None  # no host claims a denoiser it does not know


def test_install_and_uninstall_through_the_host_put_back_the_exact_processors(models: dict) -> None:
    pipe = load_pipe(models, "sd15")
    before = dict(pipe.unet.attn_processors)
    ip = attach(pipe, ckpt(models))
    state = UNET.attachment(pipe.unet)
    assert state is not None and set(state.processors) == {layer.name for layer in UNET.layers(pipe.unet)}
    assert ip.host is UNET and ip.blocks == UNET.block_map(pipe.unet)
    ip.detach()
    assert UNET.attachment(pipe.unet) is None
    assert all(pipe.unet.attn_processors[name] is proc for name, proc in before.items())
