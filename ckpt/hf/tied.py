"""Which weights a Hugging Face model ties, from its ``config.json``.

``save_pretrained`` writes a tied weight once (the source, ``model.embed_tokens.weight``) and
drops its targets (``lm_head.weight``); ``from_pretrained`` ties them again. A checkpoint of
``model.state_dict()`` holds both names. Telling tied weights apart from weights that are equal
by chance (every LayerNorm starts at ones) needs the model's declaration, not the values: the
architecture class named in ``config.json`` declares ``_tied_weights_keys`` (target -> source),
in effect when the config ties word embeddings. transformers is imported only here, only when
a config is given; without it (or without a config) nothing is treated as tied.
"""

from __future__ import annotations

import logging
import re
from typing import Any

log = logging.getLogger(__name__)

_PLAIN = re.compile(r"^[A-Za-z0-9_.]+$")


def tied_pairs(config: dict[str, Any] | None) -> dict[str, str]:
    """``{target: source}`` of the weights the model of ``config`` ties (plain names only)."""
    if not config:
        return {}
    try:
        import transformers
    except ImportError:
        log.warning("transformers is not installed: tied weights are not recognised")
        return {}
    model_type = config.get("model_type")
    archs = list(config.get("architectures") or [])
    if not archs:  # a config saved on its own names no class: take the model type's causal LM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        archs = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)] if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES else []
    try:
        cfg = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    except Exception:  # noqa: BLE001 - an unknown or odd config: no tying known
        log.warning("config.json of model type %r is not one transformers knows: tied weights not recognised",
                    model_type)
        return {}
    if not getattr(cfg, "tie_word_embeddings", False):
        return {}
    out: dict[str, str] = {}
    for arch in archs:
        declared = getattr(getattr(transformers, str(arch), None), "_tied_weights_keys", None)
        if isinstance(declared, dict):
            out.update({t: s for t, s in declared.items() if _PLAIN.match(t) and _PLAIN.match(s)})
    return out
