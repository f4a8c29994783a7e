"""External services for tests: a throwaway PostgreSQL cluster, the Dagster webserver, headless Chromium.

Used by tests/test_production_instance.py (``import services``: tests/ is on sys.path, as for the other
helper modules). Nothing here is a pytest fixture, so the helpers can also be driven by hand
(``cd tests && python -c "import services; ..."``) when a screenshot or the database needs a look.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REQUIRE_ENV = "BAGEL_REQUIRE_SERVICES"
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")


def services_required() -> bool:
    """CI sets BAGEL_REQUIRE_SERVICES=1: a missing service is then a failure, never a skip."""
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- PostgreSQL


def postgres_bin_dir() -> Path | None:
    """The directory with initdb/pg_ctl/postgres: Debian keeps them in /usr/lib/postgresql/<v>/bin."""
    found = [p for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p).parent.name.isdigit()]
    versioned = sorted(found, key=lambda p: int(Path(p).parent.name), reverse=True)  # newest first
    on_path = shutil.which("initdb")  # elsewhere (another distribution, a symlink in /usr/local/bin)
    for candidate in [*versioned, *([str(Path(on_path).resolve().parent)] if on_path else [])]:
        d = Path(candidate)
        if all((d / name).is_file() for name in ("initdb", "pg_ctl", "postgres")):
            return d
    return None


def postgres_unavailable_reason() -> str | None:
    """Why a cluster cannot be started here (None when it can)."""
    if postgres_bin_dir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found; run .ci/services"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to own the cluster (initdb refuses root)"
        if shutil.which("runuser") is None:
            return "running as root without runuser to drop to the 'postgres' user"
    return None


@dataclass
class PostgresServer:
    """A cluster in its own temporary directory on 127.0.0.1, with one database and one password user."""

    root: Path
    port: int
    bin_dir: Path
    username: str = "bagel"
    password: str = "bagel-test-pw"
    db_name: str = "dagster"
    host: str = "127.0.0.1"
    _as_postgres: bool = field(default=False, repr=False)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log_path(self) -> Path:
        return self.root / "postgres.log"

    def env(self) -> dict[str, str]:
        """The variables pipelines/dagster.postgres.yaml reads."""
        return {
            "DAGSTER_PG_USERNAME": self.username,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_DB": self.db_name,
            "DAGSTER_PG_PORT": str(self.port),
        }

    def connect(self, superuser: bool = False):
        """psycopg2 connection: as the password user over TCP, or as the superuser over the unix socket."""
        import psycopg2

        if superuser:
            return psycopg2.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres")
        return psycopg2.connect(
            host=self.host, port=self.port, user=self.username, password=self.password, dbname=self.db_name
        )

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        # output to a file, not a pipe: the server pg_ctl starts must not hold our pipe open
        with open(self.root / "pg_ctl.out", "ab") as out:
            proc = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False)
        if proc.returncode != 0:
            log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.is_file() else ""
            raise RuntimeError(
                f"{' '.join(command)} exited {proc.returncode}:\n"
                f"{(self.root / 'pg_ctl.out').read_text(errors='replace')[-2000:]}\n{log}"
            )

    @classmethod
    def start(cls) -> PostgresServer:
        reason = postgres_unavailable_reason()
        if reason:
            raise RuntimeError(reason)
        # not under pytest's tmp_path: its parents are mode 0700 and root's, and the server runs as 'postgres'
        root = Path(tempfile.mkdtemp(prefix="bagel-test-postgres-"))
        server = cls(root=root, port=free_port(), bin_dir=postgres_bin_dir(), _as_postgres=os.geteuid() == 0)
        server.socket_dir.mkdir()
        if server._as_postgres:
            user = pwd.getpwnam("postgres")
            for path in (root, server.socket_dir):
                os.chown(path, user.pw_uid, user.pw_gid)
        try:
            # local (unix socket) connections trusted for the set-up below; TCP needs the password
            server._run(
                "initdb", "-D", str(server.data_dir), "-U", "postgres", "-E", "UTF8", "--no-locale",
                "--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "--no-instructions",
            )  # fmt: skip
            options = f"-k {server.socket_dir} -h {server.host} -p {server.port} -c fsync=off -c full_page_writes=off"
            server._run(
                "pg_ctl", "-D", str(server.data_dir), "-l", str(server.log_path), "-w", "-t", "60", "-o", options,
                "start",
            )  # fmt: skip
            conn = server.connect(superuser=True)
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f"CREATE ROLE {server.username} LOGIN PASSWORD %s", (server.password,))
                cur.execute(f"CREATE DATABASE {server.db_name} OWNER {server.username}")
            conn.close()
        except BaseException:
            server.stop()
            raise
        return server

    def stop(self) -> None:
        """Stops the server (fast shutdown, immediate as a fallback) and removes its directory."""
        if (self.data_dir / "postmaster.pid").is_file():
            for mode in ("fast", "immediate"):
                try:
                    self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "-t", "30", "stop", timeout=60)
                    break
                except (RuntimeError, subprocess.TimeoutExpired):
                    continue
        shutil.rmtree(self.root, ignore_errors=True)


# ---------------------------------------------------------------- processes and HTTP


def start_process_group(
    command: list[str], env: dict[str, str], log_path: Path, cwd: Path | None = None
) -> subprocess.Popen:
    """A server in its own session (process group), output to a file; stop it with stop_process_group."""
    log = open(log_path, "wb")  # noqa: SIM115 - closed by stop_process_group
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    proc._bagel_log = log  # type: ignore[attr-defined]
    return proc


def stop_process_group(proc: subprocess.Popen, grace: float = 15.0) -> None:
    """SIGTERM to the whole group (the webserver and its code-server child), SIGKILL if it lingers."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; give the rest of the group the same signal's chance, then make sure
        if not _group_alive(proc.pid):
            break
        time.sleep(0.5)
        if not _group_alive(proc.pid):
            break
    log = getattr(proc, "_bagel_log", None)
    if log is not None:
        log.close()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def http_json(url: str, payload: dict | None = None, timeout: float = 30.0) -> dict:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read().decode())


