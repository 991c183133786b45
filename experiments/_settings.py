"""What an experiment's runs file was made with: a `<file>.settings.json` beside it, so that runs made under other
settings are neither resumed into it nor tabulated together with it."""
from __future__ import annotations

import json
from pathlib import Path


def settings_path(runs_csv: Path) -> Path:
    return runs_csv.with_name(runs_csv.name + ".settings.json")


def read_settings(runs_csv: Path) -> dict | None:
    path = settings_path(runs_csv)
    return json.loads(path.read_text()) if path.exists() else None


def settings_line(runs_csv: Path) -> str:
    """What the runs of a file were made with, as its settings file says (files made before it say nothing)."""
    saved = read_settings(runs_csv)
    if saved is None:
        return f"settings of {runs_csv.name}: not recorded (made before runs files kept them)"
    return f"settings of {runs_csv.name}: " + ", ".join(f"{k} {saved[k]}" for k in sorted(saved))


def check_settings(runs_csv: Path, settings: dict) -> None:
    """Keeps `settings` beside a new runs file; refuses to add to an existing one made with other settings (or
    whose settings are not known)."""
    path = settings_path(runs_csv)
    if not runs_csv.exists():
        path.write_text(json.dumps(settings, indent=1, sort_keys=True))
        return
    saved = read_settings(runs_csv)
    if saved is None:
        raise SystemExit(f"{runs_csv} has runs but no {path.name}: the settings they were made with are unknown; "
                         "start a new --runs-csv (or read it with --tables-from)")
    differ = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
    if differ:
        raise SystemExit(f"{runs_csv} holds runs made with other settings: "
                         + "; ".join(f"{k}: the file's {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
                         + "; start a new --runs-csv")


def check_same_settings(runs_csvs: list[Path], ignore: tuple[str, ...] = ()) -> None:
    """Several runs files tabulated together must have been made with the same settings (but for the keys in
    `ignore`, such as the output folder): a file of other or unknown settings is refused by name."""
    if len(runs_csvs) < 2:
        return
    saved = {path: read_settings(path) for path in runs_csvs}
    unknown = [str(path) for path, s in saved.items() if s is None]
    if unknown:
        raise SystemExit(f"{', '.join(unknown)}: no settings file beside it, so its runs cannot be told to be made "
                         "like the others'; tabulate it alone")
    first, *rest = runs_csvs
    base = {k: v for k, v in saved[first].items() if k not in ignore}
    for path in rest:
        other = {k: v for k, v in saved[path].items() if k not in ignore}
        differ = sorted(k for k in base.keys() | other.keys() if base.get(k) != other.get(k))
        if differ:
            raise SystemExit(f"{first} and {path} hold runs made with other settings ("
                             + "; ".join(f"{k}: {base.get(k)!r} against {other.get(k)!r}" for k in differ)
                             + "): their runs are not tabulated together")
