"""A griffe extension for the API reference: the docstrings cross-reference in Sphinx roles (:func:`name`), which
Markdown would print as they are; this turns each into a code span (`name`)."""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|meth|class|mod|attr|data|exc|obj|const):`~?\.{0,2}([^`<]+?)(?:\s*<[^>]*>)?`")


class SphinxRolesAsCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
