"""Countdown: combine the given numbers with + - * / to reach a target (the paper's main task).

An example is `{"numbers": [44, 19, 35], "target": 98, "solution": "44 + 19 + 35"}`. The
prompt is TinyZero's: think in <think> </think>, answer in <answer> </answer>.

Reward = 0.1 * format + answer, so a solved example scores 1.1 and `solved_reward` is 1.0:

- The answer block is the text between the last `</answer>` and the nearest `<answer>`
  before it, both after the last `</think>` when the completion has one: reasoning inside
  <think> is not an answer. With the raw prompt the completion starts inside <think>, so
  no opening <think> is required.
- format = 1 when there is such a block, even an empty or wrong one.
- answer = 1 when the block holds only digits, + - * / ( ) and whitespace, at most
  MAX_ANSWER_CHARS characters and MAX_DEPTH nested parentheses; its integer literals are
  exactly the given numbers (as a multiset); and its exact value (fractions allowed along
  the way) is the target within 1e-5. No unary minus, no exponent, no division by zero, no
  intermediate value beyond MAX_MAGNITUDE.

Answers are parsed by a small recursive-descent parser here, never by Python's eval, and
`score` only scans the completion with str.rfind, so a multi-megabyte completion costs
about a millisecond and nothing in it can make `score` raise.

`countdown-paper` scores as the paper's checker does (countdown_task.reward_function of
its repository), with the same total 0.1 * format + answer:

- format, on "<think>" + completion (the paper's prompt ends in <think>): 1.0 for the
  whole `<think>...</think>\n<answer>...</answer>` and nothing else, otherwise 0.1 for a
  <think>...</think> block plus 0.5 for an <answer>...</answer> block anywhere.
- answer = 1 when the last <answer> block anywhere (reasoning included) holds only
  digits, + - * / ( ) and spaces, its numbers (digit runs) are exactly the given ones,
  and it is a Python expression whose value is within 1e-5 of the target: unary minus,
  `**` and `//` count, as they do for Python's eval. The expression is parsed with `ast`
  and computed exactly here (never eval-ed), with bounds: at most MAX_ANSWER_CHARS
  characters, values of at most MAX_PAPER_BITS bits. The paper's checker has neither
  bound; no answer over four numbers that it credits is refused by them in practice.

Targets may be integers or decimal numbers (the paper's data file gives targets as
strings, some of them "27.4" or "-3"); they are compared exactly.

Examples are generated from a seed (`generate`) or loaded from a .json/.jsonl file
(tasks/data.py; "split" fields or the last 20% make the eval set), the paper's
countdown.json among them (objects with context, numbers, target, solution); with
`--prompt-format raw` an example's "context" is the prompt, as in the paper's script.
"""

from __future__ import annotations

import ast
import math
import random
import re
from collections import Counter
from collections.abc import Iterator
from fractions import Fraction

from tasks.base import Example, Task
from tasks.data import ProceduralTask, require

FORMAT_WEIGHT = 0.1
SOLVED_SCORE = 1.0 + FORMAT_WEIGHT  # what a correct, well-formatted answer scores

MAX_ANSWER_CHARS = 200  # longer than any sane answer over 3-6 two-digit numbers
MAX_DEPTH = 32  # nested parentheses; also bounds the parser's recursion
MAX_MAGNITUDE = 10**12  # bound on |numerator| and denominator of every value
TOLERANCE = Fraction(1, 10**5)

# Generator ranges: 3 or 4 numbers in 1..99 (as in TinyZero's Countdown-Tasks-3to4 data,
# which the paper uses) and a target in 1..999 reached with positive integer intermediates.
NUMBER_COUNTS = (3, 4)
MIN_NUMBER, MAX_NUMBER = 1, 99
MIN_TARGET, MAX_TARGET = 1, 999
TREES_PER_DRAW = 10
# countdown-easy: the same task at a size a 135M model solves some of
EASY_COUNTS = (2, 3)
EASY_MAX_NUMBER, EASY_MAX_TARGET = 10, 50

RAW_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer.\nUser: {question}\nAssistant: Let me solve this step "
    "by step.\n<think>"
)


# ---------------------------------------------------------------------------------------
# Reward


def target_value(target: int | float | str) -> Fraction:
    """A checked example's target as an exact number ("27.4" is 137/5)."""
    return Fraction(str(target).strip())


