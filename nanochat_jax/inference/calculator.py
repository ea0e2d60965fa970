"""The chat model's tool as nanochat offers it, a calculator the scheduler runs between decode calls for a row that
emitted <|python_end|>: the result of the expression since <|python_start|> is forced into the row."""
import ast
import operator

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.USub: operator.neg, ast.UAdd: operator.pos}


def _number(node):
    value = _eval_node(node)
    if isinstance(value, str):
        raise ValueError("arithmetic on strings")
    return value


def _eval_node(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float, str):  # (not bool, an int subclass)
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_number(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_number(node.left), _number(node.right))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "count"
            and not node.keywords and len(node.args) == 1):
        target, needle = _eval_node(node.func.value), _eval_node(node.args[0])
        if isinstance(target, str) and isinstance(needle, str):
            return target.count(needle)
    raise ValueError(f"not allowed: {ast.dump(node)[:60]}")


def use_calculator(expr: str):
    """Arithmetic (+ - * / // %, no powers) on numbers, commas ignored, and str.count; None for anything else. The
    syntax tree is walked: nothing is executed."""
    expr = expr.replace(",", "")
    if len(expr) > 200:
        return None
    try:
        return _eval_node(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None


class Calculator:
    """The tool in tokens: `result_tokens(history)` for a row whose last token is <|python_end|> gives the tokens to
    force into it (at most `room`), or [] when there is nothing to evaluate or the calculator refuses it."""

    def __init__(self, tokenizer, room: int):
        special = tokenizer.encode_special
        self.tokenizer, self.room, self.start = tokenizer, room, special("<|python_start|>")
        self.output_start, self.output_end = special("<|output_start|>"), special("<|output_end|>")

    def result_tokens(self, history: list[int]) -> list[int]:
        starts = [j for j, t in enumerate(history) if t == self.start]
        result = use_calculator(self.tokenizer.decode(history[starts[-1] + 1:-1])) if starts else None
        if result is None:
            return []
        return [self.output_start] + self.tokenizer.encode(str(result))[:self.room - 2] + [self.output_end]
