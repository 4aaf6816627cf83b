"""The per-call image prompt: image tokens per adapter, in the batch layout the UNet will see.

An :class:`ImagePrompt` reaches our attention processors through the pipeline's ``cross_attention_kwargs``
under the name ``image_prompt``. It holds, for each attached adapter, the positive tokens and the negative
(unconditional) tokens, each ``(P, R, N, D)``: P prompts, R references in a row (1, or one per video frame),
N tokens of width D. ``(P, N, D)`` is accepted as R = 1. The batch a processor sees is

    classifier-free guidance:  [negatives..., positives...]
    no guidance:               [positives...]

where each prompt's block holds its rows for num_images_per_prompt copies, and, in AnimateDiff, frames as
consecutive rows inside each copy. Diffusers builds its text batch the same way, so laying each prompt's R
references out as ``(copies, R)`` is always right; any other ratio is an error, never a silent broadcast.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import InputError


@dataclass(eq=False)
class ImagePrompt:
    """Image tokens for one pipeline call.

    ``tokens`` and ``negative`` map an attached adapter's name to ``(P, R, N, D)`` tensors (``(P, N, D)``
    means R = 1). ``guidance`` says whether the call runs classifier-free guidance (negatives first); an
    attached adapter sets it from the running pipeline at the start of each UNet call.
    """

    tokens: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor]
    guidance: bool = True
    _cache: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for name, pos in list(self.tokens.items()):
            neg = self.negative.get(name)
            if pos.ndim not in (3, 4) or neg is None or neg.shape != pos.shape:
                raise InputError(
                    f"image prompt for adapter '{name}': tokens {list(pos.shape)} and negative tokens "
                    f"{None if neg is None else list(neg.shape)}; expected two equal (prompts, [references,] "
                    "tokens, dim) tensors"
                )
            if pos.ndim == 3:
                self.tokens[name], self.negative[name] = pos.unsqueeze(1), neg.unsqueeze(1)

    def rows(self, name: str, batch: int) -> torch.Tensor | None:
        """Tokens of adapter ``name`` laid out for a query batch of ``batch`` rows, or None if it has none."""
        pos = self.tokens.get(name)
        if pos is None:
            return None
        halves = [self.negative[name], pos] if self.guidance else [pos]
        prompts, refs, n, d = pos.shape
        per_prompt, rest = divmod(batch, len(halves) * prompts)
        if rest or per_prompt % refs:
            what = "negative + positive" if self.guidance else "positive"
            if refs > 1:
                raise InputError(
                    f"image prompt for adapter '{name}' has {refs} references per prompt (one per frame) but "
                    f"the UNet runs {batch} rows ({what} for {prompts} prompt(s)); give as many references "
                    "as frames, or one for all"
                )
            raise InputError(
                f"image prompt for adapter '{name}' has {len(halves) * prompts} rows ({what} for {prompts} "
                f"prompt(s)) but the UNet runs a batch of {batch}; expected a whole multiple. Give one "
                "reference per prompt"
            )
        copies = per_prompt // refs  # num_images_per_prompt (a frame's references repeat per copy)
        laid = [h[:, None].expand(prompts, copies, refs, n, d).reshape(-1, n, d) for h in halves]
        return torch.cat(laid) if len(laid) > 1 else laid[0]  # (batch, N, D)

    def cached(self, key: tuple, compute):  # noqa: ANN001 - tiny internal memo
        """Memoise per-call work (image keys/values are the same at every denoising step)."""
        if torch.is_grad_enabled():  # training: every step needs its own graph
            return compute()
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]