def score(completion: str, numbers: list[int], target: int | Fraction) -> float:
    """0.1 for a well-placed <answer> block, plus 1 if its expression solves the example."""
    span = _answer_span(completion)
    if span is None:
        return 0.0
    begin, end = span
    if end - begin > MAX_ANSWER_CHARS:  # checked before slicing: the block may be megabytes
        return FORMAT_WEIGHT
    solved = _solves(completion[begin:end], numbers, target)
    return FORMAT_WEIGHT + (1.0 if solved else 0.0)


def _answer_span(completion: str) -> tuple[int, int] | None:
    """Start and end of the last <answer> block's content after any </think>, or None."""
    think_end = completion.rfind("</think>")
    region = 0 if think_end < 0 else think_end + len("</think>")
    close = completion.rfind("</answer>", region)
    if close < 0:
        return None
    open_ = completion.rfind("<answer>", region, close)
    if open_ < 0:
        return None
    return open_ + len("<answer>"), close


def _solves(expression: str, numbers: list[int], target: int) -> bool:
    parsed = evaluate(expression)
    if parsed is None:
        return False
    value, literals = parsed
    return Counter(literals) == Counter(numbers) and abs(value - target) <= TOLERANCE


class _Invalid(ValueError):
    """The answer is not a well-formed, bounded expression (caught inside this module)."""


_ALLOWED_CHARS = frozenset("0123456789+-*/() \t\r\n")


def evaluate(expression: str) -> tuple[Fraction, list[int]] | None:
    """The exact value and the integer literals of an answer, or None where it is invalid.

    Grammar: expr = term (('+' | '-') term)*; term = factor (('*' | '/') factor)*;
    factor = integer | '(' expr ')'. So '**', unary minus and '1 2' do not parse.
    """
    if len(expression) > MAX_ANSWER_CHARS or not _ALLOWED_CHARS.issuperset(expression):
        return None
    parser = _Parser(_tokens(expression))
    try:
        value = parser.expression(depth=0)
        if parser.peek() is not None:  # trailing tokens, e.g. an unopened ')'
            return None
    except _Invalid:
        return None
    return value, parser.literals


def _tokens(expression: str) -> list[str]:
    """Integer literals and single-character operators; whitespace only separates."""
    tokens: list[str] = []
    digits = ""
    for char in expression:
        if char.isdigit():
            digits += char
            continue
        if digits:
            tokens.append(digits)
            digits = ""
        if not char.isspace():
            tokens.append(char)
    if digits:
        tokens.append(digits)
    return tokens


class _Parser:
    """Recursive descent over the tokens with exact Fraction arithmetic."""

    def __init__(self, tokens: list[str]) -> None:
        self.tokens = tokens
        self.position = 0
        self.literals: list[int] = []

    def peek(self) -> str | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def take(self) -> str | None:
        token = self.peek()
        self.position += 1
        return token

    def expression(self, depth: int) -> Fraction:
        if depth > MAX_DEPTH:
            raise _Invalid("too deeply nested")
        value = self.term(depth)
        while self.peek() in ("+", "-"):
            operator = self.take()
            operand = self.term(depth)
            value = _bounded(value + operand if operator == "+" else value - operand)
        return value

    def term(self, depth: int) -> Fraction:
        value = self.factor(depth)
        while self.peek() in ("*", "/"):
            operator = self.take()
            operand = self.factor(depth)
            if operator == "*":
                value = _bounded(value * operand)
            elif operand == 0:
                raise _Invalid("division by zero")
            else:
                value = _bounded(value / operand)
        return value

    def factor(self, depth: int) -> Fraction:
        token = self.take()
        if token == "(":
            value = self.expression(depth + 1)
            if self.take() != ")":
                raise _Invalid("unclosed parenthesis")
            return value
        if token is not None and token.isdigit():
            literal = int(token)
            self.literals.append(literal)
            return _bounded(Fraction(literal))
        # an operator where a number belongs: unary minus, '**', '()', a dangling operator
        raise _Invalid(f"unexpected {token!r}")


def _bounded(value: Fraction) -> Fraction:
    if abs(value.numerator) > MAX_MAGNITUDE or value.denominator > MAX_MAGNITUDE:
        raise _Invalid("value out of range")
    return value


# ---------------------------------------------------------------------------------------
# The paper's reward (countdown-paper)

PAPER_FORMAT_FULL, PAPER_THINK, PAPER_ANSWER = 1.0, 0.1, 0.5
MAX_PAPER_BITS = 1100  # beyond float's range: the paper's float(result) fails there too
_PAPER_CHARS = frozenset("0123456789+-*/() ")


