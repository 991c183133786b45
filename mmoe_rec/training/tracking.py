"""MLflow tracking: where runs go, a fail-fast reachability check, and what every run records.

Store: `tracking_uri` argument, else $MLFLOW_TRACKING_URI, else `sqlite:///mlflow.db` in the working directory
(MLflow >= 3.13 no longer accepts the old file store as an implicit default, so the SQLite URI is explicit).
Every fit run logs: flattened hyper-parameters (the FeatureSpec itself as `spec.json`, not as params), the
resolved LightningCLI config as `config.yaml` (Lightning's SaveConfigCallback cannot write into an SQLite-backed
run, so the CLI hands the YAML to `log_run_files`), the git commit as the tag `mlflow.source.git.commit` (and
`mmoe_rec.git_dirty`: whether tracked files were modified), the data folder as the tag `mmoe_rec.data_dir` and
its `manifest.json` as `data/manifest.json`, and the installed version as `mmoe_rec.version` (the commit only
where the package runs from a checkout of its own, or was pip-installed from git). validate / test / predict runs
log the same.

A SQLite store is opened and its write lock taken once before anything else, so a folder or file that cannot be
written is an error at once (MLflow itself retries for about 2 minutes, then fails with a message that does not
say why). Then MLflow sets it up (its schema migrations, on a new file) while the process holds an flock on
`.<file name>.lock` beside it: MLflow does not serialise that setup, and jobs started together on a new store
failed (`table _alembic_tmp_experiments already exists`) or left it half migrated for good. A store MLflow cannot
open is one line that names the file and what to do.

An HTTP(S) store is probed with a real request (GET <uri>/health, PROBE_TIMEOUT_S) before anything else: a server
that accepts connections but never answers is reported as unreachable, not waited on. For such a store the
process also gets shorter MLflow HTTP limits where the user set none (MLFLOW_HTTP_REQUEST_TIMEOUT=30 s,
MLFLOW_HTTP_REQUEST_MAX_RETRIES=3, see HTTP_DEFAULTS), so a server that goes silent mid-run fails a call after
about 2 minutes instead of MLflow's default of about 15 (120 s per read, 7 retries). Set either variable to
keep MLflow's own value.

A database store (postgresql, mysql, mariadb, mssql; any driver) is probed the same way before anything else: a
connection to its host and port, and, but for mssql, the server's first byte within PROBE_TIMEOUT_S.
"""
from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import hashlib
import http.client
import importlib.metadata
import json
import os
import re
import socket
import sqlite3
import ssl
import subprocess
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import mlflow
from lightning.fabric.utilities.logger import _convert_params
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
PROBE_TIMEOUT_S = 5.0
# MLflow's HTTP client limits used for an HTTP(S) store when the environment sets none (see the module docstring)
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}
try:  # MLflow's own limit on a param's value (6000 characters in MLflow 2 and 3)
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH as MAX_PARAM_CHARS
except ImportError:  # pragma: no cover - a release without it
    MAX_PARAM_CHARS = 6000


