"""Sphinx configuration: Markdown pages through MyST, API pages through autodoc."""

project = "gnrev-plugin"
author = "gnrev-plugin developers"
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon", "sphinx.ext.mathjax"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 4   # [text](#a-heading) links inside a page (scaling.md)
exclude_patterns = ["_build"]
autodoc_member_order = "bysource"
autodoc_typehints = "description"
html_theme = "alabaster"
suppress_warnings = []   # none: `-W` makes every warning (duplicate object, unknown reference or anchor) an error
nitpicky = False
