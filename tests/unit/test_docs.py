"""The docs site: it builds with --strict, its generated pages are what their scripts
render now (the benchmark tables from bench/results, the option tables from the CLI),
and the configuration reference lists exactly the options each command declares."""

import os
import re
import subprocess
import sys
from pathlib import Path

import click
import pytest

from imgcls.cli import cli

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import docs_tables  # noqa: E402  (bench/docs_tables.py)


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


def test_site_builds_strict(tmp_path):
    """A broken link or anchor, a page missing from the nav, or a docstring the API
    reference cannot read is a warning, and --strict makes it an error."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0 and "WARNING" not in proc.stderr, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("create_model") > 0
    # The README is outside the site: its links into docs/ are checked against the built pages.
    links = re.findall(r"\]\((docs/[^)#]*)(?:#([^)]*))?\)", (ROOT / "README.md").read_text())
    assert links
    for page, anchor in links:
        assert (ROOT / page).is_file(), page
        built = tmp_path / "site" / ("index.html" if page == "docs/index.md" else f"{Path(page).stem}/index.html")
        assert not anchor or f'id="{anchor}"' in built.read_text(), f"README links to {page}#{anchor}, which has no such anchor"


def test_benchmark_pages_are_what_the_results_render():
    proc = run_script("bench/docs_tables.py", "--check")
    assert proc.returncode == 0, proc.stderr


def test_configuration_reference_is_what_the_cli_renders():
    proc = run_script("scripts/docs_cli.py", "--check")
    assert proc.returncode == 0, proc.stderr


def documented_options(page: str) -> dict[str, set[str]]:
    """Command name ('' for the group) -> the flags and arguments its table lists."""
    found: dict[str, set[str]] = {}
    command = None
    for line in page.splitlines():
        m = re.match(r"## `imgcls ?([a-z-]*)`", line)
        if m:
            command = m.group(1)
            found[command] = set()
        elif command is not None and line.startswith("| `"):
            first = line.split(" | ")[0]
            found[command] |= set(re.findall(r"`([^`]+)`", first))
    return found


def declared_options(command: click.Command) -> set[str]:
    names = set()
    for param in command.params:
        if isinstance(param, click.Argument):
            names.add(param.human_readable_name)
        else:
            names |= {*param.opts, *param.secondary_opts}
    return names


def test_configuration_reference_lists_exactly_the_declared_options():
    documented = documented_options((ROOT / "docs" / "configuration.md").read_text())
    declared = {"": declared_options(cli), **{name: declared_options(c) for name, c in cli.commands.items()}}
    assert set(documented) == set(declared), sorted(set(documented) ^ set(declared))
    for name, options in declared.items():
        assert documented[name] == options, (f"imgcls {name}: not documented {sorted(options - documented[name])}, "
                                             f"documented but not declared {sorted(documented[name] - options)}")


def test_documented_options_parser_reads_flags_and_arguments():
    page = ("## `imgcls train` {#train}\n\n| option | takes |\n|---|---|\n| `--amp` / `--no-amp` | flag |\n"
            "| `--lr` | float |\n## `imgcls fetch-data` {#fetch-data}\n| `NAME` (argument) | text |\n")
    assert documented_options(page) == {"train": {"--amp", "--no-amp", "--lr"}, "fetch-data": {"NAME"}}


def test_every_target_names_a_ratio_some_result_records():
    ratios = {name for data in docs_tables.load_results().values() for name in data.get("ratios", {})}
    assert set(docs_tables.TARGETS) <= ratios, sorted(set(docs_tables.TARGETS) - ratios)


def test_ratio_rows_say_met_or_not_per_value_against_the_target():
    rows = docs_tables.ratio_rows({"serve_saturation_vs_in_process": 0.62, "failed_requests_during_update": 0,
                                   "empty_map_rate": {"resnet18": 0.0, "small_cnn": 0.1}, "untargeted": 2.5})
    assert [r[3] for r in rows] == ["**not met**", "**met**", "**met**", "**not met**", ""]
    assert rows[0][2] == ">= 0.7" and rows[2][0] == "`empty_map_rate` (resnet18)" and rows[4][2] == ""


def test_machine_and_date_are_what_the_file_records_or_not_recorded():
    assert docs_tables.date({"machine": {"cpus": 2}}) == "not recorded"
    assert docs_tables.date({"when": "2026-11-29"}) == "2026-11-29"
    assert docs_tables.date({"part_runs": {"a": {"date": "2026-12-04"}, "b": {}}}) == \
        "2026-12-04 (parts a); not recorded (parts b)"
    assert docs_tables.date({"case_runs": {"flat": {"date": "2026-12-04"}, "files": {"machine": {}}}}) == \
        "2026-12-04 (cases flat); not recorded (cases files)"
    assert docs_tables.machine({}) == "not recorded"
    assert docs_tables.machine({"machine": {"cpus": 2, "native_bf16": True}}) == "2 CPU cores, native bf16"


def test_splice_replaces_only_between_the_markers():
    name = docs_tables.NAME
    text = f"before\n<!-- BEGIN generated by {name}: do not edit -->\nold\n<!-- END generated by {name} -->\nafter\n"
    assert docs_tables.splice(text, "new\n") == text.replace("old\n", "new\n")
    with pytest.raises(SystemExit):
        docs_tables.splice("no markers", "new\n")
