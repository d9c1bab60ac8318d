"""Sphinx configuration: the API reference comes from the package's docstrings.

Builds offline with what ships with Sphinx (the alabaster theme, no intersphinx):
``python -m sphinx -W -b html docs docs/_build/html``.
"""

from __future__ import annotations


import sparsecoll

project = "sparsecoll"
author = "the sparsecoll authors"
copyright = "the sparsecoll authors"
version = release = sparsecoll.__version__

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
exclude_patterns = ["_build"]
html_theme = "alabaster"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
# a wider page, so that code blocks are not clipped (custom.css lets them scroll beyond it)
html_theme_options = {"page_width": "1200px", "body_max_width": "none"}

autodoc_member_order = "bysource"
autodoc_typehints = "signature"

# Names the package does not document (numpy, torch, asyncio types) stay plain text.
nitpicky = False
default_role = "py:obj"
add_module_names = False


def _public_alias(app, env, node, contnode):
    """Link ``sparsecoll.call.CommStats`` and the like to where the reference documents them.

    Users import the public names from ``sparsecoll`` (``sparsecoll.CommStats``) and the
    reference documents them there, but type hints name the defining module.
    """
    target = node.get("reftarget", "")
    if node.get("refdomain") != "py" or not target.startswith("sparsecoll."):
        return None
    public = "sparsecoll." + target.rpartition(".")[2]
    domain = env.get_domain("py")
    if public == target or public not in domain.objects:
        return None
    return domain.resolve_xref(env, node["refdoc"], app.builder, node["reftype"], public, node, contnode)


def setup(app):
    app.connect("missing-reference", _public_alias)
