"""Loading task examples from JSON / JSONL files, with one-line errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from es_mpi.errors import EsError

Example = dict[str, Any]


def load_examples(path: str | Path, check: Callable[[Example], str | None],
                  ) -> tuple[list[Example], list[Example]]:
    """(train, eval) examples from a .jsonl (one object per line) or .json (a list) file.

    `check(example)` returns None or what is wrong with the example. Objects may carry
    "split": "train" | "eval"; without any split field, the last 20% (at least one) are
    the eval split, so the same file always splits the same way.
    """
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise EsError(f"task data {path}: expected a .jsonl or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise EsError(f"task data {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise EsError(f"task data {path} cannot be read: {exc}") from None
    records: list[tuple[str, Any]] = []
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise EsError(f"task data {path}: invalid JSON at line {exc.lineno}: {exc.msg}"
                          ) from None
        except RecursionError:
            raise EsError(f"task data {path}: JSON nested too deeply") from None
        if not isinstance(data, list):
            raise EsError(f"task data {path}: expected a JSON list of objects")
        records = [(f"record {i + 1}", obj) for i, obj in enumerate(data)]
    else:
        # split on newlines only: U+2028 may stand raw inside a JSON string
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                records.append((f"line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise EsError(f"task data {path}: line {lineno} is not valid JSON ({exc.msg})"
                              ) from None
            except RecursionError:
                raise EsError(f"task data {path}: line {lineno}: JSON nested too deeply"
                              ) from None
    if not records:
        raise EsError(f"task data {path} holds no examples")
    examples = []
    for where, obj in records:
        problem = "not a JSON object" if not isinstance(obj, dict) else check(obj)
        if not problem and obj.get("split", "train") not in ("train", "eval"):
            problem = f"split must be 'train' or 'eval', not {obj['split']!r}"
        if problem:
            raise EsError(f"task data {path}: {where}: {problem}")
        examples.append(obj)
    if any("split" in e for e in examples):
        train = [e for e in examples if e.get("split", "train") == "train"]
        held_out = [e for e in examples if e.get("split") == "eval"]
    else:
        n_eval = max(1, len(examples) // 5) if len(examples) > 1 else 0
        train, held_out = examples[:len(examples) - n_eval], examples[len(examples) - n_eval:]
    if not train:
        raise EsError(f"task data {path} has no training examples")
    return train, held_out


def require(example: Example, field: str, kind: type | tuple[type, ...]) -> str | None:
    """None if example[field] exists with the given type, else what is wrong."""
    if field not in example:
        return f"missing field {field!r}"
    value = example[field]
    if isinstance(value, bool) or not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        return f"field {field!r} must be {names}, not {type(value).__name__}"
    return None



class ProceduralTask:
    """Mixin for a Task whose examples are generated from a seed or loaded from a file.

    Generated: eval is the first `n_eval` examples of the seed's sequence and train the
    next `n_train`, so the eval set stays the same when only `n_train` changes. Loaded
    (`data` = a .json/.jsonl path): the file's split decides and `n_train`, `n_eval` and
    `seed` are not used. Subclasses set `check_example`, `from_record` and `generate`.
    """

    name: str
    check_example: Callable[[Example], str | None]
    from_record: Callable[[Example], Example]
    generate: Callable[[int, int], list[Example]]

    def __init__(self, data: str | None = None, n_train: int = 256, n_eval: int = 128,
                 seed: int = 0) -> None:
        if data is not None:
            train, held_out = load_examples(data, self.check_example)
            self._train = list(map(self.from_record, train))
            self._eval = list(map(self.from_record, held_out))
            return
        if n_train < 1 or n_eval < 1:
            raise EsError(f"{self.name}: n_train and n_eval must be >= 1 "
                          f"(got {n_train}, {n_eval})")
        examples = self.generate(n_eval + n_train, seed)
        self._eval, self._train = examples[:n_eval], examples[n_eval:]

    def train_examples(self) -> list[Example]:
        return list(self._train)

    def eval_examples(self) -> list[Example]:
        return list(self._eval)