class TrackingUnavailable(RuntimeError):
    """The tracking store cannot be reached: raised before training starts, never a hang."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI to use; a relative SQLite path is made absolute against the current directory, because MLflow
    caches one store per URI string: a later chdir would otherwise keep writing to the first directory's file."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path, query = _sqlite_path(uri)
        if path and path != ":memory:":
            uri = "sqlite:///" + str(Path(path).expanduser().resolve()) + query
    return uri


def _sqlite_path(uri: str) -> tuple[str, str]:
    """(the database file's path, the query string with its '?', or "") of a sqlite:/// URI: SQLAlchemy reads
    `?timeout=30` as an option, not as part of the file name."""
    path, sep, query = uri[len("sqlite:///"):].partition("?")
    return path, sep + query


def redacted(uri: str) -> str:
    """`uri` without a password it may carry (messages go to logs)."""
    parts = urlparse(uri)
    if parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username}:***@{host}").geturl()


FIT_URI_SETTING = "trainer.logger.init_args.tracking_uri"


def check_tracking_uri(uri: str, timeout: float = PROBE_TIMEOUT_S, setting: str = FIT_URI_SETTING) -> None:
    """Raise TrackingUnavailable quickly if `uri` cannot work (server down, SQLite folder missing); the message
    says to set MLFLOW_TRACKING_URI or `setting` (the caller's own option: `--tracking-uri` for score, register)."""
    parsed = urlparse(uri)
    hint = f"set MLFLOW_TRACKING_URI (or {setting}) to a reachable store, e.g. sqlite:///mlflow.db"
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow's names for a Databricks workspace (no scheme)
        return
    scheme = parsed.scheme.partition("+")[0]
    sqlite_slash_short = scheme == "sqlite" and not uri.startswith("sqlite:///")
    if sqlite_slash_short or scheme not in (*_store_schemes(), *DATABASE_PORTS):
        # refused before anything is made: MLflow's own error is a paragraph naming neither setting (localhost:5000,
        # http:// forgotten), and a sqlite URI a slash short lost its first letters (sqlite://mlflow.db: lflow.db)
        given = (f"MLFLOW_TRACKING_URI={redacted(uri)}" if os.environ.get("MLFLOW_TRACKING_URI") == uri
                 else f"{setting} {redacted(uri)}")
        if scheme == "sqlite":
            why = "a SQLite store is sqlite:/// and the file's path: sqlite:///mlflow.db, sqlite:////abs/path.db"
        elif scheme in ("", "file") and _file_store_allowed():
            return  # the user opted into MLflow's file store
        elif scheme in ("", "file"):
            why = (f"a folder path is MLflow's file store, which MLflow {mlflow.__version__} refuses; a SQLite file "
                   "is sqlite:///mlflow.db")
        else:
            why = f"{parsed.scheme}: is no store MLflow takes (a tracking server is http://host:port)"
        raise TrackingUnavailable(f"{given}: {why}; supported: sqlite:///relative.db, sqlite:////absolute.db, "
                                  "http(s)://host:port, postgresql://, mysql://, mariadb://, mssql://, databricks")
    if parsed.scheme in ("http", "https"):
        probe_http_server(uri, timeout, hint)
    elif scheme in DATABASE_PORTS:
        probe_database_server(uri, timeout, hint)
    elif parsed.scheme == "sqlite":
        path = _sqlite_path(uri)[0]
        if path and path != ":memory:":
            folder = Path(path).expanduser().resolve().parent
            if not folder.is_dir():
                raise TrackingUnavailable(f"MLflow SQLite store {uri}: folder {folder} does not exist; {hint}")
            probe_sqlite_store(Path(path).expanduser().resolve(), uri, hint)


def probe_sqlite_store(db: Path, uri: str, hint: str) -> None:
    """Open the SQLite file and take (then release) its write lock: a folder or file that cannot be written is
    reported now, not after MLflow's own connection retries (about 2 minutes, then an error that does not say
    why). A database another process is writing to is fine (busy, not broken). Creates the file if it is missing,
    as MLflow would."""
    try:  # SQLite writes a journal beside the file: an existing database in a folder that takes no file fails late
        with tempfile.TemporaryFile(dir=db.parent):
            pass
    except OSError as e:
        raise TrackingUnavailable(f"MLflow SQLite store {uri}: its folder {db.parent} cannot be written ({e}); "
                                  f"{hint}") from None
    try:
        con = sqlite3.connect(str(db), timeout=2.0)
        try:
            con.execute("begin immediate")
            con.rollback()
        finally:
            con.close()
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            return
        raise TrackingUnavailable(f"MLflow SQLite store {uri}: cannot write {db} ({e}); {hint}") from None
    except sqlite3.Error as e:
        raise TrackingUnavailable(f"MLflow SQLite store {uri}: {db} is not a usable SQLite database ({e}); "
                                  f"{hint}") from None


# the stores MLflow takes that check_tracking_uri lets through (probed or not), where MLflow's registry of store
# schemes cannot be read; a folder path (file store) only where MLflow's own opt-in is set
SUPPORTED_SCHEMES = ("sqlite", "http", "https", "databricks", "databricks-uc", "uc")


def _store_schemes() -> tuple[str, ...]:
    """The URI schemes MLflow has a tracking store for, a plugin's (an installed package's entry point) included."""
    try:
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        return tuple(s for s in _tracking_store_registry._registry if s not in ("", "file"))
    except (ImportError, AttributeError):  # a private registry: its layout may change
        return SUPPORTED_SCHEMES


def _file_store_allowed() -> bool:
    return os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").strip().lower() in ("true", "1")  # MLflow's opt-in


# SQLAlchemy stores MLflow takes (dialect, or dialect+driver): their default ports
DATABASE_PORTS = {"postgresql": 5432, "postgres": 5432, "mysql": 3306, "mariadb": 3306, "mssql": 1433}
POSTGRES_SSL_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")  # answered with one byte, S or N


def probe_database_server(uri: str, timeout: float = PROBE_TIMEOUT_S, hint: str = "") -> None:
    """Connect to a database store's host and port and wait for the server's first byte, without its driver:
    PostgreSQL answers an SSL request with one byte, a MySQL / MariaDB server greets first. Raise
    TrackingUnavailable if nobody listens, or if nothing comes within `timeout` seconds: MLflow retries a refused
    connection for about 100 s, and psycopg2 waits on a server that accepts but never answers with no limit at all.
    Left to MLflow: a store whose address is not plainly host and port: no host in the URI, a query that names
    one (`?host=/var/run/postgresql`, `?port=`, `?unix_socket=`, `?odbc_connect=`: SQLAlchemy's drivers read
    those over the URI's), MySQL on `localhost` without a port (mysqlclient takes that as its Unix socket), SQL
    Server without a port (pyodbc reads the host as a DSN name)."""
    parsed = urlparse(uri)
    dialect = parsed.scheme.partition("+")[0]
    try:
        host, given_port = parsed.hostname, parsed.port
    except ValueError as e:  # a port that is no number
        raise TrackingUnavailable(f"MLflow database store {redacted(uri)}: {e}; {hint}") from None
    query = {key.lower() for key in parse_qs(parsed.query)}
    if (not host or query & {"host", "hostaddr", "port", "unix_socket", "odbc_connect"}
            or (given_port is None and (dialect == "mssql" or (dialect in ("mysql", "mariadb")
                                                              and host == "localhost")))):
        return
    port = given_port or DATABASE_PORTS[dialect]
    where = f"{host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            if dialect in ("postgresql", "postgres"):
                conn.sendall(POSTGRES_SSL_REQUEST)
            if dialect != "mssql":  # TDS waits for the client's pre-login: the connection is all this checks
                if not conn.recv(1):
                    raise TrackingUnavailable(f"MLflow database store {redacted(uri)}: {where} closed the connection "
                                              f"without a word (not a {dialect} server?); {hint}")
    except (socket.timeout, TimeoutError):
        why = f"no answer from {where} within {timeout:g} s"
    except OSError as e:  # refused, unknown host, unreachable network
        why = f"{where}: {type(e).__name__}: {e}"
    else:
        return
    raise TrackingUnavailable(f"MLflow database store {redacted(uri)} is unreachable ({why}; probed with a "
                              f"{timeout:g} s timeout); {hint}".rstrip("; "))


def probe_http_server(uri: str, timeout: float = PROBE_TIMEOUT_S, hint: str = "") -> None:
    """GET <uri>/health; raise TrackingUnavailable unless some HTTP answer arrives within `timeout` seconds.

    Any answer counts, whatever its status (an MLflow server says 200 'OK'; a 401/404 behind a proxy is still a
    server, and MLflow's own calls then report what is wrong): only "nobody answers" is this check's business.
    A TLS error also means a server answered; certificates are left to MLflow, which has its own settings for them.
    """
    parts = urlparse(uri.rstrip("/") + "/health")
    headers = {}
    if parts.username is not None:  # urllib takes no user:password@ in a URL (MLflow's requests does): a header
        login = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(login).decode()
        parts = parts._replace(netloc=parts.netloc.rpartition("@")[2])
    url = parts.geturl()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers, method="GET"), timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # an HTTP status line came back: a server is there
    except (ssl.SSLError, ssl.CertificateError):
        return
    except urllib.error.URLError as e:
        reason = e.reason
        if isinstance(reason, (ssl.SSLError, ssl.CertificateError)):
            return
        if isinstance(reason, (socket.timeout, TimeoutError)):
            why = f"no HTTP answer from {url} within {timeout:g} s"
        else:
            why = f"{type(reason).__name__}: {reason}" if isinstance(reason, BaseException) else str(reason)
    except (socket.timeout, TimeoutError):
        why = f"no HTTP answer from {url} within {timeout:g} s"
    except (OSError, ValueError, http.client.HTTPException) as e:  # closed without a reply, not HTTP, bad URL
        why = f"{type(e).__name__}: {e}"
    raise TrackingUnavailable(
        f"MLflow tracking server {redacted(uri)} is unreachable ({why}; probed with a {timeout:g} s timeout); "
        f"{hint}".rstrip("; ")
    )


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for another store, or an in-memory one)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = _sqlite_path(uri)[0]
    return Path(path).expanduser().resolve() if path and path != ":memory:" else None


