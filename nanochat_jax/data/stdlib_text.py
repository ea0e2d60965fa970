"""Text that ships with Python itself: the docstrings of the standard library, read with `ast` (nothing is imported).
The raw material of the local stand-ins (scripts.local_corpus, tasks.local) on a machine with no network."""
import ast
import functools
import os
import re
import sysconfig


def module_docstrings(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return "\n\n".join(doc for n in nodes if (doc := ast.get_docstring(n)))


def stdlib_documents(max_chars: int, min_chars: int = 200) -> list[str]:
    """One document per standard-library module (its docstrings), in a fixed order, up to about max_chars."""
    root = sysconfig.get_paths()["stdlib"]
    docs, total = [], 0
    for directory, subdirs, files in os.walk(root):  # top-down, so the pruning below keeps it out of those folders
        subdirs[:] = sorted(d for d in subdirs if d not in ("test", "tests", "site-packages", "idlelib"))
        for name in sorted(files):
            if name.endswith(".py"):
                text = module_docstrings(os.path.join(directory, name))
                if len(text) >= min_chars:
                    docs.append(text)
                    total += len(text)
                if total >= max_chars:
                    return docs
    return docs


@functools.lru_cache(maxsize=4)
def stdlib_words(max_chars: int = 2_000_000, min_len: int = 3, max_len: int = 12) -> tuple[str, ...]:
    """The distinct lowercase words of min_len..max_len letters in the standard library's docstrings, sorted (no
    letter three times in a row: that drops test strings such as 'aaabbc')."""
    words = set()
    for doc in stdlib_documents(max_chars):
        words.update(w for w in re.findall(r"\b[a-z]+\b", doc)
                     if min_len <= len(w) <= max_len and not re.search(r"(.)\1\1", w))
    return tuple(sorted(words))
