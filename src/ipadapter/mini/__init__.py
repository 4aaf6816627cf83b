"""A miniature model family trained offline, on data that needs no download.

:mod:`ipadapter.mini.shapes` is its data: a deterministic procedural generator of image–caption pairs
(one coloured shape on a coloured, optionally textured background), with held-out combinations for
evaluation and a rule-based checker (:func:`ipadapter.mini.shapes.classify`) that reads the colour,
background and shape back from an image without any neural network.
"""
