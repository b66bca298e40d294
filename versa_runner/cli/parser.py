"""The `versa-run` command line: global options, verbs in workflow order, each with Examples.

`versa-run --task T [flags]` is short for `versa-run submit --task T [flags]`
(`with_implicit_submit`). Parsing only: `cli.main` dispatches, `cli.commands` does the work.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn

from versa_runner import tasks
from versa_runner.errors import UsageError
from versa_runner.params import did_you_mean

VERBS = (
    "submit",
    "status",
    "logs",
    "wait",
    "sync",
    "kill",
    "list",
    "doctor",
    "fixtures",
    "summarize",
)
EXAMPLES = {
    None: """examples:
  versa-run --task validate_expert_math_toy              # detached; prints the run id
  versa-run --task validate_expert_math_toy --no-detach  # stream the log, exit with the job's code
  versa-run status                                      # newest run
  versa-run logs last --follow
  versa-run --task build_pruned_20b_eaftreap_budgeted --help""",
    "submit": """examples:
  versa-run submit --task validate_expert_math_toy --trials 5
  versa-run --task eaft_single --model-id openai/gpt-oss-20b --seq-lens-csv 1024,2048 --no-detach
  versa-run submit --notebook my.ipynb -p steps 10 --secret HF_TOKEN
  versa-run --task validate_expert_math_toy --ssh me@gpu-box --ssh-key ~/.ssh/id_ed25519 --no-detach
tasks: """
    + ", ".join(tasks.TASKS),
    "status": "examples:\n  versa-run status\n  versa-run status 20260101T0000 --json",
    "logs": "examples:\n  versa-run logs --tail 50\n  versa-run logs last --follow",
    "wait": "examples:\n  versa-run wait\n  versa-run wait RUN --timeout 3600",
    "sync": "examples:\n  versa-run sync                                   # the run's own outputs, no checkpoints\n"
    "  versa-run sync RUN --only reports,output.ipynb --dest ./pulled\n"
    "  versa-run sync RUN --include 'artifacts/*.json' --exclude '*.png'\n"
    "  versa-run sync RUN --with-checkpoints           # also the pruned *.safetensors\n"
    "  versa-run sync last --watch 10",
    "kill": "examples:\n  versa-run kill RUN\n  versa-run kill RUN --grace 5 --yes",
    "list": "examples:\n  versa-run list\n  versa-run list --json",
    "doctor": "examples:\n  versa-run doctor\n  versa-run doctor --url-file ~/.kaggle_url\n"
    "  versa-run doctor --ssh me@gpu-box:2222 --ssh-accept-new",
    "fixtures": "examples:\n  versa-run fixtures model /tmp/tiny-gptoss --layers 2 --experts 8 --top-k 4\n"
    "  versa-run fixtures model /tmp/tiny-trained --trained\n"
    "  versa-run fixtures packs /tmp/calib-packs --rows 128",
    "summarize": "examples:\n  versa-run summarize --left-json base.json --right-json pruned.json --out-md reports/parity.md\n"
    "  versa-run summarize --left-json A.json --right-json B.json --out-md S.md --gates-json my_gates.json\n"
    "exit status: 0 PASS, 1 FAIL (the levers to pull next are printed), 2 when the pair cannot be compared",
}
RUN_HELP = "run id, unique prefix of one, or `last`; omitted: the newest run in the journal"


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one-line UsageErrors (printed by `main` like every other);
    a misspelt verb gets a "did you mean"."""

    verb_parsers: dict[str, argparse.ArgumentParser]

    def error(self, message: str) -> NoReturn:
        choice = re.search(r"invalid choice: '([^']*)'", message)
        if choice:
            message += did_you_mean(choice.group(1), VERBS)
        raise UsageError(f"{self.prog}: {message}", hint=f"`{self.prog} --help` lists the options.")


def option_strings(parser: argparse.ArgumentParser) -> list[str]:
    """Every `--option` a parser accepts (for "did you mean")."""
    return [s for action in parser._actions for s in action.option_strings if s.startswith("--")]


