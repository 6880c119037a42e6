"""Man pages: internal links become plain text."""

from __future__ import annotations

from typing import Any

from docutils import nodes
from sphinx.transforms.post_transforms import SphinxPostTransform
from sphinx.util import logging

logger = logging.getLogger(__name__)


class PlainInternalLinks(SphinxPostTransform):
    """In a man page, a link to another page of this manual becomes its title in italics.

    The man writer would print it as ``TITLE <>``: there is nowhere to point.
    """

    default_priority = 900
    builders = ("man",)

    def run(self, **kwargs: Any) -> None:
        for node in list(self.document.findall(nodes.reference)):
            uri = node.get("refuri", "")
            if not uri.startswith(("http:", "https:", "mailto:", "ftp:")):
                node.replace_self(nodes.emphasis(text=node.astext()))