@contextlib.contextmanager
def sqlite_setup_lock(uri: str):
    """Hold an exclusive flock on `.<file name>.lock` beside a SQLite store (nothing for another store): its
    creation and MLflow's first setup of it (schema migrations) are one process at a time. The kernel drops the
    lock of a process that dies. A folder where the lock file cannot be made is left to check_tracking_uri."""
    db = _sqlite_file(uri)
    fd = None
    if db is not None:
        lock = db.parent / f".{db.name}.lock"
        with contextlib.suppress(OSError):
            try:
                fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:  # made by another user of a shared folder: flock needs no write access
                fd = os.open(lock, os.O_RDONLY)
    if fd is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # NFS emulates flock with a write lock, which a read-only descriptor cannot take
            os.close(fd)
            fd = None
    try:
        yield
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock


def _first_line(e: BaseException) -> str:
    """An error's first line (SQLAlchemy's add the statement, its parameters and a link: ten lines and more)."""
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]


def open_sqlite_store(uri: str) -> None:
    """Have MLflow open (on a new file: set up) the SQLite store, as a client of it does; MLflow keeps the store
    for the process. A store it cannot open (made by an older MLflow, or half migrated by a setup cut short) is a
    TrackingUnavailable of one line, not SQLAlchemy's dump of the failed statement."""
    db = _sqlite_file(uri)
    try:
        mlflow.MlflowClient(tracking_uri=uri)
    except Exception as e:  # noqa: BLE001 - whatever MLflow or SQLAlchemy raise, one line that says what to do
        raise TrackingUnavailable(
            f"MLflow SQLite store {db} cannot be opened ({type(e).__name__}: {_first_line(e)}). A store an older "
            f"MLflow made: back it up, then run `mlflow db upgrade {uri}`; a store whose first setup was cut short: "
            f"move it aside (mv {db} {db}.broken) and run again to start a new one") from None


