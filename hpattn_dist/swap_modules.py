"""Replacing modules inside a user's model: at every path, hooks carried over, all or nothing.

The converters (:func:`hpattn_dist.modules.convert_spatial_attention`, idx-flow's
``convert_model``) swap single-device layers for sharded ones inside models they did not write.
Users' models bind one module under several names (``self.norm = self.bn``,
``nn.Sequential(attn, lin, attn)``) or under several parents (``self.first = self.body[0]``),
and register hooks on the layers. This module holds what every converter needs for that:

- :func:`module_paths`: every qualified path of every module, aliases included;
- :func:`install`: put each replacement at EVERY path of the module it replaces;
- :func:`carry_hooks`: the replaced module's hooks (forward, forward-pre, backward, state-dict)
  move to its replacement, with their handles still working;
- :func:`all_or_nothing`: a snapshot of every module that is restored when a conversion fails
  half-way, so a failure leaves the model exactly as it was;
- :func:`check_aliases_kept`: after a conversion, paths that named one module still name one
  module (a converter that built two replacements for one aliased module is refused).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional

import torch.nn as nn

__all__ = ["all_or_nothing", "carry_hooks", "check_aliases_kept", "install", "module_paths",
           "unique_modules"]

_HOOK_DICTS = (
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
    "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_backward_pre_hooks",
    "_backward_hooks", "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)


def unique_modules(root: nn.Module,
                   descend: Optional[Callable[[nn.Module], bool]] = None) -> list[nn.Module]:
    """Every module reachable from ``root`` once, in pre-order (by identity, aliases once).

    With ``descend``, the children of a module are visited only where ``descend(module)`` holds.
    """
    seen: dict[int, nn.Module] = {}
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen[id(module)] = module
        if descend is None or descend(module):
            stack.extend(reversed([c for c in module._modules.values() if c is not None]))
    return list(seen.values())


def module_paths(root: nn.Module) -> dict[int, list[str]]:
    """``id(module) -> every qualified path`` under ``root`` (``""`` for the root), aliases included.

    Unlike ``named_modules()``, a module bound to two names of one parent, or under two parents,
    is listed at every path (in pre-order).
    """
    paths: dict[int, list[str]] = {}
    on_stack: set[int] = set()

    def walk(module: nn.Module, path: str) -> None:
        paths.setdefault(id(module), []).append(path)
        if id(module) in on_stack:  # a cycle: its subtree is listed once
            return
        on_stack.add(id(module))
        for name, child in module._modules.items():
            if child is not None:
                walk(child, f"{path}.{name}" if path else name)
        on_stack.discard(id(module))

    walk(root, "")
    return paths


def carry_hooks(old: nn.Module, new: nn.Module) -> None:
    """Move ``old``'s hooks to ``new`` (which replaces it in the model).

    ``new`` takes ``old``'s hook dictionaries themselves (with ``new``'s own hooks appended), so a
    ``RemovableHandle`` returned by ``old.register_forward_hook(...)`` removes the hook from
    ``new``. Hooks receive ``new`` as their module argument.
    """
    for name in _HOOK_DICTS:
        theirs, mine = getattr(old, name, None), getattr(new, name, None)
        if theirs is None or mine is None or theirs is mine:
            continue
        theirs.update(mine)
        new.__dict__[name] = theirs
    if old._is_full_backward_hook is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


def install(root: nn.Module, replacements: dict[int, nn.Module]) -> nn.Module:
    """Put ``replacements[id(old)]`` at every path of ``old`` under ``root``; return the new root.

    Cannot fail: it only rebinds entries of the parents' ``_modules``.
    """
    if not replacements:
        return root
    for parent in unique_modules(root):
        for name, child in list(parent._modules.items()):
            if child is not None and id(child) in replacements:
                parent._modules[name] = replacements[id(child)]
    return replacements.get(id(root), root)


def _state_of(module: nn.Module) -> tuple:
    inner = {key: (value, value.copy()) for key, value in vars(module).items()
             if isinstance(value, (dict, set))}
    return module, module.__class__, dict(vars(module)), inner


def _restore(state: tuple) -> None:
    module, cls, attrs, inner = state
    module.__class__ = cls
    for container, contents in inner.values():
        container.clear()
        container.update(contents)
    module.__dict__.clear()
    module.__dict__.update(attrs)


@contextlib.contextmanager
def all_or_nothing(root: nn.Module) -> Iterator[None]:
    """Restore every module under ``root`` as it was if the block raises.

    What is restored, in place (other references to the modules stay valid): each module's class,
    attributes and the contents of its dictionaries and sets (``_modules``, ``_parameters``,
    ``_buffers``, the hook dictionaries). Tensor values are not snapshotted: converters must not
    change them.
    """
    states = [_state_of(m) for m in unique_modules(root)]
    try:
        yield
    except BaseException:
        for state in states:
            _restore(state)
        raise


def check_aliases_kept(before: dict[str, int], root: nn.Module, who: str) -> None:
    """Refuse a conversion that split an aliased module into several replacements.

    Args:
        before: ``path -> id(module)`` before the conversion (from :func:`module_paths`).
        root: the converted model.
        who: the converter's name, for the message.

    Raises:
        ValueError: two paths named one module before and name different modules now.
    """
    after = {path: key for key, paths in module_paths(root).items() for path in paths}
    first: dict[int, str] = {}
    for path, key in before.items():
        if path not in after:
            continue
        if key in first and after[first[key]] != after[path]:
            raise ValueError(
                f"{who}: {first[key]!r} and {path!r} are the same module, but the conversion made two "
                "different modules of it (one is converted inside the layer that holds it, the other "
                "on its own); bind it under one path only"
            )
        first.setdefault(key, path)
