"""mkdocs hook: links that leave docs/ for a file of the repository (a notebook, a SLURM
template, the README) are checked to exist, then shown as the repository path, since the site
holds only docs/. A link to a file that is not there fails the --strict build."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.plugins.steerlab")
OUTSIDE = re.compile(r"\[([^\]]+)\]\((\.\./[^)#\s]+)(#[^)\s]*)?\)")


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    docs = Path(config["docs_dir"]).resolve()
    here = (docs / page.file.src_path).parent
    root = docs.parent

    def show(m: re.Match) -> str:
        target = (here / m[2]).resolve()
        if not target.is_relative_to(root) or not target.exists():
            log.warning("%s: the link %s points to %s, which is not in the repository",
                        page.file.src_path, m[2], target)
            return m[0]
        return f"{m[1]} (`{target.relative_to(root)}`)"

    return OUTSIDE.sub(show, markdown)
