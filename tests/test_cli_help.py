"""``rlhf-fast CMD --help`` lists every config key of CMD with its type, default and one-line meaning,
generated from the config dataclasses, in plain text."""
import dataclasses
import os
import re
import subprocess
import sys

import pytest

from rlhf_fast.cli import _config_class, main as cli_main
from rlhf_fast.trainer.config import describe

MARKUP = ("``", "**", ":class:", ":func:", "metadata", "<function", "<lambda>", "{'", "MISSING")


def _entries(text: str) -> dict[str, tuple[str, str, str]]:
    """``--key TYPE ... default: X`` lines and the indented meaning under each -> {key: (type, default, meaning)}."""
    out, current = {}, None
    for line in text.splitlines():
        m = re.match(r"^  (--[\w.-]+) (\S+)(?: \(or --\S+\))?   default: (.*)$", line)
        if m:
            current = m.group(1)
            out[current] = (m.group(2), m.group(3), "")
        elif current and line.startswith("      "):
            typ, default, meaning = out[current]
            out[current] = (typ, default, (meaning + " " + line.strip()).strip())
        else:
            current = None
    return out


@pytest.mark.parametrize("command", ["sft", "rm", "ppo", "demo"])
def test_help_lists_every_key_with_type_default_and_meaning(command, capsys):
    assert cli_main([command, "--help"]) == 0
    text = capsys.readouterr().out
    entries = _entries(text)
    rows = describe(_config_class(command)())
    assert len(entries) == len(rows) > 10
    for dotted, typ, default, meaning in rows:
        typ_shown, default_shown, meaning_shown = entries["--" + dotted.replace("_", "-")]
        assert typ_shown == typ.upper().replace(" OR NONE", "|none")
        assert default_shown == ('""' if default == "" else default)
        assert meaning_shown == meaning and meaning
    assert not [m for m in MARKUP if m in text]
    assert max(len(line) for line in text.splitlines()) <= 110


def test_help_shows_choices_bounds_and_aliases(capsys):
    cli_main(["ppo", "--help"])
    ppo = _entries(capsys.readouterr().out)
    assert ppo["--estimator"] == ("STR", "gae", "advantage estimator (one of gae, grpo, rloo, reinforce++)")
    assert ppo["--lr"][:2] == ("FLOAT", "1e-05") and ppo["--lr"][2].endswith("(> 0)")
    assert ppo["--kl-target"][:2] == ("FLOAT|none", "none")
    cli_main(["rm", "--help"])
    assert "  --data STR (or --comparisons)   default: \"\"" in capsys.readouterr().out
    cli_main(["demo", "--help"])
    demo = _entries(capsys.readouterr().out)
    assert demo["--ppo.steps"][1] == "100" and demo["--sft.lr"][1] == "0.003"   # the demo's own stage defaults
    assert dataclasses.is_dataclass(_config_class("demo"))


@pytest.mark.slow
def test_real_cli_help(capsys):
    path = os.pathsep.join(p for p in (os.getcwd(), os.environ.get("PYTHONPATH")) if p)
    res = subprocess.run([sys.executable, "-m", "rlhf_fast", "ppo", "--help"], env={**os.environ, "PYTHONPATH": path},
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stderr == ""
    assert res.stdout.startswith("usage: rlhf-fast ppo") and "  --reward-model STR|none   default: none" in res.stdout
    assert cli_main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(f"  {c} " in top for c in ("sft", "rm", "ppo", "demo")) and not [m for m in MARKUP if m in top]
