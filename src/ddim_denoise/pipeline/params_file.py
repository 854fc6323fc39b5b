"""Edit values in a params file in place, keeping its comments, key order and formatting (ruamel.yaml round trip).

Used by ``sweep best --apply`` on a profile (conf/profile/NAME.yaml) or a hand-written params.yaml: those files
document the settings, so rewriting them with a plain YAML dump (which drops comments) is not acceptable. The result
is validated before it replaces the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import yaml

from ddim_denoise.pipeline.checkpoint import atomic_write_text
from ddim_denoise.pipeline.params import ParamsError, validate_params


def set_values(path: str | Path, values: dict[str, object],
               add_sections: bool = False) -> list[tuple[str, object, object]]:
    """Set dotted keys (``train.lr``) to ``values``; return (key, old, new) for the keys that changed. A profile
    holds only what it changes, so ``add_sections`` adds a section the file lacks instead of refusing."""
    from ruamel.yaml import YAML
    from ruamel.yaml.comments import CommentedMap

    path = Path(path)
    editor = YAML()  # round-trip mode
    editor.preserve_quotes = True
    editor.width = 4096  # never re-wrap long lines or comments
    editor.representer.add_representer(  # keep `null` (ruamel's round trip would write nothing)
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    try:
        document = editor.load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: not found") from None
    changes = []
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = document
        for part in parents:
            if add_sections and hasattr(node, "get") and node.get(part) is None:
                node[part] = CommentedMap()
            node = node.get(part) if hasattr(node, "get") else None
            if node is None:
                break
        if node is None or not hasattr(node, "get"):
            raise ParamsError(f"{path}: has no section for {key!r}; add it by hand")
        old = node.get(leaf)
        if old == value and isinstance(old, bool) == isinstance(value, bool):
            continue
        node[leaf] = value
        changes.append((key, old, value))
    if not changes:
        return changes
    buffer = io.StringIO()
    editor.dump(document, buffer)
    text = buffer.getvalue()
    validate_params(yaml.safe_load(text) or {}, source=f"{path} after the edit")
    atomic_write_text(path, text)
    return changes