def paper_format(response: str) -> float:
    """The paper's format reward of `response` ("<think>" + completion), without regexes
    (so without their backtracking): the same value as its three re.DOTALL patterns."""
    end = len(response) - 1 if response.endswith("\n") else len(response)  # `$`
    body = response[:end]
    if response.startswith("<think>") and body.endswith("</answer>"):
        # ^<think>.*?</think>\n<answer>.*?</answer>$: the first "</think>\n<answer>" after
        # the opening tag must end before the closing "</answer>"
        k = response.find("</think>\n<answer>", len("<think>"))
        if k >= 0 and k + len("</think>\n<answer>") <= end - len("</answer>"):
            return PAPER_FORMAT_FULL
    reward = 0.0
    if _block(response, "<think>", "</think>") is not None:
        reward += PAPER_THINK
    if _block(response, "<answer>", "</answer>") is not None:
        reward += PAPER_ANSWER
    return reward


def _block(text: str, open_: str, close: str, start: int = 0) -> tuple[int, int] | None:
    """The first open_ ... close pair (shortest content) at or after `start`."""
    i = text.find(open_, start)
    if i < 0:
        return None
    j = text.find(close, i + len(open_))
    return None if j < 0 else (i + len(open_), j)


def _last_answer(completion: str) -> str | None:
    """The content of the last match of the paper's <answer>(.*?)</answer> (re.findall)."""
    last, start = None, 0
    while (span := _block(completion, "<answer>", "</answer>", start)) is not None:
        last, start = span, span[1] + len("</answer>")
    return None if last is None else completion[last[0]:last[1]]


def paper_answer(completion: str, numbers: list[int], target: int | Fraction) -> float:
    """1.0 if the last <answer> block solves the example as the paper's checker sees it."""
    content = _last_answer(completion)
    if not content or len(content) > MAX_ANSWER_CHARS:
        return 0.0
    # ^[0-9+\-*/() ]+$ with re.match: `$` also matches before one trailing newline
    chars = content[:-1] if content.endswith("\n") else content
    if not chars or not _PAPER_CHARS.issuperset(chars):
        return 0.0
    if sorted(int(n) for n in re.findall(r"\d+", content)) != sorted(numbers):
        return 0.0
    value = python_value(content)
    if value is None:
        return 0.0
    return 1.0 if abs(value - target) < TOLERANCE else 0.0


def python_value(expression: str) -> Fraction | None:
    """What Python's eval makes of an arithmetic expression, computed exactly and bounded;
    None where eval would raise (syntax, division by zero, a complex result) or a value
    leaves MAX_PAPER_BITS. Never evaluates code: only numbers and + - * / // ** nodes."""
    try:  # eval() strips leading spaces and tabs; ast.parse does not
        tree = ast.parse(expression.lstrip(" \t"), mode="eval")
        return _python_value(tree.body)
    except (SyntaxError, ValueError, RecursionError, MemoryError, ZeroDivisionError,
            _Invalid):
        return None


