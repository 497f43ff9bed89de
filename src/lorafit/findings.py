"""Finding: one diagnosis with a stable code. CATALOG lists every code; docs/findings.md documents each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ERROR, WARNING, INFO = "error", "warning", "info"
_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}

# code -> (severity, one-line title). Codes are stable: tools match on them.
CATALOG: dict[str, tuple[str, str]] = {
    # adapter alone (inspect)
    "adapter-no-effect": (ERROR, "every lora_B is zero: the adapter changes nothing"),
    "lora-b-zero": (WARNING, "some modules have an all-zero lora_B"),
    "non-finite": (ERROR, "NaN or Inf in adapter tensors"),
    "rank-mismatch": (ERROR, "tensor rank disagrees with r / rank_pattern"),
    "rank-inconsistent": (ERROR, "lora_A and lora_B disagree on the rank"),
    "incomplete-module": (ERROR, "a module has lora_A without lora_B, or the reverse"),
    "dora-mismatch": (ERROR, "use_dora disagrees with the magnitude tensors present"),
    "bias-mismatch": (WARNING, "lora_bias disagrees with the lora_B.bias tensors present"),
    "modules-to-save-not-saved": (WARNING, "modules_to_save names modules with no saved tensors"),
    "unknown-config-field": (WARNING, "config fields this PEFT version does not know"),
    "unprefixed-keys": (ERROR, "tensor keys without the base_model.model. prefix PeftModel.from_pretrained matches"),
    # adapter x target (check)
    "layout-mismatch": (ERROR, "the adapter was saved for another module layout"),
    "ambiguous-layout": (ERROR, "more than one rewrite lands the adapter equally well"),
    "targets-nothing": (ERROR, "target_modules selects no module of the target: PEFT raises on load"),
    "dropped-tensors": (ERROR, "adapter tensors that PEFT would drop (unexpected keys)"),
    "missing-adapter-weights": (ERROR, "targeted modules that would keep their init values"),
    "shape-mismatch": (ERROR, "in/out features disagree with the target module"),
    "embedding-size": (ERROR, "embedding rows disagree with the target's vocabulary"),
    "pattern-mismatch": (ERROR, "rank_pattern / alpha_pattern resolve differently on the target paths"),
    "modules-to-save-absent": (ERROR, "a trained modules_to_save head has no place in the target class"),
    "modules-to-save-missing": (ERROR, "PEFT wraps a modules_to_save module the checkpoint lacks (KeyError)"),
    "task-type-incompatible": (ERROR, "task_type needs a class the target is not (PEFT raises AttributeError)"),
    "task-type-mismatch": (WARNING, "task_type names another kind of head than the target class"),
    "tied-embeddings": (WARNING, "the adapter touches embeddings that the target ties"),
    "fixed": (INFO, "fix wrote an adapter that lands on the target"),
    # verify / merge
    "load-failed": (ERROR, "stock PEFT raised while loading the adapter"),
    "not-bit-equal": (ERROR, "a loaded tensor differs from the checkpoint"),
    "meta-tensors": (ERROR, "adapter parameters left on the meta device"),
    "no-output-change": (ERROR, "an adapted module's output does not change with the adapter on"),
    "merge-unchanged": (ERROR, "the merged model equals the base: the adapter was not merged"),
    "merge-delta-wrong": (ERROR, "a merged weight differs from base + delta beyond dtype rounding"),
    "merge-extra-change": (ERROR, "a tensor the adapter does not touch differs from the base"),
    "merge-missing-tensor": (ERROR, "a base tensor is missing from the merged checkpoint"),
    "weights-untied": (INFO, "tied embeddings were untied because the adapter changes one side"),
    "merged": (INFO, "merge wrote the base checkpoint with the adapter merged in"),
    "merge-config-differs": (ERROR, "the merged config.json disagrees with the base's on the model's structure"),
    "merge-non-finite": (ERROR, "NaN or Inf in a merged weight where base and adapter are finite"),
    # any command that reads a base or writes an output
    "custom-code": (WARNING, "the base's config.json names custom code (auto_map), which lorafit never runs"),
    "custom-code-required": (ERROR, "the base's model type exists only as custom code lorafit will not run"),
    "stale-output-removed": (INFO, "leftovers of a killed lorafit run to the same output were cleaned up"),
}


@dataclass
class Finding:
    """One diagnosis: stable code, severity, message, a few example keys, and the exact fix as a hint."""

    code: str
    message: str
    keys: list[str] = field(default_factory=list)
    hint: str | None = None
    severity: str = ""
    count: int | None = None  # how many items the finding covers, when more than the keys shown

    def __post_init__(self) -> None:
        if self.code not in CATALOG:
            raise ValueError(f"finding code {self.code!r} is not in the catalog")
        if not self.severity:
            self.severity = CATALOG[self.code][0]
        if self.count is None:
            self.count = len(self.keys)
        self.keys = list(self.keys)[:5]

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "severity": self.severity, "message": self.message,
                "keys": self.keys, "count": self.count, "hint": self.hint}


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Errors first; within a severity, the order the rules produced them (cause before consequence)."""
    return sorted(findings, key=lambda f: _ORDER[f.severity])
