"""YAML recipes (eaftreap_spec §9, seed 003): kinds and keys (`schema`), `extends` resolution
(`resolve`), and what running one means (`plan`: the steps of one playbook job; `run`: submit it).

`versa-run recipe resolve FILE` prints the merged recipe; `versa-run recipe run FILE` runs it.
"""

from __future__ import annotations

from versa_runner.recipes.resolve import collector_runs, dump_recipe, load_recipe, merge_recipes

__all__ = ["collector_runs", "dump_recipe", "load_recipe", "merge_recipes"]
