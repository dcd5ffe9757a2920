"""The toy world: a procedurally rendered text-to-image world small enough for CPU.

- ``render``: deterministic 32x32 RGB scenes (10 objects x 10 background styles x 6 colours,
  seeded pose / size / palette / texture variation), with deliberate near neighbours
  (circle / ellipse / ring, square / diamond, horizontal / vertical stripes / waves, ...).
- ``catalogue``: the prompt grammar ("a red circle on dots background", "a star in grid style",
  "vertical stripes background", "an empty background") and the concept catalogue
  (``concepts.yaml``: name, domain, neighbours, evaluation prompts).
- ``judge``: the object / style / colour classifier that scores generated images (imported
  on demand: it needs JAX).

32x32 because every shape and texture stays recognizable at that size, an SD-style VAE
(4x downsampling) then works on 8x8x4 latents, and a UNet can learn the world within the
CPU budget; 64x64 would cost ~4x per training step for nothing new to learn.

The submodule names (``render``, ``catalogue``, ``judge``) are not shadowed by re-exports:
``from jaxforget.toyworld import render as R`` is the module; the function is ``R.render``.
"""

from jaxforget.toyworld.catalogue import (
    Catalogue,
    Concept,
    Example,
    Labels,
    load_catalogue,
    make_prompt,
    parse_prompt,
    sample_examples,
)
from jaxforget.toyworld.render import (
    COLOUR_NAMES,
    EVAL_SEED_BASE,
    OBJECTS,
    STYLES,
    RenderSpec,
    render_batch,
    render_spec,
)

__all__ = [
    "COLOUR_NAMES", "EVAL_SEED_BASE", "OBJECTS", "STYLES", "Catalogue", "Concept", "Example", "Labels",
    "RenderSpec", "load_catalogue", "make_prompt", "parse_prompt", "render_batch", "render_spec",
    "sample_examples",
]
