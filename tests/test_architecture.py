"""The core library must not depend on any front end (design.md: dependencies point inward)."""

import subprocess
import sys

FRONT_ENDS = ("gradio", "fastapi", "typer", "uvicorn", "rich")
CORE_MODULES = ("sam3studio", "sam3studio.segmenter", "sam3studio.export", "sam3studio.render", "sam3studio.checkpoints")


def test_core_imports_no_front_end():
    code = (
        "import sys\n"
        + "".join(f"import {m}\n" for m in CORE_MODULES)
        + f"print(','.join(m for m in {FRONT_ENDS!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"core pulled in {out}"


def test_importing_the_core_enters_no_autocast():
    code = "import sam3studio, torch; print(torch.is_autocast_enabled('cpu'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "False"