def configure_tracking(uri: str | None = None, setting: str = FIT_URI_SETTING) -> str:
    """Resolve, check and install the tracking URI for this process; returns it (`setting`: check_tracking_uri).

    For an HTTP(S) store, MLflow's HTTP timeout and retry count get this project's shorter defaults
    (HTTP_DEFAULTS) unless the environment already sets them. A SQLite store is made and set up by MLflow here,
    under sqlite_setup_lock (fit, score and register all pass here before their first use of it).
    """
    uri = resolve_tracking_uri(uri)
    with sqlite_setup_lock(uri):
        check_tracking_uri(uri, setting=setting)
        if urlparse(uri).scheme in ("http", "https"):
            for name, value in HTTP_DEFAULTS.items():
                os.environ.setdefault(name, value)
        mlflow.set_tracking_uri(uri)
        if _sqlite_file(uri) is not None:
            open_sqlite_store(uri)
    return uri


def _git_dir(start: Path) -> Path | None:
    """The git directory of the checkout holding `start`: a `.git` folder, or the folder a `.git` file names
    ("gitdir: ..."), as in a worktree or a submodule."""
    for folder in [start, *start.parents]:
        git = folder / ".git"
        if git.is_dir():
            return git
        if git.is_file():
            text = git.read_text().strip()
            if text.startswith("gitdir: "):
                target = Path(text[len("gitdir: "):])
                return target if target.is_absolute() else (folder / target).resolve()
    return None


