"""The generation modes, the command-line command that runs each, and their per-mode defaults."""

MODES = ("t2i", "img2img", "inpaint", "video")
COMMAND_OF = {"t2i": "generate", "img2img": "img2img", "inpaint": "inpaint", "video": "video"}
IMAGE_MODES = ("t2i", "img2img", "inpaint")  # modes that make still images
INIT_MODES = ("img2img", "inpaint")  # modes that start from an init image
STRENGTH = {"img2img": 0.8, "inpaint": 1.0}  # diffusers' default strength of each init-image mode