def graphql(base_url: str, query: str, variables: dict | None = None) -> dict:
    """POST /graphql; raises on GraphQL errors, returns ``data``."""
    answer = http_json(f"{base_url}/graphql", {"query": query, "variables": variables or {}})
    if answer.get("errors"):
        raise AssertionError(f"GraphQL errors: {answer['errors']}")
    return answer["data"]


WORKSPACE_QUERY = """
query { workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
  locationOrLoadError { __typename ... on PythonError { message } } } } } }
"""


def wait_for_webserver(base_url: str, proc: subprocess.Popen, log_path: Path, timeout: float = 120.0) -> dict:
    """Polls GET /server_info until it answers, then the workspace until every code location is LOADED."""
    deadline = time.monotonic() + timeout
    info: dict | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"webserver exited {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            if info is None:
                info = http_json(f"{base_url}/server_info", timeout=5)
            entries = graphql(base_url, WORKSPACE_QUERY)["workspaceOrError"]["locationEntries"]
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                loaded = [e["locationOrLoadError"] for e in entries]
                errors = [e for e in loaded if e["__typename"] != "RepositoryLocation"]
                if errors:
                    raise RuntimeError(f"code location failed to load: {errors}")
                return info
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"webserver not ready after {timeout} s:\n{log_path.read_text(errors='replace')[-3000:]}")


# ---------------------------------------------------------------- Chromium


def chromium_path() -> str | None:
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


