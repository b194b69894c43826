"""Generators: model tokens given a Condition (:mod:`.base`) and speak a step protocol (:mod:`.protocol`).

One subpackage per paradigm (``next_token``, ``masked``, ``next_scale``, ``next_x``, ``coarse_to_fine``),
one module per paper inside it, and ``components`` for what families share.

Modules that moved when the families got their subpackages stay importable under their old names
(saved configs name classes by module path), with a ``DeprecationWarning``.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

#: old module -> its home now (``visar.generators.`` prefix implied)
MOVED = {
    "next_token_continuous": "next_token.continuous",
    "next_scale_flow": "next_scale.flowar",
    "ctf_auxiliary": "coarse_to_fine.auxiliary",
    "kmeans": "coarse_to_fine.kmeans",
    "llama_trunk": "components.llama_trunk",
    "token_cache_steps": "components.token_cache_steps",
    "adaln_encoder_decoder": "components.adaln_encoder_decoder",
    "heads": "components.heads",
    "diffusion_schedule": "components.diffusion_schedule",
    "flow_head_transformer": "components.flow_head_transformer",
    "entities": "components.entities",
}


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``visar.generators.<old>`` to the module's new home (the same module object)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, short = fullname.rpartition(".")
        if prefix != __name__ or short not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = f"{__name__}.{MOVED[spec.name.rpartition('.')[2]]}"
        warnings.warn(f"{spec.name} moved to {new}", DeprecationWarning, stacklevel=3)
        module = importlib.import_module(new)
        sys.modules[spec.name] = module
        return module

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.append(_MovedModuleFinder())
