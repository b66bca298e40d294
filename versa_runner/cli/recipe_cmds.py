"""The recipe verbs: `recipe resolve|run`, `playbook`, `demo` (and their parsers).

Each turns a recipe (or the shipped playbook recipe plus flags) into a plan
(`versa_runner.recipes.plan`) and submits it as ONE job of the `playbook` task through the same
path as `versa-run submit` (`commands.cmd_submit`), so it is detached, re-attachable, synced and
exits like any run. Parsing is additive to `cli.parser` (`add_recipe_verbs`).
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Any

from versa_runner.cli import commands
from versa_runner.cli.context import Context
from versa_runner.errors import MissingExtraError, UsageError
from versa_runner.recipes import dump_recipe, load_recipe
from versa_runner.recipes.demo import DEMO_RECIPE, demo_summary, prepare_demo_inputs
from versa_runner.recipes.plan import plan_for, step_names

REPO_RECIPES = Path(__file__).resolve().parents[2] / "recipes"
SEED_PLAYBOOK = REPO_RECIPES / "playbook-20b_eaftreap075_kaggle.yaml"
DEMO_OUTPUT_DIR = "versa_demo"  # `versa-run demo` without --output-dir writes here

EXAMPLES: dict[str | None, str] = {
    "recipe": """examples:
  versa-run recipe resolve recipes/eval-20b_eaftreap075_bigblocks_keep24_uniform.yaml
  versa-run recipe run recipes/reap-recipe_20b_eaftreap_keepfrac075_keep24_uniform.yaml --url-file url.txt
  versa-run recipe run recipes/tiny/eval-tiny_base_vs_base_noise.yaml --no-detach""",
    "playbook": """examples:
  versa-run playbook --url-file url.txt          # the seed playbook on Kaggle, as one job
  versa-run playbook recipes/tiny/playbook-tiny_demo.yaml --no-detach
  versa-run logs last --follow                   # re-attach after the laptop slept""",
    "demo": """examples:
  versa-run demo                       # tiny model, generated packs, this machine; into ./versa_demo
  versa-run demo --output-dir /tmp/demo""",
}

__all__ = ["EXAMPLES", "add_recipe_verbs", "cmd_demo", "cmd_playbook", "cmd_recipe"]


def _submit_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--no-detach",
        action="store_true",
        help="stream the log, wait, sync, exit with the job's code",
    )
    sub.add_argument(
        "--secret",
        action="append",
        default=[],
        metavar="NAME",
        help="forward env var NAME as a secret",
    )
    sub.add_argument(
        "--with-checkpoints",
        action="store_true",
        help="with --no-detach, also bring the pruned checkpoints back (many GB on the 20b)",
    )
    sub.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="non-secret job env var"
    )
    sub.add_argument(
        "--profile",
        default="auto",
        choices=("auto", "none", "kaggle"),
        help="bootstrap profile of a remote target",
    )
    sub.add_argument(
        "--show-plan", action="store_true", help="print the steps and exit (nothing runs)"
    )


def add_recipe_verbs(verb: Any) -> None:
    """Add `recipe`, `playbook` and `demo` to the verb parsers (`verb(name, text)` of cli.parser)."""
    recipe = verb("recipe", "resolve or run a recipe (reap_recipe, eval_recipe, playbook)")
    recipe.add_argument(
        "action", choices=("resolve", "run"), help="resolve: print the merged recipe; run: run it"
    )
    recipe.add_argument("file", help="recipe YAML")
    recipe.add_argument(
        "--model-path",
        default=None,
        help="reap_recipe: base checkpoint on the target (overrides the recipe)",
    )
    recipe.add_argument(
        "--overwrite", action="store_true",
        help="reap_recipe: replace an existing checkpoint of the same variant (a rebuild)",
    )  # fmt: skip
    _submit_options(recipe)
    playbook = verb(
        "playbook", "the seed playbook as one job: validate, build, parity, gate, decode"
    )
    playbook.add_argument(
        "file", nargs="?", default=None, help=f"playbook recipe (default {SEED_PLAYBOOK.name})"
    )
    playbook.add_argument("--model-path", default=None, help="base checkpoint on the target")
    playbook.add_argument("--model-id", default=None, help="label of the base model")
    playbook.add_argument(
        "--calib-packs-repo", default=None, help="HF dataset repo of calibration packs"
    )
    playbook.add_argument("--calib-pack-files", default=None, help="comma-separated pack files")
    _submit_options(playbook)
    demo = verb(
        "demo", "the playbook on this machine with the trained tiny model and generated packs"
    )
    demo.add_argument(
        "--show-plan", action="store_true", help="print the steps and exit (nothing runs)"
    )


