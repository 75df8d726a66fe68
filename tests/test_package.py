"""The package itself: what `import gpt2` costs and exports.

PyTorch takes ~1.5 s to import; the command line's help, its argument errors and
`gpt2 tokenize` do not need it, and `GPT2` and `score` are imported on first use.
Each check runs in a fresh interpreter (this one has imported everything).
"""

from __future__ import annotations

import subprocess
import sys


def fresh(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_help_parsing_and_tokenize_do_not_import_torch():
    out = fresh(
        "import sys, contextlib, io\n"
        "from gpt2.cli import build_parser, main\n"
        "build_parser()\n"
        "with contextlib.redirect_stdout(io.StringIO()) as o:\n"
        "    code = main(['tokenize', 'hello world'])\n"
        "print(code, o.getvalue().strip(), 'torch' in sys.modules)\n"
    )
    assert out == "0 31373 995 False"


def test_gpt2_and_score_are_there_on_first_use():
    out = fresh(
        "import sys, gpt2\n"
        "before = 'torch' in sys.modules\n"
        "from gpt2 import GPT2, GPT2Config, GPT2Error, Tokenizer, score\n"
        "from gpt2.model import GPT2 as M\n"
        "from gpt2.score import score as s\n"
        "print(before, GPT2 is M, score is s, gpt2.score is s, sorted(gpt2.__all__) == "
        "sorted(n for n in dir(gpt2) if n in gpt2.__all__))\n"
    )
    assert out == "False True True True True"


def test_importing_the_score_module_first_keeps_gpt2_score_the_function():
    """The submodule gpt2.score would otherwise replace the package's attribute."""
    out = fresh(
        "import gpt2.score\n"
        "import gpt2\n"
        "from gpt2.score import score\n"
        "print(gpt2.score is score, callable(gpt2.score))\n"
    )
    assert out == "True True"


def test_train_package_exports_on_first_use():
    out = fresh(
        "import sys\n"
        "from gpt2.train import TrainConfig\n"
        "before = 'torch' in sys.modules\n"
        "from gpt2.train import TrainSummary, open_tokens, prepare, train\n"
        "from gpt2.train.trainer import TrainConfig as T, train as t\n"
        "print(before, TrainConfig is T, train is t, TrainConfig(data='d', out='o').lr)\n"
    )
    assert out == "False True True 0.0006"


def test_unknown_attribute_is_an_attribute_error():
    out = fresh(
        "import gpt2, gpt2.train\n"
        "for m in (gpt2, gpt2.train):\n"
        "    try:\n"
        "        m.nothing\n"
        "    except AttributeError as e:\n"
        "        print(e)\n"
    )
    assert out.splitlines() == ["module 'gpt2' has no attribute 'nothing'",
                                "module 'gpt2.train' has no attribute 'nothing'"]