def git_commit(start: str | os.PathLike | None = None) -> str | None:
    """The checked-out commit, read from git's files (no git process): HEAD -> ref -> sha, packed-refs too; in a
    worktree HEAD is its own and the refs are the main repository's (its `commondir`)."""
    git = _git_dir(Path(start or Path(__file__).resolve().parent))
    if git is None or not (git / "HEAD").is_file():
        return None
    head = (git / "HEAD").read_text().strip()
    if not head.startswith("ref: "):
        return head
    ref = head[5:]
    common = git
    if (git / "commondir").is_file():
        common = (git / (git / "commondir").read_text().strip()).resolve()
    for base in dict.fromkeys([git, common]):
        if (base / ref).is_file():
            return (base / ref).read_text().strip()
    packed = common / "packed-refs"
    if packed.is_file():
        for line in packed.read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0]
    return None


DISTRIBUTION = "mmoe-rec"  # the name pip knows the package by
INSTALLED_PACKAGE_DIRS = ("site-packages", "dist-packages")


def _package_in_checkout() -> Path | None:
    """The folder of this package if a git checkout holds it as its own source (an editable install, a run from the
    source tree); None for an installed copy: a virtual environment inside another project's checkout put that
    project's commit on the run as the code that ran."""
    package = Path(__file__).resolve().parents[1]  # mmoe_rec/
    for folder in [package, *package.parents]:  # the checkout holding it, as _git_dir finds it
        if (folder / ".git").exists():
            inside = package.relative_to(folder).parts
            return None if any(part in INSTALLED_PACKAGE_DIRS for part in inside) else package
    return None


def _installed_commit() -> str | None:
    """The commit pip installed the package from (`pip install git+...`: its direct_url.json), if any."""
    try:
        text = importlib.metadata.distribution(DISTRIBUTION).read_text("direct_url.json")
        commit = (json.loads(text or "{}").get("vcs_info") or {}).get("commit_id")
    except (importlib.metadata.PackageNotFoundError, ValueError, AttributeError):
        return None
    return commit if isinstance(commit, str) and commit else None


def code_tags(with_dirty: bool = True) -> dict[str, str]:
    """What a run records of the mmoe_rec code that made it: `mmoe_rec.version` (the installed distribution's),
    the commit as `mlflow.source.git.commit` (of the checkout the package runs from, else of a `pip install
    git+...`) and, from a checkout and `with_dirty`, `mmoe_rec.git_dirty` (a `git status`). An installed copy run
    from another project's checkout is not tagged with that project's commit."""
    tags = {}
    try:
        tags["mmoe_rec.version"] = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, never installed
        pass
    checkout = _package_in_checkout()
    commit = git_commit(checkout) if checkout is not None else _installed_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    dirty = git_dirty(checkout) if checkout is not None and with_dirty else None
    if dirty is not None:
        tags["mmoe_rec.git_dirty"] = str(dirty).lower()
    if not tags:
        rank_zero_warn("this mmoe_rec is neither installed nor in a git checkout: the run records no version or "
                       "commit of the code that made it")
    return tags


def git_dirty(start: str | os.PathLike | None = None) -> bool | None:
    """Whether tracked files differ from the commit (`git status --porcelain --untracked-files=no`); None where
    there is no git, no checkout, or no answer within 10 s. A run from a modified tree must not claim its commit."""
    folder = Path(start or Path(__file__).resolve().parent)
    if _git_dir(folder) is None:
        return None
    try:
        done = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(done.stdout.strip()) if done.returncode == 0 else None


# What Lightning's MLFlowLogger keeps of a metric name (it deletes every other character, with a warning)
_METRIC_CHARS = re.compile(r"[A-Za-z0-9_/. -]+")
MAX_PARAM_KEY_CHARS = 250  # MLflow's limit on a param's name


def metric_name_part_problem(name: str) -> str | None:
    """Why `name` (a task name) cannot stand inside a metric name such as `val/<name>/auc` as MLflow logs it through
    Lightning, or None: Lightning deletes characters outside [A-Za-z0-9_/. -] (`ctr@7d` would log as `ctr7d`,
    `点击` as nothing: `train//loss`, which MLflow refuses mid-fit), and MLflow refuses a name its path
    normalisation changes (an empty, `.` or `..` part between slashes)."""
    if not _METRIC_CHARS.fullmatch(name):
        bad = sorted(set(_METRIC_CHARS.sub("", name)))
        return (f"characters {''.join(bad)!r} are not kept in MLflow metric names (letters A-Z a-z, digits, _ - . / "
                "space)")
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "an empty, '.' or '..' part between slashes makes MLflow refuse the metric name"
    return None


