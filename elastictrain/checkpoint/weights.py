"""Pick one model's weights (and a stored `transformers` config) out of a checkpointed state tree.

A `fit()` checkpoint holds the whole elastic state: ``{"step", "objects": {NAME: ...}, "rng"}``,
where ``objects`` are the entries given to ``ctx.state(NAME=...)``. A model's entry is its
``state_dict()``: a flat ``{parameter name: tensor}`` map. This module finds that map by the
entry's name and gives it the names of the plain module's ``state_dict()`` (no DDP ``module.`` or
torch.compile ``_orig_mod.`` prefix), so ``model.load_state_dict(...)`` reads it. Pure: no storage.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import torch

from elastictrain.errors import NotExportable, UnknownStateEntry
from elastictrain.statetree import unflatten_state

# Wrappers whose state_dict prefixes every name: DDP (`module.`), torch.compile (`_orig_mod.`).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def state_entries(tensors: Mapping[str, torch.Tensor], skeleton: Any) -> dict[str, Any]:
    """The checkpoint's ``ctx.state(...)`` entries by name (tensors shared, not copied).

    Raises:
        NotExportable: the checkpoint holds no elastictrain state tree (saved by hand, without a skeleton).
    """
    tree = unflatten_state(dict(tensors), skeleton) if skeleton is not None else None
    objects = tree.get("objects") if isinstance(tree, dict) else None
    if not isinstance(objects, dict):
        raise NotExportable(
            "this checkpoint holds no ctx.state() entries (it was not written by fit()): export it without --model"
        )
    return objects


def is_model_weights(entry: Any) -> bool:
    """Whether a state entry looks like a module's state_dict: a non-empty flat map of names to tensors."""
    return (
        isinstance(entry, dict)
        and bool(entry)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in entry.items())
    )


def model_weights(entries: Mapping[str, Any], name: str) -> dict[str, torch.Tensor]:
    """The state entry `name` as a plain module's state_dict, wrapper prefixes removed.

    Raises:
        UnknownStateEntry: no entry `name`.
        NotExportable: the entry is not a model's weights (an optimizer, a scheduler, a plain value).
    """
    if name not in entries:
        raise UnknownStateEntry(name, sorted(map(str, entries)), _models(entries))
    entry = entries[name]
    if not is_model_weights(entry):
        models = _models(entries)
        hint = f"models in this checkpoint: {', '.join(models)}" if models else "this checkpoint holds no model"
        raise NotExportable(f"state entry {name!r} is {_describe(entry)}, not a model's weights; {hint}")
    return strip_wrapper_prefixes(entry)


def strip_wrapper_prefixes(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove a DDP or torch.compile prefix that every name carries (repeatedly: compile over DDP).

    >>> sorted(strip_wrapper_prefixes({"_orig_mod.module.0.weight": torch.zeros(1)}))
    ['0.weight']
    """
    out = dict(weights)
    while True:
        prefix = next((p for p in WRAPPER_PREFIXES if all(k.startswith(p) for k in out)), None)
        if prefix is None or prefix in out:  # a name that is the bare prefix would become empty
            return out
        out = {k[len(prefix):]: v for k, v in out.items()}


def hf_config(entries: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The `transformers` config stored as state entry `name`: ``model.config.to_dict()`` or
    ``model.config.to_json_string()``.

    Raises:
        UnknownStateEntry: no entry `name`.
        NotExportable: the entry is not a transformers config (a dict with a string "model_type").
    """
    if name not in entries:
        raise UnknownStateEntry(name, sorted(map(str, entries)), _models(entries), what="config")
    entry = entries[name]
    if isinstance(entry, str):
        try:
            entry = json.loads(entry)
        except ValueError:
            entry = None
    if not isinstance(entry, dict) or not isinstance(entry.get("model_type"), str) or not entry["model_type"]:
        raise NotExportable(
            f"state entry {name!r} is not a transformers config: store "
            f"ctx.state(..., {name}=model.config.to_dict()) (a dict with its \"model_type\")"
        )
    return entry


def config_json(config: Mapping[str, Any]) -> str:
    """A config as `transformers` writes config.json (sorted keys, 2-space indent; int keys become strings)."""
    try:
        return json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as exc:
        raise NotExportable(f"the stored transformers config cannot be written as JSON: {exc}") from None


def _models(entries: Mapping[str, Any]) -> list[str]:
    return sorted(str(n) for n, e in entries.items() if is_model_weights(e))


def _describe(entry: Any) -> str:
    if isinstance(entry, dict) and {"state", "param_groups"} <= set(entry):
        return "an optimizer's state"
    if isinstance(entry, dict) and {"last_epoch", "base_lrs"} & set(entry):
        return "an LR scheduler's state"
    if isinstance(entry, torch.Tensor):
        return "a single tensor"
    if isinstance(entry, dict):
        return "a dict that is not a flat name -> tensor map"
    return f"a plain {type(entry).__name__} value"
