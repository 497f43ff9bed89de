"""Finding: one diagnosis with a stable code. CATALOG lists every code; docs/findings.md documents each."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final, Literal, NamedTuple

ERROR: Final = "error"
WARNING: Final = "warning"
INFO: Final = "info"
_ORDER = {ERROR: 0, WARNING: 1, INFO: 2}

Severity = Literal["error", "warning", "info"]
# What a finding is about: the adapter alone; how its paths land on a tree; what the runtime does with it
# (or with the base); a proof about loaded or merged weights; or what a command wrote.
Scope = Literal["adapter", "alignment", "runtime", "proof", "output"]
ADAPTER: Final = "adapter"
ALIGNMENT: Final = "alignment"
RUNTIME: Final = "runtime"
PROOF: Final = "proof"
OUTPUT: Final = "output"
# The operations that mend a finding. fix answers for the codes it mends (it writes only a clean adapter and
# lists them as mended); merge lands the adapter through its own rewrite, so they do not apply to it.
Operation = Literal["fix", "merge"]
FIX: Final = "fix"
MERGE: Final = "merge"


class Code(NamedTuple):
    """A finding code's policy: severity, scope, the operations that mend it, and a one-line title."""

    severity: Severity
    scope: Scope
    mended_by: tuple[Operation, ...]
    title: str


