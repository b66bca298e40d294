"""Regenerate the tiny failure-mode notebooks the runner tests use (`python make_notebooks.py`).

Each notebook exercises one behaviour of the run protocol: success with outputs, a raising
cell, `sys.exit(1)`, `sys.exit(0)`, a kernel that dies, a long sleep with a child process (kill /
detach), reading a secret from the environment. Kept as code so reviewers read the cells here, not in JSON.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def _notebook(parameters: str, *cells: str) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "display_name": "Python 3",
        "language": "python",
    }
    nb.cells.append(new_markdown_cell("versa-runner test notebook"))
    nb.cells.append(new_code_cell(parameters, metadata={"tags": ["parameters"]}))
    nb.cells.extend(new_code_cell(source) for source in cells)
    return nb


NOTEBOOKS = {
    "ok": _notebook(
        'greeting = "hello"\nrepeat = 1\nrun_id = ""',
        "import json\nimport os\nimport pathlib\n\n"
        "pathlib.Path('reports').mkdir(exist_ok=True)\n"
        "pathlib.Path('artifacts/ok').mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path('reports/ok.md').write_text(f'{greeting} x{repeat} run={run_id}\\n')\n"
        "pathlib.Path('artifacts/ok/result.json').write_text(json.dumps({'cwd': os.getcwd()}))",
        "print('OK_NOTEBOOK_DONE', greeting * repeat, 'caf\\u00e9 \\u2713')",
    ),
    "raises": _notebook(
        'run_id = ""',
        "print('before the failure')",
        "raise ValueError('deliberate failure from raises.ipynb')",
        "print('never printed')",
    ),
    "sysexit1": _notebook('run_id = ""', "import sys\nsys.exit(1)"),
    "sysexit0": _notebook('run_id = ""', "import sys\nsys.exit(0)", "print('AFTER_EXIT_0')"),
    "deadkernel": _notebook('run_id = ""', "import os\nos._exit(9)", "print('never printed')"),
    "sleep": _notebook(
        'seconds = 300\nrun_id = ""\npid_file = "artifacts/sleep_pids.txt"',
        "import os\nimport pathlib\nimport subprocess\n\n"
        "child = subprocess.Popen(['sleep', str(seconds)])\n"
        "pathlib.Path(pid_file).parent.mkdir(parents=True, exist_ok=True)\n"
        "pathlib.Path(pid_file).write_text(f'{os.getpid()} {child.pid}\\n')\n"
        "print('SLEEP_STARTED', flush=True)",
        "import time\ntime.sleep(seconds)",
        "print('SLEEP_DONE')",
    ),
    "secret": _notebook(
        'secret_name = "VERSA_TEST_SECRET"\nrun_id = ""',
        "import os\n"
        "value = os.environ.get(secret_name, '')\n"
        "assert value, f'{secret_name} did not reach the job'\n"
        "print('SECRET_PRESENT length', len(value))\n"
        "print('OTHER_API_KEY', 'present' if 'OTHER_API_KEY' in os.environ else 'absent')",
    ),
}


def main() -> None:
    for name, nb in NOTEBOOKS.items():
        nbformat.write(nb, HERE / f"{name}.ipynb")


if __name__ == "__main__":
    main()
