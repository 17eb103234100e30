"""Data shipped inside the package, read with :mod:`importlib.resources` (works from a wheel).

* ``traits/<name>.json``: the built-in trait files (``steerlab traits list`` shows them).
* ``data/prompts.json``, ``data/personae.json``: the prompts and personae of the demo's
  persona-entropy run, also a ready-made input for ``steerlab infer``.

Examples:
    >>> from importlib.resources import files
    >>> print(files("steerlab.builtin") / "data" / "prompts.json")
"""