def _param_key(name: str) -> str:
    """`name` as MLflow takes a param key: characters it refuses (outside word characters and / . - space :) as
    '_', empty / '.' / '..' path parts dropped, a leading '..' prefixed with '_', at most MAX_PARAM_KEY_CHARS (a cut
    key ends with a hash of it)."""
    key = re.sub(r"[^\w/.\- :]", "_", name)
    key = "/".join(part for part in key.split("/") if part not in ("", ".", "..")) or "_"
    if key.startswith(".."):  # MLflow refuses a key that starts with '..' (`..a` as a path leaves the run)
        key = "_" + key
    if len(key) > MAX_PARAM_KEY_CHARS:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        key = f"{key[:MAX_PARAM_KEY_CHARS - 10]}-{digest}"
    return key


def flatten_params(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dicts -> `a/b/c` keys; a value longer than MLflow takes (MAX_PARAM_CHARS) is cut, with a warning
    (config.yaml holds it whole); a key MLflow would refuse (a character it does not take, an empty part, over
    MAX_PARAM_KEY_CHARS) is logged under a key it takes, with a warning (a refused key failed the run)."""
    flat = _flatten(params, prefix)
    out = {name: text for name, text in flat.items() if _param_key(name) == name}
    for name, text in flat.items():
        key = _param_key(name)
        if key == name:
            continue
        while key in out or key in flat:  # a name taken already: keep both
            key += "_"
        rank_zero_warn(f"param {name!r} is not a name MLflow takes: logged as {key!r}")
        out[key] = text
    return out


def _flatten(params: dict[str, Any], prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, argparse.Namespace):  # nested, as Lightning's own loggers flatten it
            value = vars(value)
        if isinstance(value, dict) and value:
            out.update(_flatten(value, name + "/"))
        else:
            text = json.dumps(value, default=str) if not isinstance(value, str) else value
            if len(text) > MAX_PARAM_CHARS:
                rank_zero_warn(f"param {name!r} is {len(text)} characters, more than MLflow takes: logged cut to "
                               f"{MAX_PARAM_CHARS} (config.yaml holds it whole)")
                text = text[: MAX_PARAM_CHARS - 3] + "..."
            out[name] = text
    return out


def resumed_params(flat: dict[str, str], logged: dict[str, str], resume: int) -> dict[str, str]:
    """The params to log into a run that already has `logged` ones (a fit resumed into its earlier run): new keys
    as they are, a key logged before with another value (MLflow refuses to change one) as `resume-<resume>/<key>`;
    keys logged before with the same value are left out."""
    out = {k: v for k, v in flat.items() if k not in logged}
    # (the prefix can take a key that fitted past MAX_PARAM_KEY_CHARS: cut again, with its hash)
    out.update({_param_key(f"resume-{resume}/{k}"): v for k, v in flat.items() if k in logged and logged[k] != v})
    return out


_RESUME_PARAM = re.compile(r"resume-(\d+)/")
_RESUME_CONFIG = re.compile(r"config\.resume-(\d+)\.yaml$")


def next_resume_index(client: Any, run_id: str) -> int:
    """One past the last resume recorded in a run, by its `resume-<n>/` params and `config.resume-<n>.yaml` files,
    so that a resume's params and config carry the same n (a resume that changes no param still logs its config)."""
    params = client.get_run(run_id).data.params
    files = [a.path for a in client.list_artifacts(run_id)]
    done = [int(m.group(1)) for m in map(_RESUME_PARAM.match, params) if m]
    done += [int(m.group(1)) for m in map(_RESUME_CONFIG.match, files) if m]
    return max(done, default=0) + 1


class MLflowTracker(MLFlowLogger):
    """Lightning's MLFlowLogger with this project's defaults: SQLite store, fail-fast check, flattened params.

    The check runs at construction, i.e. when LightningCLI instantiates the trainer, before any training.
    """

    def __init__(
        self,
        experiment_name: str = "mmoe-rec",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        tags: dict[str, Any] | None = None,
        artifact_location: str | None = None,
        log_model: bool = False,
        run_id: str | None = None,
    ) -> None:
        """run_id: log into this existing run (e.g. a fit resumed from a checkpoint continues its run)."""
        uri = configure_tracking(tracking_uri)
        tags = dict(tags or {})
        # the code that runs, as log_run_files records it again (a tag given for it gives way)
        tags.update(code_tags(with_dirty=False))
        try:
            super().__init__(
                experiment_name=experiment_name,
                run_name=run_name,
                tracking_uri=uri,
                tags=tags,
                artifact_location=artifact_location,
                log_model=log_model,
                run_id=run_id,
            )
        except Exception as e:  # one line that says which store, not a union-validation error from the CLI parser
            raise TrackingUnavailable(f"MLflow tracking store {redacted(uri)}: {type(e).__name__}: "
                                      f"{_first_line(e)}") from e
        self._resume_index: int | None = None

    def resume_index(self) -> int:
        """The n of this logger's `resume-<n>/` params and `config.resume-<n>.yaml`, read from the run before this
        logger first writes one of them and kept: the params logged in several calls of one fit share it."""
        if self._resume_index is None:
            self._resume_index = next_resume_index(self.experiment, self.run_id)
        return self._resume_index

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        params = _convert_params(params)  # a dict, an argparse.Namespace or None, as Lightning's loggers take
        # the spec is logged whole as spec.json; LightningCLI's private keys are not parameters
        params = {k: v for k, v in params.items() if k not in ("feature_spec", "_instantiator", "_class_path")}
        flat = flatten_params(params)
        client, run_id = self.experiment, self.run_id
        logged = client.get_run(run_id).data.params
        if logged:  # a run logged into again (trainer.logger.init_args.run_id): its params stay as they were
            flat = resumed_params(flat, logged, self.resume_index())
        items = list(flat.items())
        from mlflow.entities import Param

        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            client.log_batch(run_id, params=[Param(k, v) for k, v in items[i : i + 100]])

    @rank_zero_only
    def log_text(self, text: str, artifact_file: str) -> None:
        self.experiment.log_text(self.run_id, text, artifact_file)

    @rank_zero_only
    def log_file(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.experiment.log_artifact(self.run_id, str(path), artifact_path)


def log_run_files(logger: Any, config_yaml: str | None, spec_dict: dict[str, Any] | None,
                  data_dir: str | os.PathLike | None = None, command: str | None = None) -> None:
    """Resolved config and FeatureSpec into the run, the git commit and whether the tree was modified, the data:
    its absolute folder as a tag and its manifest.json (row counts, inputs, seed of the feature build) as
    `data/manifest.json`, and the `mmoe-rec` subcommand that made the run as the tag `mmoe_rec.command` (fit, test
    and predict runs of one config share a run name) (rank 0; no-op for a non-MLflow logger)."""
    if not isinstance(logger, MLFlowLogger):
        return
    if rank_zero_only.rank != 0:
        return
    client, run_id = logger.experiment, logger.run_id
    if command:
        client.set_tag(run_id, "mmoe_rec.command", command)
    if config_yaml:  # a run logged into again keeps the config.yaml that made it; the later one beside it
        name = "config.yaml"
        if any(a.path == name for a in client.list_artifacts(run_id)):
            n = logger.resume_index() if isinstance(logger, MLflowTracker) else next_resume_index(client, run_id)
            name = f"config.resume-{n}.yaml"
        client.log_text(run_id, config_yaml, name)
    if spec_dict:
        client.log_text(run_id, json.dumps(spec_dict, indent=2, sort_keys=True, default=str), "spec.json")
    for key, value in code_tags().items():
        client.set_tag(run_id, key, value)
    if data_dir is not None:
        folder = Path(data_dir).expanduser().resolve()
        client.set_tag(run_id, "mmoe_rec.data_dir", str(folder))
        if (folder / "manifest.json").is_file():
            client.log_artifact(run_id, str(folder / "manifest.json"), "data")


def log_json(logger: Any, obj: Any, artifact_file: str) -> None:
    """Log `obj` as a JSON artifact file (rank 0, MLflow loggers only)."""
    if not isinstance(logger, MLFlowLogger) or rank_zero_only.rank != 0:
        return
    logger.experiment.log_text(logger.run_id, json.dumps(obj, indent=1), artifact_file)


def log_png(logger: Any, fig, name: str, artifact_path: str = "plots") -> None:
    """Save a matplotlib figure and log it as `<artifact_path>/<name>.png` (rank 0, MLflow loggers only)."""
    if not isinstance(logger, MLFlowLogger) or rank_zero_only.rank != 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path)