def _submit_plan(ctx: Context, plan: dict[str, Any]) -> int:
    """Submit `plan` as one `playbook` job, exactly as `versa-run submit --task playbook`."""
    a = ctx.args
    if getattr(a, "show_plan", False):
        ctx.out.text(json.dumps(plan, indent=2))
        return 0
    ctx.out.info(f"plan {plan['name']}: {len(plan['steps'])} steps: {', '.join(step_names(plan))}")
    a.help, a.task, a.notebook, a.param = False, "playbook", None, []
    a.kernel_name, a.execution_timeout = "python3", None
    defaults: tuple[tuple[str, object], ...] = (
        ("secret", []), ("env", []), ("profile", "auto"), ("no_detach", False),
        ("with_checkpoints", False),
    )  # fmt: skip
    for name, default in defaults:
        if not hasattr(a, name):
            setattr(a, name, default)
    a.env = [*a.env, *(f"{k}={v}" for k, v in plan.get("env", {}).items())]  # non-secret
    a.extra = ["--plan", json.dumps(plan, separators=(",", ":"))]
    return commands.cmd_submit(ctx)


def cmd_recipe(ctx: Context) -> int:
    """`recipe resolve FILE` prints the merged recipe; `recipe run FILE` runs it as one job."""
    a = ctx.args
    path = Path(a.file)
    recipe = load_recipe(path)
    if a.action == "resolve":
        ctx.out.text(dump_recipe(recipe).rstrip("\n"))
        return 0
    plan = plan_for(recipe, path=path.resolve(), model_path=a.model_path, overwrite=a.overwrite)
    return _submit_plan(ctx, plan)


def cmd_playbook(ctx: Context) -> int:
    """The playbook recipe (default: the seed's) with the flags' overrides, as one job."""
    a = ctx.args
    path = Path(a.file) if a.file else SEED_PLAYBOOK
    recipe = load_recipe(path)
    if recipe.get("kind") != "playbook":
        raise UsageError(f"versa-run playbook {path}: kind is {recipe.get('kind')!r}, not playbook",
                         hint="`versa-run recipe run FILE` runs other kinds.")  # fmt: skip
    model = dict(recipe.get("model") or {})
    model.update({k: v for k, v in (("model_path", a.model_path), ("model_id", a.model_id)) if v})
    packs = dict(recipe.get("calib_packs") or {})
    if a.calib_packs_repo:
        packs["dataset_repo"] = a.calib_packs_repo
    if a.calib_pack_files:
        packs["pack_files"] = [f.strip() for f in a.calib_pack_files.split(",") if f.strip()]
    recipe = {**recipe, "model": model, "calib_packs": packs, "status": "ready"}
    return _submit_plan(ctx, plan_for(recipe, path=path.resolve()))


def cmd_demo(ctx: Context) -> int:
    """Tiny model + generated packs in --output-dir, the demo playbook locally, then the story."""
    a = ctx.args
    if getattr(a, "url", None) or getattr(a, "url_file", None) or getattr(a, "ssh", None):
        raise UsageError("versa-run demo runs on this machine; it takes no --url/--url-file/--ssh",
                         hint="`versa-run playbook recipes/tiny/playbook-tiny_demo.yaml --url-file F` "
                         "runs the same plan on a remote target.")  # fmt: skip
    if not getattr(a, "output_dir", None):  # its own folder, not the current one
        a.output_dir = DEMO_OUTPUT_DIR
        ctx.output_dir = Path(DEMO_OUTPUT_DIR).resolve()
        ctx.out.command_options = ctx._repeat_options()  # follow-up commands name it
    recipe = load_recipe(DEMO_RECIPE)
    plan = plan_for(recipe, path=DEMO_RECIPE)
    if a.show_plan:
        ctx.out.text(json.dumps(plan, indent=2))
        return 0
    started = time.monotonic()
    ctx.out.info(
        f"demo: writing the trained tiny model and calibration packs under {ctx.output_dir}"
    )
    try:
        prepare_demo_inputs(ctx.output_dir, log=io.StringIO())
    except ModuleNotFoundError as exc:
        raise MissingExtraError("versa-run demo", (exc.name or "torch").split(".")[0]) from exc
    a.no_detach = True
    try:
        return _submit_plan(ctx, plan)
    finally:  # the story is told on failure too: which step stopped and what was written
        ctx.out.text(demo_summary(ctx.output_dir, elapsed_s=time.monotonic() - started))