# code -> its policy. Codes are stable: tools match on them. Every operation reads its policy from here.
CATALOG: dict[str, Code] = {
    # adapter alone (inspect)
    "adapter-no-effect": Code(ERROR, ADAPTER, (), "every lora_B is zero: the adapter changes nothing"),
    "lora-b-zero": Code(WARNING, ADAPTER, (), "some modules have an all-zero lora_B"),
    "non-finite": Code(ERROR, ADAPTER, (), "NaN or Inf in adapter tensors"),
    "rank-mismatch": Code(ERROR, ADAPTER, (), "tensor rank disagrees with r / rank_pattern"),
    "rank-inconsistent": Code(ERROR, ADAPTER, (), "lora_A and lora_B disagree on the rank"),
    "incomplete-module": Code(ERROR, ADAPTER, (), "a module has lora_A without lora_B, or the reverse"),
    "dora-mismatch": Code(ERROR, ADAPTER, (), "use_dora disagrees with the magnitude tensors present"),
    "bias-mismatch": Code(WARNING, ADAPTER, (), "lora_bias disagrees with the lora_B.bias tensors present"),
    "modules-to-save-not-saved": Code(WARNING, ADAPTER, (), "modules_to_save names modules with no saved tensors"),
    "unknown-config-field": Code(WARNING, ADAPTER, (), "config fields this PEFT version does not know"),
    "unprefixed-keys": Code(ERROR, ADAPTER, (FIX,),
         "tensor keys without the base_model.model. prefix PeftModel.from_pretrained matches"),
    "parameter-dropout": Code(ERROR, ADAPTER, (FIX, MERGE),
         "lora_dropout != 0 with target_parameters: PEFT raises ValueError on load"),
    "parameter-option": Code(ERROR, ADAPTER, (), "DoRA, lora_bias or fan_in_fan_out with target_parameters"),
    # adapter x target (check)
    "layout-mismatch": Code(ERROR, ALIGNMENT, (FIX, MERGE), "the adapter was saved for another module layout"),
    "ambiguous-layout": Code(ERROR, ALIGNMENT, (FIX,), "more than one rewrite lands the adapter equally well"),
    "targets-nothing": Code(ERROR, ALIGNMENT, (FIX,),
         "target_modules selects no module of the target: PEFT raises on load"),
    "never-trained-modules": Code(WARNING, ALIGNMENT, (),
                                  "targeted modules in a part of the model the adapter never had (lora_B stays 0)"),
    "dropped-tensors": Code(ERROR, ALIGNMENT, (FIX, MERGE), "adapter tensors that PEFT would drop (unexpected keys)"),
    "missing-adapter-weights": Code(ERROR, ALIGNMENT, (FIX, MERGE),
         "targeted modules that would keep their init values"),
    "shape-mismatch": Code(ERROR, ALIGNMENT, (FIX, MERGE), "in/out features disagree with the target module"),
    "embedding-size": Code(ERROR, ALIGNMENT, (FIX, MERGE), "embedding rows disagree with the target's vocabulary"),
    "pattern-mismatch": Code(ERROR, ALIGNMENT, (FIX, MERGE),
         "rank_pattern / alpha_pattern resolve differently on the target paths"),
    "modules-to-save-absent": Code(ERROR, ALIGNMENT, (FIX, MERGE),
         "a trained modules_to_save head has no place in the target class"),
    "modules-to-save-missing": Code(ERROR, RUNTIME, (),
         "PEFT wraps a modules_to_save module the checkpoint lacks (KeyError)"),
    "task-type-incompatible": Code(ERROR, RUNTIME, (FIX, MERGE),
         "task_type needs a class the target is not (PEFT raises AttributeError)"),
    "task-type-mismatch": Code(WARNING, RUNTIME, (FIX, MERGE),
         "task_type names another kind of head than the target class"),
    "weights-not-loaded": Code(ERROR, RUNTIME, (),
         "the class finds few of its weights in the checkpoint: transformers leaves them random"),
    "tied-embeddings": Code(WARNING, RUNTIME, (MERGE,), "the adapter touches embeddings that the target ties"),
    "fixed": Code(INFO, OUTPUT, (), "fix wrote an adapter that lands on the target"),
    # verify / merge
    "load-failed": Code(ERROR, PROOF, (), "stock PEFT raised while loading the adapter"),
    "not-bit-equal": Code(ERROR, PROOF, (), "a loaded tensor differs from the checkpoint"),
    "meta-tensors": Code(ERROR, PROOF, (), "adapter parameters left on the meta device"),
    "no-output-change": Code(ERROR, PROOF, (), "an adapted module's output does not change with the adapter on"),
    "merge-unchanged": Code(ERROR, PROOF, (), "the merged model equals the base: the adapter was not merged"),
    "merge-delta-wrong": Code(ERROR, PROOF, (), "a merged weight differs from base + delta beyond dtype rounding"),
    "merge-extra-change": Code(ERROR, PROOF, (), "a tensor the adapter does not touch differs from the base"),
    "merge-missing-tensor": Code(ERROR, PROOF, (), "a base tensor is missing from the merged checkpoint"),
    "weights-untied": Code(INFO, OUTPUT, (), "tied embeddings were untied because the adapter changes one side"),
    "merged": Code(INFO, OUTPUT, (), "merge wrote the base checkpoint with the adapter merged in"),
    "merge-config-differs": Code(ERROR, PROOF, (),
         "the merged config.json disagrees with the base's on the model's structure"),
    "merge-non-finite": Code(ERROR, PROOF, (), "NaN or Inf in a merged weight where base and adapter are finite"),
    # a serving runtime (check --runtime): what vLLM, SGLang, llama.cpp, Ollama, LoRAX or mlx-lm does with the
    # adapter; the finding names the runtime, its release and the source (docs/runtimes.md)
    "runtime-format": Code(ERROR, RUNTIME, (), "the runtime reads another adapter format"),
    "runtime-rank-limit": Code(ERROR, RUNTIME, (), "a rank above the runtime's configured maximum"),
    "runtime-dora": Code(ERROR, RUNTIME, (), "DoRA, which the runtime refuses or does not apply"),
    "runtime-lora-bias": Code(ERROR, RUNTIME, (), "lora_bias or bias != none, which the runtime refuses"),
    "runtime-rslora": Code(ERROR, RUNTIME, (), "use_rslora, which this release refuses"),
    "runtime-modules-to-save": Code(ERROR, RUNTIME, (), "modules_to_save, which the runtime refuses"),
    "runtime-full-weights": Code(ERROR, RUNTIME, (),
         "full tensors beside lora_A/lora_B (trained heads, resized embeddings) the runtime refuses"),
    "runtime-target-modules": Code(ERROR, RUNTIME, (), "target modules the runtime cannot wrap or rename"),
    "runtime-architecture": Code(ERROR, RUNTIME, (), "the base's architecture is one the runtime's adapters refuse"),
    "runtime-qkv-incomplete": Code(ERROR, RUNTIME, (), "q/k/v adapted without the projections the runtime fuses"),
    "runtime-scale": Code(ERROR, RUNTIME, (), "the runtime applies another scale than PEFT (rsLoRA, patterns)"),
    "runtime-keys-unused": Code(ERROR, RUNTIME, (), "adapter modules the runtime never applies"),
    "runtime-module-dropped": Code(ERROR, RUNTIME, (), "a module type dropped in every layer"),
    "runtime-vision-misplaced": Code(ERROR, RUNTIME, (), "vision-tower LoRA filed under language layers"),
    # verify-files
    "files-verified": Code(INFO, PROOF, (), "every file matches its manifest"),
    "file-changed": Code(ERROR, PROOF, (), "a file's SHA-256 differs from its manifest"),
    "file-missing": Code(ERROR, PROOF, (), "a file the manifest lists is gone"),
    "file-unlisted": Code(WARNING, PROOF, (), "a file the manifest does not list"),
    # convert
    "converted": Code(INFO, OUTPUT, (), "convert wrote the adapter in the target format"),
    "convert-refused": Code(ERROR, OUTPUT, (), "the adapter cannot be converted exactly; nothing was written"),
    # any command that reads a base or writes an output
    "custom-code": Code(WARNING, RUNTIME, (),
         "the base's config.json names custom code (auto_map), which lorafit never runs"),
    "custom-code-required": Code(ERROR, RUNTIME, (),
         "the base's model type exists only as custom code lorafit will not run"),
    "quantized-base": Code(INFO, RUNTIME, (),
         "the base's config.json is quantized: its module tree is judged as built before quantizing"),
    "stale-output-removed": Code(INFO, OUTPUT, (),
         "leftovers of a killed lorafit run to the same output were cleaned up"),
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
    runtime: str | None = None  # a serving runtime's finding: the runtime and release it holds for (vllm@0.11)
    source: str | None = None  # where the runtime does it (file: function), documented in docs/runtimes.md
    effect: str | None = None  # "will-not-load" or "not-as-trained", for a serving runtime's verdict
    caused_by: str | None = None  # the code of the root-cause finding this one follows from (shown under it)

    def __post_init__(self) -> None:
        if self.code not in CATALOG:
            raise ValueError(f"finding code {self.code!r} is not in the catalog")
        if not self.severity:
            self.severity = CATALOG[self.code].severity
        if self.count is None:
            self.count = len(self.keys)
        self.keys = list(self.keys)  # every item: the table shows the first few (-v more), JSON all of them

    def to_json(self) -> dict[str, Any]:
        out = {"code": self.code, "severity": self.severity, "message": self.message,
               "keys": self.keys, "count": self.count, "hint": self.hint}
        if self.runtime is not None:
            out |= {"runtime": self.runtime, "source": self.source, "effect": self.effect}
        if self.caused_by is not None:
            out["caused_by"] = self.caused_by
        return out


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Errors first; within a severity, the order the rules produced them (cause before consequence)."""
    return sorted(findings, key=lambda f: _ORDER[f.severity])


def mended_by(operation: Operation) -> frozenset[str]:
    """The codes that `operation` mends (see Code.mended_by)."""
    return frozenset(code for code, c in CATALOG.items() if operation in c.mended_by)
