"""How PEFT loading onto a transformers class treats an adapter: the wrapper task_type picks, the heads it wraps
as modules_to_save, and tied embeddings. These are the transformers runtime's acceptance rules.
"""

from __future__ import annotations

import re

from ...adapter import Adapter
from ...align import Alignment, Landing
from ...findings import Finding
from ...formats.peft import targeting
from ...tree import ModuleTree

GENERATION_TASKS = {"CAUSAL_LM", "SEQ_2_SEQ_LM"}


def rule_modules_to_save_missing(adapter: Adapter, tree: ModuleTree, m: Landing) -> list[Finding]:
    missing = targeting.wrapped_without_tensors(adapter.config, adapter.task_type, tree, m)
    if not missing:
        return []
    return [Finding("modules-to-save-missing", f"PEFT will wrap {', '.join(missing)} of {tree.class_name} as "
                    f"modules_to_save (from modules_to_save or task_type {adapter.task_type}), but the checkpoint "
                    "holds no trained copy: PeftModel.from_pretrained raises KeyError", missing,
                    hint="`lorafit fix` sets a task_type that does not wrap a head the adapter never trained")]


def rule_task_type(adapter: Adapter, tree: ModuleTree, class_hint: str) -> list[Finding]:
    task = adapter.task_type
    if task in GENERATION_TASKS and not tree.can_generate:
        return [Finding("task-type-incompatible", f"task_type {task} makes PEFT wrap the model in "
                        f"PeftModelFor{'CausalLM' if task == 'CAUSAL_LM' else 'Seq2SeqLM'}, which needs "
                        f"prepare_inputs_for_generation; {tree.class_name} has none, so PeftModel.from_pretrained "
                        "raises AttributeError", hint=class_hint)]
    if task and tree.implied_task_type and task != tree.implied_task_type:
        return [Finding("task-type-mismatch", f"task_type {task} but {tree.class_name} serves "
                        f"{tree.implied_task_type}; PEFT picks the wrapper class from task_type", hint=class_hint)]
    return []


def rule_tied(adapter: Adapter, tree: ModuleTree, m: Landing) -> list[Finding]:
    if not tree.tie_word_embeddings or adapter.config.get("ensure_weight_tying"):
        return []
    emb = {tree.input_embeddings, tree.output_embeddings} - {None}
    touched = sorted({t for t in list(m.pairs.values()) + list(m.tensor_pairs.values()) if t in emb})
    if not touched:
        return []
    return [Finding("tied-embeddings", f"{tree.class_name} ties its input and output embeddings and the adapter "
                    f"changes {', '.join(touched)} only: unmerged, PEFT adapts just that side; merged into the "
                    "shared weight, a LoRA delta reaches both sides (outputs change), and a trained copy unties them",
                    touched, hint="train with LoraConfig(ensure_weight_tying=True) to adapt both sides alike")]


def runtime_rules(adapter: Adapter, tree: ModuleTree, al: Alignment, class_hint: str) -> list[Finding]:
    """Every rule of loading with PEFT onto this class, judged on the landing that will be used."""
    best = al.chosen if al.needs_rewrite and not al.ambiguous else al.as_is
    return (rule_modules_to_save_missing(adapter, tree, best) + rule_task_type(adapter, tree, class_hint)
            + rule_tied(adapter, tree, best))


_HEADS = ("classifier", "score", "qa_outputs")


def head_size_hint(adapter: Adapter, landing: Landing) -> str | None:
    """When the only shape conflicts are a classification head's rows, the config field that sizes it and the value
    the adapter was trained with: the fix is to load the base with that value, not another base."""
    rows = set()
    for c in landing.conflicts:
        name = c.target_path.split(".")[0] if c.target_path else ""
        got = re.search(r"\[(\d+)", c.expected)
        if name not in _HEADS or got is None:
            return None
        rows.add(int(got.group(1)))
    if len(rows) != 1 or adapter.task_type not in ("SEQ_CLS", "TOKEN_CLS", "QUESTION_ANS", None):
        return None
    n = rows.pop()
    return (f"the adapter's head has {n} labels: load the base as you did in training, from_pretrained(base, "
            f"num_labels={n}); lorafit: --config num_labels={n}")
