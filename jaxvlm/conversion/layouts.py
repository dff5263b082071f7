"""Key layouts real checkpoints use, normalised to each family's canonical layout.

LLaVA canonical = the llava-hf hub layout (`language_model.model.*`, `language_model.lm_head.*`,
`vision_tower.vision_model.*`, `multi_modal_projector.*`). Accepted sources:
- `hub`:       the canonical layout itself;
- `hf_saved`:  transformers 5 `save_pretrained` (`vision_tower.*` without `vision_model.`);
- `hf_memory`: transformers 5 in-memory names (`model.language_model.*`, `model.vision_tower.*`, `lm_head.*`);
- `original`:  the original LLaVA repo (`model.layers.*`, `model.mm_projector.{0,2}.*`,
               `model.vision_tower.vision_tower.vision_model.*`), used by REVERSE and Chain-of-Spot.
"""
from __future__ import annotations

import re
from typing import Callable, Iterable

# (pattern, replacement) applied in order; the first that matches wins.
LLAVA_LAYOUTS: dict[str, list[tuple[str, str]]] = {
    "hub": [(r"^(language_model\.(model|lm_head)\.|vision_tower\.vision_model\.|multi_modal_projector\.)", r"\1")],
    "hf_saved": [
        (r"^vision_tower\.(?!vision_model\.)", "vision_tower.vision_model."),
        (r"^(language_model\.(model|lm_head)\.|multi_modal_projector\.)", r"\1"),
    ],
    "hf_memory": [
        (r"^model\.language_model\.", "language_model.model."),
        (r"^lm_head\.", "language_model.lm_head."),
        (r"^model\.vision_tower\.(vision_model\.)?", "vision_tower.vision_model."),
        (r"^model\.multi_modal_projector\.", "multi_modal_projector."),
    ],
    "original": [
        (r"^model\.vision_tower\.vision_tower\.vision_model\.", "vision_tower.vision_model."),
        (r"^model\.mm_projector\.0\.", "multi_modal_projector.linear_1."),
        (r"^model\.mm_projector\.2\.", "multi_modal_projector.linear_2."),
        (r"^model\.(layers|embed_tokens|norm)\.", r"language_model.model.\1."),
        (r"^lm_head\.", "language_model.lm_head."),
    ],
}

# Signature keys: a layout is recognised by a key only it produces.
_SIGNATURES = [
    ("original", re.compile(r"^model\.(mm_projector|layers\.\d+\.)")),
    ("hf_memory", re.compile(r"^model\.language_model\.")),
    ("hub", re.compile(r"^vision_tower\.vision_model\.|^language_model\.model\.")),
]


def detect_llava_layout(keys: Iterable[str]) -> str:
    keys = list(keys)
    for name, sig in _SIGNATURES:
        if any(sig.match(k) for k in keys):
            if name == "hub" and any(re.match(r"^vision_tower\.(?!vision_model\.)", k) for k in keys):
                return "hf_saved"
            return name
    raise ValueError("unknown LLaVA checkpoint layout: expected keys like 'language_model.model.layers.0.*' "
                     "(llava-hf), 'model.language_model.*' (transformers 5) or 'model.layers.0.*' + "
                     f"'model.mm_projector.*' (original LLaVA); got e.g. {sorted(keys)[:5]}")


def key_mapper(layout: str, table: dict[str, list[tuple[str, str]]] = LLAVA_LAYOUTS) -> Callable[[str], str | None]:
    """Source key -> canonical key (None for keys the layout does not map, e.g. rotary buffers)."""
    if layout not in table:
        raise ValueError(f"unknown layout {layout!r}; known: {sorted(table)}")
    compiled = [(re.compile(p), r) for p, r in table[layout]]

    def mapper(key: str) -> str | None:
        for pat, rep in compiled:
            if pat.match(key):
                return pat.sub(rep, key, count=1)
        return None
    return mapper
