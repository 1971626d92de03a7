"""MkDocs hook: the docstrings' Sphinx roles (``:class:`~dpf_ext.DPF```) shown as code
(``DPF``), as Sphinx would show them."""

import re

ROLE = re.compile(r":(?:meth|func|class|mod|data|attr|exc):<code>(~?)([^<]*)</code>")


def on_page_content(html, **kwargs):
    return ROLE.sub(lambda m: f"<code>{m.group(2).rsplit('.', 1)[-1] if m.group(1) else m.group(2)}</code>", html)