def screenshot(
    url: str,
    out: Path,
    profile_dir: Path,
    virtual_time_ms: int = 30000,
    window: tuple[int, int] = (1600, 1000),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess:
    """Headless Chromium renders ``url`` into the PNG ``out``; ``stdout`` of the result is the rendered DOM.

    ``--virtual-time-budget`` lets the page run that much virtual time (timers run fast-forward, virtual time
    stops while network fetches are pending) before the capture. The Dagster UI renders its frame within a
    few virtual seconds, but the asset statuses of the lineage graph arrive in timed batches: with 10 s about
    one capture in three still showed some nodes without status; with 30 s none of 30 did. 30 s of virtual
    time take 6-10 s of wall time on 2 cores.
    """
    browser = chromium_path()
    if browser is None:
        raise RuntimeError("chromium not found; run .ci/services")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    command = [
        browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio", f"--user-data-dir={profile_dir}",
        f"--window-size={window[0]},{window[1]}", f"--virtual-time-budget={virtual_time_ms}",
        f"--screenshot={out}", "--dump-dom", url,
    ]  # fmt: skip
    # own process group: on a timeout the renderer and GPU/zygote children go too
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process_group(proc, grace=5.0)
        stdout, stderr = proc.communicate()
        raise TimeoutError(f"chromium took over {timeout} s on {url}:\n{stderr[-2000:]}") from None
    finally:
        if proc.poll() is None or _group_alive(proc.pid):  # leftovers of the browser's group
            stop_process_group(proc, grace=5.0)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def screenshot_when(
    url: str,
    out: Path,
    profile_dir: Path,
    ready: Callable[[str], bool],
    budgets_ms: tuple[int, ...] = (30000, 45000, 60000),
) -> tuple[subprocess.CompletedProcess, int]:
    """``screenshot`` again (more virtual time, a fresh profile) until ``ready(dom)`` holds; (last result, tries).

    The Dagster UI loads each asset's status ("live data") in batches after the page itself; should the capture
    come before the last batch, the next try gets more virtual time. The caller says what the page must show.
    """
    result = None
    for attempt, budget in enumerate(budgets_ms, start=1):
        result = screenshot(url, out, profile_dir / f"try{attempt}", virtual_time_ms=budget)
        if result.returncode == 0 and ready(result.stdout):
            return result, attempt
    assert result is not None
    return result, len(budgets_ms)


_MINIMAL_NODE = re.compile(r"--minimal-bg: var\(--color-background-(\w+)\)[^>]*><div[^>]*>([^<]+)</div>")


def lineage_node_colours(dom: str) -> dict[str, str]:
    """Asset name -> background colour name of its node in the zoomed-out lineage graph (Dagster 1.13's DOM):
    ``green`` materialised, ``red`` failed, ``light`` never materialised or its status not loaded yet."""
    return {name: colour for colour, name in _MINIMAL_NODE.findall(dom)}


# ---------------------------------------------------------------- Dagster runs through GraphQL

LAUNCH_RUN = """mutation($params: ExecutionParams!) { launchRun(executionParams: $params) { __typename
  ... on LaunchRunSuccess { run { runId } } ... on PythonError { message }
  ... on RunConfigValidationInvalid { errors { message } } ... on InvalidSubsetError { message } } }"""
TERMINATE_RUN = """mutation($id: String!) { terminateRun(runId: $id) { __typename ... on PythonError { message } } }"""
RUN_STATUS = """query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }"""
RUN_MESSAGES = """query($id: ID!) { logsForRun(runId: $id) { ... on EventConnection { events { __typename
  ... on MessageEvent { message } } } } }"""


@contextlib.contextmanager
def dagster_ui(home: Path, env: dict[str, str], log_path: Path, cwd: Path, with_daemon: bool = False):
    """``dagster-webserver`` (or ``dagster dev``, webserver + daemon, when runs must be dequeued) for
    ``-m pipelines`` on 127.0.0.1; yields its base URL once the code location is loaded."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    command = (
        [str(bin_dir / "dagster"), "dev", "-m", "pipelines", "-h", "127.0.0.1", "-p", str(port)]
        if with_daemon
        else [str(bin_dir / "dagster-webserver"), "-m", "pipelines", "-h", "127.0.0.1", "-p", str(port)]
    )
    server = start_process_group(command, {**env, "DAGSTER_HOME": str(home)}, log_path, cwd=cwd)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_webserver(url, server, log_path)
        yield url
    finally:
        stop_process_group(server)


def launch_asset_run(url: str, assets: list[str], run_config: dict) -> str:
    selector = {
        "repositoryLocationName": "pipelines",
        "repositoryName": "__repository__",
        "pipelineName": "__ASSET_JOB",
        "assetSelection": [{"path": [name]} for name in assets],
    }
    params = {"selector": selector, "runConfigData": run_config, "mode": "default"}
    launched = graphql(url, LAUNCH_RUN, {"params": params})["launchRun"]
    if launched["__typename"] != "LaunchRunSuccess":
        raise AssertionError(f"launchRun failed: {launched}")
    return launched["run"]["runId"]


def run_status(url: str, run_id: str) -> str:
    return graphql(url, RUN_STATUS, {"id": run_id})["runOrError"]["status"]


def terminate_run(url: str, run_id: str) -> None:
    terminated = graphql(url, TERMINATE_RUN, {"id": run_id})["terminateRun"]
    if terminated["__typename"] != "TerminateRunSuccess":
        raise AssertionError(f"terminateRun failed: {terminated}")


def wait_for_status(url: str, run_id: str, wanted: tuple[str, ...], timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run_status(url, run_id)
        if status in wanted:
            return status
        time.sleep(0.5)
    return run_status(url, run_id)


def run_messages(url: str, run_id: str) -> list[str]:
    events = graphql(url, RUN_MESSAGES, {"id": run_id})["logsForRun"]["events"]
    return [e.get("message") or "" for e in events]