# fmt: off
def _common_options() -> argparse.ArgumentParser:
    """Global options, accepted before or after the verb (absent unless given: SUPPRESS)."""
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    s = argparse.SUPPRESS
    common.add_argument("--output-dir", default=s, help="where artifacts/, reports/ and the journal live (default: .)")
    common.add_argument("--json", action="store_true", default=s, help="machine-readable output")
    common.add_argument("--debug", action="store_true", default=s, help="show tracebacks and debug logs")
    common.add_argument("--url", default=s, help="Jupyter server URL (prefer --url-file: argv is visible)")
    common.add_argument("--url-file", default=s, help="file holding the Jupyter server URL")
    common.add_argument("--token-file", default=s, help="file holding the Jupyter token")
    common.add_argument("--kernel-id", default=s, help="reuse this Jupyter kernel as launcher")
    common.add_argument("--ssh", default=s, metavar="USER@HOST[:PORT]", help="run on this SSH host (paramiko)")
    common.add_argument("--ssh-key", default=s, metavar="FILE", help="private key for --ssh (passphrase: env VERSA_SSH_PASSPHRASE)")
    common.add_argument("--ssh-port", type=int, default=s, metavar="N", help="SSH port (default 22)")
    common.add_argument("--ssh-python", default=s, metavar="PATH", help="Python on the SSH host (default python3)")
    common.add_argument("--ssh-accept-new", action="store_true", default=s,
                        help="add an unknown SSH host key to ~/.ssh/known_hosts (otherwise refused)")
    common.add_argument("--remote-root", default=s, metavar="DIR", help="target root on the SSH host (default ~/versa_work)")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: global options, verbs in workflow order, each with Examples."""
    common = _common_options()
    fmt = argparse.RawDescriptionHelpFormatter
    parser = _Parser(
        prog="versa-run", parents=[common], allow_abbrev=False, formatter_class=fmt,
        description="Run gpt-oss pruning/evaluation notebooks on this machine, a Jupyter server or an SSH host.",
        epilog=EXAMPLES[None],
    )
    verbs = parser.add_subparsers(dest="verb", metavar="VERB")

    def verb(name: str, text: str, **kw: Any) -> argparse.ArgumentParser:
        return verbs.add_parser(name, help=text, description=text, parents=[common], allow_abbrev=False,
                                formatter_class=fmt, epilog=EXAMPLES[name], **kw)

    submit = verb("submit", "submit a task (or a notebook) and detach", add_help=False)
    submit.add_argument("-h", "--help", action="store_true", help="this help, or a task's flags with --task")
    submit.add_argument("--task", help="registered task name")
    submit.add_argument("--notebook", help="run this notebook instead of a task")
    submit.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"),
                        help="notebook parameter (with --notebook; VALUE parsed as YAML)")
    submit.add_argument("--secret", action="append", default=[], metavar="NAME",
                        help="forward env var NAME to the job as a secret (value never in argv)")
    submit.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="non-secret job env var")
    submit.add_argument("--no-detach", action="store_true", help="stream the log, wait, sync, exit with the job's code")
    submit.add_argument("--kernel-name", default="python3", help="Jupyter kernel for papermill")
    submit.add_argument("--profile", default="auto", choices=("auto", "none", "kaggle"),
                        help="bootstrap profile of a remote target (auto: kaggle when the root is /kaggle/working)")
    submit.add_argument("--execution-timeout", type=float, default=None, metavar="S", help="per-cell timeout")
    submit.add_argument("--with-checkpoints", action="store_true",
                        help="with --no-detach: bring checkpoint shards (*.safetensors) back too")
    submit.set_defaults(help_text=submit.format_help)

    for name, text in (("status", "show a run's state and progress"), ("logs", "show a run's log"),
                       ("wait", "wait until a run ends; exit with its outcome"),
                       ("sync", "bring the run's own outputs and executed notebook back"),
                       ("kill", "end a run's whole process group")):
        sub = verb(name, text)
        sub.add_argument("run", nargs="?", default=None, metavar="RUN", help=RUN_HELP)
        if name == "logs":
            sub.add_argument("--follow", action=argparse.BooleanOptionalAction, default=False,
                             help="keep printing until the run ends (Ctrl-C stops following, not the job)")
            sub.add_argument("--tail", type=int, default=None, metavar="N", help="only the last N lines")
        if name == "wait":
            sub.add_argument("--timeout", type=float, default=None, metavar="S", help="give up after S seconds (exit 124)")
        if name == "sync":
            sub.add_argument("--only", default="", help="comma list of artifacts,reports,output.ipynb,run.log")
            sub.add_argument("--dest", default=None, help="destination directory (default: --output-dir)")
            sub.add_argument("--with-checkpoints", action="store_true",
                             help="also bring checkpoint shards (*.safetensors, many GB) back")
            sub.add_argument("--include", action="append", default=[], metavar="GLOB",
                             help="only paths matching GLOB (root-relative, `*` crosses /; repeatable)")
            sub.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                             help="skip paths matching GLOB (repeatable)")
            sub.add_argument("--watch", type=float, default=None, metavar="MIN",
                             help="sync again every MIN minutes until the run ends (a session that dies keeps what was synced)")
        if name == "kill":
            sub.add_argument("--grace", type=float, default=30.0, metavar="S", help="seconds between SIGTERM and SIGKILL")
            sub.add_argument("-y", "--yes", action="store_true", help="do not ask for confirmation")
    verb("list", "list runs in the journal, newest first: state, duration, target")
    verb("doctor", "check the target: python, papermill, disk, GPUs")
    fixtures = verb("fixtures", "write a tiny gpt-oss model or calibration packs", add_help=False)
    fixtures.add_argument("args", nargs=argparse.REMAINDER, help="model DIR [flags] | packs DIR [flags]")
    summarize = verb("summarize", "compare a base and a pruned eaft_single JSON and apply the gate")
    summarize.add_argument("--left-json", required=True, metavar="FILE", help="baseline (base model) collector JSON")
    summarize.add_argument("--right-json", required=True, metavar="FILE", help="candidate (pruned model) collector JSON")
    summarize.add_argument("--out-md", required=True, metavar="FILE", help="markdown report to write (plots beside it)")
    summarize.add_argument("--gates-json", default=None, metavar="FILE",
                           help="gates file (default: near_lossless_gates.json shipped with versa_runner.parity)")
    parser.verb_parsers = dict(verbs.choices)
    return parser
# fmt: on


GLOBAL_VALUE_OPTIONS = (
    "--output-dir",
    "--url",
    "--url-file",
    "--token-file",
    "--kernel-id",
    "--ssh",
    "--ssh-key",
    "--ssh-port",
    "--ssh-python",
    "--remote-root",
)


def with_implicit_submit(argv: list[str]) -> list[str]:
    """`versa-run --task T ...` means `versa-run submit --task T ...`.

    The verb is the first bare word that is not a global option's value, so a task flag whose
    value happens to be a verb (`--name status`) is not mistaken for one.
    """
    index = 0
    while index < len(argv):
        token = argv[index]
        if token in GLOBAL_VALUE_OPTIONS:
            index += 2
            continue
        if not token.startswith("-"):
            has_task = any(t == "--task" or t.startswith("--task=") for t in argv)
            return ["submit", *argv] if token not in VERBS and has_task else argv
        if token == "--task" or token.startswith("--task="):
            return ["submit", *argv]
        index += 1
    return argv
