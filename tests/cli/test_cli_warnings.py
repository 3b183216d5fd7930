"""Warnings Kiln raises during a command print as one `kiln: warning:` line; other libraries' keep Python's."""
from __future__ import annotations

import warnings

from kiln.cli import _kiln_warnings_as_lines
from kiln.passes.fold_qdq import QuantizationWarning


def test_kiln_warnings_are_one_line_and_others_keep_their_format(capsys) -> None:
    passed_on = []
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, category, filename, lineno, *rest: passed_on.append(
            (str(message), category, filename, lineno))
        before = warnings.showwarning
        with _kiln_warnings_as_lines():
            warnings.warn("2 layer(s) run dequantized:\n  conv1, conv2.", QuantizationWarning)
            warnings.warn_explicit("old API", DeprecationWarning, "/site-packages/other/mod.py", 7)
        assert warnings.showwarning is before                   # restored after the command
    assert capsys.readouterr().err == "kiln: warning: 2 layer(s) run dequantized: conv1, conv2.\n"
    assert passed_on == [("old API", DeprecationWarning, "/site-packages/other/mod.py", 7)]
