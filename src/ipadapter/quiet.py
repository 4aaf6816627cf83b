"""Silence the heavy libraries' loggers and loading bars, for the front ends that print their own lines."""

from __future__ import annotations

import warnings


def quiet_libraries() -> None:
    """Once the heavy libraries are needed: silence their loggers and loading bars (the denoising bar stays)."""
    # heavy: imported only once a command loads models (CLI start-up)
    import huggingface_hub
    import transformers

    huggingface_hub.utils.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # loading bars; the denoising bar stays
    import diffusers  # after transformers is quiet: importing diffusers' pipelines triggers its notices

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