def _python_value(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return _wide(Fraction(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _python_value(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if not isinstance(node, ast.BinOp):
        raise _Invalid(f"not arithmetic: {type(node).__name__}")
    left, right = _python_value(node.left), _python_value(node.right)
    if isinstance(node.op, ast.Add):
        return _wide(left + right)
    if isinstance(node.op, ast.Sub):
        return _wide(left - right)
    if isinstance(node.op, ast.Mult):
        return _wide(left * right)
    if isinstance(node.op, ast.Div):
        return _wide(left / right)  # ZeroDivisionError, as in Python
    if isinstance(node.op, ast.FloorDiv):
        return _wide(Fraction(left // right))
    if isinstance(node.op, ast.Pow):
        return _power(left, right)
    raise _Invalid(f"operator {type(node.op).__name__}")


def _power(base: Fraction, exponent: Fraction) -> Fraction:
    if exponent.denominator == 1:
        bits = max(base.numerator.bit_length(), base.denominator.bit_length())
        if abs(exponent.numerator) * bits > MAX_PAPER_BITS:
            raise _Invalid("power out of range")
        return _wide(base ** exponent.numerator)  # 0 ** -1: ZeroDivisionError, as in Python
    if base < 0:
        raise _Invalid("complex result")  # Python gives a complex; float() of it raises
    if base == 0:
        if exponent < 0:
            raise ZeroDivisionError
        return Fraction(0)
    try:  # Python computes a fractional power in floating point; so does this
        return _wide(Fraction(math.pow(float(base), float(exponent))))
    except (OverflowError, ValueError):
        raise _Invalid("power out of range") from None


def _wide(value: Fraction) -> Fraction:
    if max(value.numerator.bit_length(), value.denominator.bit_length()) > MAX_PAPER_BITS:
        raise _Invalid("value out of range")
    return value


def paper_score(completion: str, numbers: list[int], target: int | Fraction) -> float:
    """The paper's reward: 0.1 * format("<think>" + completion) + answer(completion)."""
    return FORMAT_WEIGHT * paper_format("<think>" + completion) + paper_answer(
        completion, numbers, target)


# ---------------------------------------------------------------------------------------
# Solver and generator


def solve(numbers: list[int], target: int) -> str | None:
    """An expression that uses each number once and equals target, or None if none exists.

    Exhaustive: repeatedly replace two values by their sum, differences, product or exact
    quotients (Fractions where needed), remembering value multisets that already failed.
    About a millisecond for four numbers.
    """
    failed: set[tuple[Fraction | int, ...]] = set()

    def search(items: list[tuple[Fraction | int, str]]) -> str | None:
        if len(items) == 1:
            value, expression = items[0]
            return expression if value == target else None
        key = tuple(sorted(value for value, _ in items))
        if key in failed:
            return None
        for i in range(len(items)):
            for j in range(i + 1, len(items)):
                rest = items[:i] + items[i + 1 : j] + items[j + 1 :]
                for combined in _combinations(items[i], items[j]):
                    found = search([*rest, combined])
                    if found is not None:
                        return found
        failed.add(key)
        return None

    found = search([(n, str(n)) for n in numbers])
    if found is not None and len(numbers) > 1:
        found = found[1:-1]  # every combination is parenthesized; drop the outermost pair
    return found


def _combinations(
    a: tuple[Fraction | int, str], b: tuple[Fraction | int, str]
) -> Iterator[tuple[Fraction | int, str]]:
    (x, ex), (y, ey) = a, b
    yield x + y, f"({ex} + {ey})"
    yield x * y, f"({ex} * {ey})"
    yield x - y, f"({ex} - {ey})"
    yield y - x, f"({ey} - {ex})"
    if y:
        yield _divide(x, y), f"({ex} / {ey})"
    if x:
        yield _divide(y, x), f"({ey} / {ex})"


def _divide(x: Fraction | int, y: Fraction | int) -> Fraction | int:
    """x / y exactly; plain ints while they divide, as int arithmetic is ~30x faster."""
    if isinstance(x, int) and isinstance(y, int) and x % y == 0:
        return x // y
    return Fraction(x) / y


def generate(count: int, seed: int, counts: tuple[int, ...] = NUMBER_COUNTS,
             max_number: int = MAX_NUMBER, max_target: int = MAX_TARGET) -> list[Example]:
    """`count` distinct solvable examples from `seed`; distinct means no two share the
    (sorted numbers, target) pair, so any split of the list has no overlap. `counts`,
    `max_number` and `max_target` bound the draw (the defaults are TinyZero's ranges)."""
    rng = random.Random(seed)
    seen: set[tuple[tuple[int, ...], int]] = set()
    examples: list[Example] = []
    while len(examples) < count:
        numbers = [rng.randint(MIN_NUMBER, max_number) for _ in range(rng.choice(counts))]
        # Several trees per draw: giving up on the first out-of-range target would thin out
        # four-number examples, whose products overshoot max_target more often.
        for _ in range(TREES_PER_DRAW):
            target, solution = _random_equation(numbers, rng)
            if MIN_TARGET <= target <= max_target:
                break
        key = (tuple(sorted(numbers)), target)
        if not MIN_TARGET <= target <= max_target or key in seen:
            continue
        # The construction guarantees a solution; scoring it with the reward itself keeps a
        # generator bug from ever shipping an example whose recorded solution fails.
        if score(f"<answer>{solution}</answer>", numbers, target) != SOLVED_SCORE:
            raise RuntimeError(f"countdown generator: {solution} does not reach {target}")
        seen.add(key)
        examples.append({"numbers": numbers, "target": target, "solution": solution})
    return examples


def _random_equation(numbers: list[int], rng: random.Random) -> tuple[int, str]:
    """A random expression tree over all the numbers with positive integer intermediates
    (a human-style solution), as (value, expression)."""
    pool = [(n, str(n)) for n in numbers]
    rng.shuffle(pool)
    while len(pool) > 1:
        a, b = pool.pop(rng.randrange(len(pool))), pool.pop(rng.randrange(len(pool)))
        (x, ex), (y, ey) = (a, b) if a[0] >= b[0] else (b, a)  # x >= y
        options = [(x + y, "+"), (x * y, "*")]
        if x > y:
            options.append((x - y, "-"))
        if y > 1 and x % y == 0:
            options.append((x // y, "/"))
        value, operator = rng.choice(options)
        pool.append((value, f"({ex} {operator} {ey})"))
    value, expression = pool[0]
    return value, expression[1:-1] if len(numbers) > 1 else expression


# ---------------------------------------------------------------------------------------
# Example files


def check_example(example: Example) -> str | None:
    """None if a file record is a countdown example, else what is wrong with it.

    "nums" (the name in TinyZero's data) is accepted for "numbers"; "solution" is optional.
    """
    field = "nums" if "nums" in example and "numbers" not in example else "numbers"
    problem = require(example, field, list) or require(example, "target", (int, float, str))
    if problem:
        return problem
    numbers = example[field]
    if not numbers or not all(type(n) is int and n > 0 for n in numbers):
        return f"field {field!r} must be a non-empty list of positive integers"
    if not _is_decimal(example["target"]):
        return (f"field 'target' must be a number or a decimal string such as \"27.4\", "
                f"not {example['target']!r}")
    for optional in ("solution", "context"):
        if optional in example and (problem := require(example, optional, str)):
            return problem
    return None


_DECIMAL = re.compile(r"[+-]?\d{1,30}(\.\d{1,30})?")


def _is_decimal(target: int | float | str) -> bool:
    if isinstance(target, float):
        return math.isfinite(target)
    return isinstance(target, int) or _DECIMAL.fullmatch(target.strip()) is not None


def from_record(record: Example) -> Example:
    """A checked file record as an example with the generator's field names; the paper's
    "context" (its raw prompt) is kept, and an integral target becomes an int."""
    target = record["target"]
    value = target_value(target)
    example: Example = {"numbers": list(record.get("numbers", record.get("nums"))),
                        "target": int(value) if value.denominator == 1 else target}
    for optional in ("solution", "context"):
        if optional in record:
            example[optional] = record[optional]
    return example


# ---------------------------------------------------------------------------------------
# Task


class Countdown(ProceduralTask, Task):
    """Countdown from a seed (`data=None`) or a .json/.jsonl file of examples."""

    name = "countdown"
    solved_reward = 1.0
    check_example = staticmethod(check_example)
    from_record = staticmethod(from_record)
    generate = staticmethod(generate)

    def user_text(self, example: Example) -> str:
        return (
            f"Using the numbers {list(example['numbers'])}, create an equation that equals "
            f"{example['target']}. You can use basic arithmetic operations (+, -, *, /) and "
            "each number can only be used once. Show your work in <think> </think> tags. "
            "And return the final answer in <answer> </answer> tags, for example "
            "<answer> (1 + 2) / 3 </answer>."
        )

    def prompt(self, example: Example, tokenizer) -> str:
        """The chat template where used; otherwise the example's own raw prompt (the
        paper's data file has one, "context") or the paper's raw text, ending in <think>."""
        if self.templated(tokenizer):
            return super().prompt(example, tokenizer)
        return example.get("context") or RAW_PROMPT.format(question=self.user_text(example))

    def reward(self, completion: str, example: Example) -> float:
        return score(completion, example["numbers"], target_value(example["target"]))


class CountdownPaper(Countdown):
    """Countdown scored as the paper's checker scores it (graded format, Python syntax)."""

    name = "countdown-paper"

    def reward(self, completion: str, example: Example) -> float:
        return paper_score(completion, example["numbers"], target_value(example["target"]))


def generate_easy(count: int, seed: int) -> list[Example]:
    """Examples small enough for a 135M model to solve some of: EASY_COUNTS numbers in
    1..EASY_MAX_NUMBER and a target in 1..EASY_MAX_TARGET."""
    return generate(count, seed, EASY_COUNTS, EASY_MAX_NUMBER, EASY_MAX_TARGET)


class CountdownEasy(CountdownPaper):
    """countdown-paper on fewer and smaller numbers (2 or 3 in 1..EASY_MAX_NUMBER): the
    paper's task at a size where the demo model earns a reward (docs/results.md)."""

    name = "countdown-easy"
    generate = staticmethod(generate_easy)
