"""The per-call image prompt: image tokens per adapter, in the batch layout the UNet will see.

An :class:`ImagePrompt` reaches our attention processors through the pipeline's ``cross_attention_kwargs``
under the name ``image_prompt``. It holds, for each attached adapter, the positive tokens ``(P, N, D)`` and
the negative (unconditional) tokens ``(P, N, D)`` for P prompts. The batch a processor sees is

    classifier-free guidance:  [negatives..., positives...] repeated for num_images_per_prompt / frames
    no guidance:               [positives...]               repeated likewise

Diffusers builds its text batch the same way (negatives first, each prompt repeated ``n`` times in a row, and
AnimateDiff runs frames as consecutive rows), so one ``repeat_interleave`` to the query's batch is always
right; any other ratio is an error, never a silent broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InputError


@dataclass(eq=False)
class ImagePrompt:
    """Image tokens for one pipeline call.

    ``tokens`` and ``negative`` map an attached adapter's name to ``(P, N, D)`` tensors. ``guidance`` says
    whether the call runs classifier-free guidance (negatives first); an attached adapter sets it from the
    pipeline at the start of each UNet call.
    """

    tokens: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor]
    guidance: bool = True
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name, pos in self.tokens.items():
            neg = self.negative.get(name)
            if pos.ndim != 3 or neg is None or neg.shape != pos.shape:
                raise InputError(
                    f"image prompt for adapter '{name}': tokens {list(pos.shape)} and negative tokens "
                    f"{None if neg is None else list(neg.shape)}; expected two equal (prompts, tokens, dim) tensors"
                )

    def rows(self, name: str, batch: int) -> torch.Tensor | None:
        """Tokens of adapter ``name`` laid out for a query batch of ``batch`` rows, or None if it has none."""
        pos = self.tokens.get(name)
        if pos is None:
            return None
        base = torch.cat([self.negative[name], pos]) if self.guidance else pos  # (T, N, D)
        if batch % base.shape[0]:
            raise InputError(
                f"image prompt for adapter '{name}' has {base.shape[0]} rows "
                f"({'negative + positive' if self.guidance else 'positive'} for {pos.shape[0]} prompt(s)) but "
                f"the UNet runs a batch of {batch}; expected a whole multiple. Give one reference per prompt"
            )
        return base.repeat_interleave(batch // base.shape[0], dim=0)  # (batch, N, D)

    def cached(self, key: tuple, compute):  # noqa: ANN001 - tiny internal memo
        """Memoise per-call work (image keys/values are the same at every denoising step)."""
        if torch.is_grad_enabled():  # training: every step needs its own graph
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]
