"""The deployment files: docker-compose.yml read by the compose tool itself, the Dockerfile,
its entrypoint and the pinned versions.

The compose tests need `docker compose` (v2) or `docker-compose` (v1, Debian's package); no
Docker daemon is needed, `config` only parses, validates and interpolates. They skip where
neither is installed. They check what must hold across files (the paths the producer sends are
the paths the workers see; every package is copied into the image; every build argument reaches
the Dockerfile) and the properties a deployment relies on (scaling, polling, exec-form signals,
one image built once), not the files' wording. The deployment run for real, against a Docker
engine, is `.ci/compose-live` (docs/deployment.md).
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.sh"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"
PASSWORD = "test-password-0123456789abcdef"
PROFILES = ["--profile", "trainer", "--profile", "flower"]
# Variables of ours that a developer's shell may hold; the tests must not see them.
OUR_VARIABLES = (
    "REDIS_PASSWORD",
    "WORKER_CONCURRENCY",
    "BASE_IMAGE",
    "TORCH_PACKAGES",
    "TORCH_INDEX",
    "PIP_INDEX_URL",
    "WHEELHOUSE",
    "CI_BASE_IMAGE",
)
YAML_TO_JSON = "import json, sys, yaml; json.dump(yaml.safe_load(sys.stdin), sys.stdout)"


# --- the compose tool ---------------------------------------------------------------------


@cache
def compose_tool() -> tuple[list[str], str] | None:
    """The compose command and its version, v2 preferred; None where none is installed."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            r = subprocess.run(
                [*cmd, "version", "--short"], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0 and r.stdout.strip():
            return cmd, r.stdout.strip().lstrip("v")
    return None


def _env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(("MNISTQ_", "COMPOSE_")) or k in OUR_VARIABLES)
    }
    return {**env, **extra}


def run_config(tmp_path: Path, env_file: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    """`compose config` on the repository's file, isolated from any .env a developer has."""
    tool = compose_tool()
    if tool is None:
        pytest.skip("no compose tool installed (`docker compose` or Debian's `docker-compose`)")
    cmd, version = tool
    if env_file is None:
        env_file = tmp_path / "empty.env"
        env_file.write_text("")
    args = [
        *cmd,
        "--file", str(COMPOSE_FILE),
        "--project-directory", str(ROOT),
        "--env-file", str(env_file),
        *PROFILES,
        "config",
    ]  # fmt: skip
    if not version.startswith("1."):
        args += ["--format", "json"]
    return subprocess.run(
        args, capture_output=True, text=True, timeout=60, check=False, env=_env(**env), cwd=tmp_path
    )


def parse_config(text: str) -> dict[str, Any]:
    """v2 prints JSON when asked; v1 prints YAML only, read with PyYAML where there is one."""
    if text.lstrip().startswith("{"):
        return json.loads(text)
    try:
        import yaml
    except ImportError:
        yaml = None
    if yaml is not None:
        return yaml.safe_load(text)
    # docker-compose v1 is a Python program that depends on PyYAML: its interpreter has it.
    script = shutil.which("docker-compose")
    first = Path(script).read_text(errors="replace").splitlines()[0] if script else ""
    if first.startswith("#!"):
        r = subprocess.run(
            [*shlex.split(first[2:]), "-c", YAML_TO_JSON],
            input=text,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if r.returncode == 0:
            return json.loads(r.stdout)
    pytest.skip("docker-compose v1 prints YAML only, and no PyYAML was found to read it")


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("compose")
    r = run_config(tmp, REDIS_PASSWORD=PASSWORD)
    assert r.returncode == 0, f"compose config failed:\n{r.stdout}\n{r.stderr}"
    return parse_config(r.stdout)


def service(config: dict[str, Any], name: str) -> dict[str, Any]:
    assert name in config["services"], f"no service {name!r} in {sorted(config['services'])}"
    return config["services"][name]


def command(svc: dict[str, Any]) -> list[str]:
    cmd = svc.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def mounts(svc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(type, source, target) for each volume entry, from v1's short or v2's long syntax."""
    out = []
    for v in svc.get("volumes") or []:
        if isinstance(v, dict):
            out.append((v.get("type", "volume"), str(v.get("source", "")), str(v["target"])))
            continue
        source, target = v.split(":")[:2]
        out.append(("bind" if source.startswith(("/", ".", "~")) else "volume", source, target))
    return out


def host_ips(svc: dict[str, Any]) -> list[str]:
    """The host address of each published port ('' for all interfaces)."""
    ips = []
    for p in svc.get("ports") or []:
        if isinstance(p, dict):
            ips.append(str(p.get("host_ip") or ""))
            continue
        parts = str(p).split(":")
        ips.append(parts[0] if len(parts) == 3 else "")
    return ips


def environment(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) for e in env)
    return {k: str(v) for k, v in env.items()}


def depends_on_healthy_redis(svc: dict[str, Any]) -> bool:
    deps = svc.get("depends_on") or {}
    return isinstance(deps, dict) and deps.get("redis", {}).get("condition") == "service_healthy"


def host_path(svc: dict[str, Any], container_path: str) -> Path | None:
    """The host path a bind mount gives container_path in svc (the deepest mount wins)."""
    best: tuple[int, Path] | None = None
    for kind, source, target in mounts(svc):
        if kind != "bind" or not (container_path == target or container_path.startswith(target + "/")):
            continue
        if best is None or len(target) > best[0]:
            rest = container_path[len(target) :].lstrip("/")
            best = (len(target), Path(source) / rest if rest else Path(source))
    return best[1] if best else None


def mount_of(svc: dict[str, Any], container_path: str) -> str | None:
    """The target of the mount that holds container_path (the deepest one)."""
    targets = [
        t for _, _, t in mounts(svc) if container_path == t or container_path.startswith(t.rstrip("/") + "/")
    ]
    return max(targets, key=len) if targets else None


def option(cmd: list[str], name: str) -> str:
    return cmd[cmd.index(name) + 1]


# --- docker-compose.yml --------------------------------------------------------------------


@pytest.mark.system
def test_worker_is_scalable_and_stops_gracefully(config: dict[str, Any]) -> None:
    worker = service(config, "worker")
    assert "container_name" not in worker, "a fixed container name prevents --scale worker=N"
    assert not worker.get("ports"), "host ports on a worker collide when it is scaled"
    assert command(worker)[0] == "worker"
    assert depends_on_healthy_redis(worker)
    assert worker.get("stop_signal", "SIGTERM") == "SIGTERM"
    assert worker.get("stop_grace_period"), "a batch in hand needs time to finish on SIGTERM"
    env = environment(worker)
    assert env["REDIS_URL"] == f"redis://:{PASSWORD}@redis:6379/0"
    assert env["MNISTQ_ALLOWED_ROOTS"] == "/data/inbox"
    assert env["MNISTQ_MODEL"] == "/app/model_state.pt", "out of the box: the model in the image"
    assert ("volume", "models", "/models") in mounts(worker)


@pytest.mark.system
def test_workers_read_the_paths_the_producer_sends(config: dict[str, Any]) -> None:
    producer, worker = service(config, "producer"), service(config, "worker")
    inbox = option(command(producer), "--inbox")
    assert inbox in environment(worker)["MNISTQ_ALLOWED_ROOTS"].split(":")
    on_producer, on_worker = host_path(producer, inbox), host_path(worker, inbox)
    assert on_producer is not None and on_producer == on_worker, (
        f"the producer's {inbox} is {on_producer} on the host, the workers' is {on_worker}"
    )


@pytest.mark.system
def test_producer_moves_files_within_one_mount(config: dict[str, Any]) -> None:
    """done/ and failed/ are made beside the CSV: on the inbox's mount, a move is a rename.

    Two bind mounts make every move a copy and a delete, and a delete that fails leaves a copy.
    """
    producer = service(config, "producer")
    cmd = command(producer)
    assert cmd[0] == "watch"
    assert "--polling" in cmd, "bind mounts deliver no inotify events for files written on the host"
    inbox, csv = option(cmd, "--inbox"), option(cmd, "--csv")
    assert mount_of(producer, inbox) is not None, "the inbox is not on a mount"
    assert mount_of(producer, inbox) == mount_of(producer, str(Path(csv).parent))
    assert depends_on_healthy_redis(producer)
    assert not producer.get("ports")


@pytest.mark.system
def test_the_host_data_folder_is_one_setting(tmp_path: Path) -> None:
    r = run_config(tmp_path, REDIS_PASSWORD=PASSWORD, MNISTQ_DATA_DIR="/srv/mnistq")
    assert r.returncode == 0, r.stderr
    cfg = parse_config(r.stdout)
    assert host_path(service(cfg, "producer"), "/data/inbox/x.png") == Path("/srv/mnistq/inbox/x.png")
    assert host_path(service(cfg, "worker"), "/data/inbox/x.png") == Path("/srv/mnistq/inbox/x.png")
    assert host_path(service(cfg, "trainer"), "/data/mnist") == Path("/srv/mnistq/mnist")


@pytest.mark.system
def test_the_image_is_built_once_and_shared(config: dict[str, Any]) -> None:
    services = config["services"]
    builders = [name for name, svc in services.items() if svc.get("build")]
    assert builders == ["worker"], f"services that build: {builders}"
    image = services["worker"]["image"]
    for name in ("producer", "trainer"):
        assert services[name]["image"] == image, f"{name} does not run the image the worker builds"
        # Compose v2 would look for the tag in a registry before the worker has built it.
        assert services[name].get("pull_policy") == "never"
    # docker-compose v1 pulls a missing image of a service without `build` unless the service
    # that builds it comes first: the producer (started by a plain `up`) depends on the worker.
    assert "worker" in (services["producer"].get("depends_on") or {})


@pytest.mark.system
def test_every_build_argument_reaches_the_dockerfile(tmp_path: Path) -> None:
    values = {
        "BASE_IMAGE": "debian-with-python:1",
        "TORCH_PACKAGES": "torch==2.13.0+cpu",
        "TORCH_INDEX": "https://example.invalid/torch",
        "PIP_INDEX_URL": "https://example.invalid/simple",
        "WHEELHOUSE": "deploy/elsewhere",
    }
    r = run_config(tmp_path, REDIS_PASSWORD=PASSWORD, **values)
    assert r.returncode == 0, r.stderr
    args = service(parse_config(r.stdout), "worker")["build"]["args"]
    if isinstance(args, list):
        args = dict(a.split("=", 1) for a in args)
    assert {k: args.get(k) for k in values} == values
    declared = {a.split("=")[0] for name, a in instructions() if name == "ARG"}
    assert set(args) <= declared, f"build arguments the Dockerfile ignores: {set(args) - declared}"


@pytest.mark.system
def test_redis_persists_into_its_volume_whatever_the_image(config: dict[str, Any]) -> None:
    redis = service(config, "redis")
    cmd = command(redis)
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--requirepass") + 1] == PASSWORD
    assert ("volume", "redis-data", option(cmd, "--dir")) in mounts(redis), "the AOF is not on the volume"
    test = redis["healthcheck"]["test"]
    test = " ".join(test) if isinstance(test, list) else test
    assert "redis-cli" in test and "ping" in test
    for name in ("redis", "worker", "producer", "trainer"):
        assert not service(config, name).get("ports"), f"{name} publishes a port"


@pytest.mark.system
def test_trainer_writes_where_it_runs_as_the_same_user(config: dict[str, Any]) -> None:
    trainer, worker = service(config, "trainer"), service(config, "worker")
    assert trainer["profiles"] == ["trainer"]
    assert trainer.get("user") == worker.get("user") == service(config, "producer").get("user")
    cmd = command(trainer)
    assert cmd[0] == "train"
    assert ("volume", "models", str(Path(option(cmd, "--out")).parent)) in mounts(trainer)
    assert host_path(trainer, option(cmd, "--data-dir")) is not None


@pytest.mark.system
def test_env_example_is_a_valid_env_file(tmp_path: Path) -> None:
    # An environment variable wins over the env file, in v1 and v2 alike.
    r = run_config(tmp_path, env_file=ROOT / ".env.example", REDIS_PASSWORD=PASSWORD)
    assert r.returncode == 0, f"compose config with .env.example failed:\n{r.stdout}\n{r.stderr}"
    worker = service(parse_config(r.stdout), "worker")
    assert environment(worker)["MNISTQ_THREADS"] == "1"
    assert environment(worker)["REDIS_URL"] == f"redis://:{PASSWORD}@redis:6379/0"


@pytest.mark.system
def test_env_example_ships_no_usable_password(tmp_path: Path) -> None:
    r = run_config(tmp_path, env_file=ROOT / ".env.example")
    assert r.returncode != 0, "a copied .env.example must not start Redis with a known password"
    assert "set REDIS_PASSWORD in .env" in r.stdout + r.stderr


@pytest.mark.system
def test_missing_password_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    r = run_config(tmp_path)
    assert r.returncode != 0
    assert "set REDIS_PASSWORD in .env" in r.stdout + r.stderr


@pytest.mark.system
def test_the_ci_override_only_replaces_images(tmp_path: Path) -> None:
    tool = compose_tool()
    if tool is None:
        pytest.skip("no compose tool installed")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    args = [
        *tool[0],
        "--file", str(COMPOSE_FILE),
        "--file", str(ROOT / "deploy" / "ci.override.yml"),
        "--project-directory", str(ROOT),
        "--env-file", str(empty),
        "config",
    ]  # fmt: skip
    if not tool[1].startswith("1."):
        args += ["--format", "json"]
    env = _env(REDIS_PASSWORD=PASSWORD, CI_BASE_IMAGE="local/base:1")
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    with_override = parse_config(r.stdout)
    r = run_config(tmp_path, REDIS_PASSWORD=PASSWORD)
    plain = parse_config(r.stdout)
    assert service(with_override, "redis")["image"] == "local/base:1"
    assert service(with_override, "worker")["build"]["args"]["BASE_IMAGE"] == "local/base:1"
    for name in ("redis", "worker", "producer"):
        a, b = dict(service(with_override, name)), dict(service(plain, name))
        for svc in (a, b):
            svc.pop("image", None)
            svc.pop("build", None)
            svc.pop("pull_policy", None)  # v1 ignores it, and drops it when it merges two files
        assert a == b, f"deploy/ci.override.yml changes more than images in {name}"


# --- Dockerfile, its entrypoint, .dockerignore ---------------------------------------------


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    out: list[tuple[str, str]] = []
    buf = ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        if buf.strip():
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (name, _) in enumerate(ins) if name == "FROM")
    return ins[last_from:]


def test_dockerfile_entrypoint_and_cmd_are_exec_form() -> None:
    ins = dict(final_stage())  # the last of each wins, as in Docker
    for name in ("ENTRYPOINT", "CMD"):
        assert ins[name].startswith("["), f"{name} in shell form: signals would go to /bin/sh"
        assert isinstance(json.loads(ins[name]), list)
    assert json.loads(ins["CMD"]) == ["worker"]
    entrypoint = json.loads(ins["ENTRYPOINT"])
    copied = [args.split() for name, args in final_stage() if name == "COPY"]
    assert any(
        "deploy/entrypoint.sh" in srcs[:-1] and Path(srcs[-1]).name == Path(entrypoint[0]).name
        for srcs in copied
    ), "the ENTRYPOINT is not the repository's deploy/entrypoint.sh"
    assert "HEALTHCHECK" in ins and "--health" in ins["HEALTHCHECK"]


def test_dockerfile_runs_as_a_non_root_user_and_calls_python3() -> None:
    users = [args for name, args in final_stage() if name == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    # Debian and Ubuntu bases have python3 only.
    runs = " ".join(args for name, args in instructions() if name == "RUN")
    assert not re.search(r"(^|[\s;&|(])python(\s|$)", runs), "a RUN calls `python`, which Debian lacks"


def test_dockerfile_installs_pinned_versions_without_build_isolation() -> None:
    runs = [args for name, args in instructions() if name == "RUN" and "pip" in args]
    deps = next(r for r in runs if "requirements" in r)
    assert "--constraint constraints.txt" in deps or "-c constraints.txt" in deps
    assert "--no-index" in deps, "no offline path from a wheelhouse"
    editable = next(r for r in runs if " -e ." in r)
    assert "--no-build-isolation" in editable and "--no-index" in editable


def _ignored(rel: str, patterns: list[str]) -> bool:
    """.dockerignore matching for the simple patterns used here: the last match wins."""
    ignored = False
    for pat in patterns:
        negate = pat.startswith("!")
        pat = pat.removeprefix("!").strip("/")
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(p, pat.removeprefix("**/")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_what_the_image_copies_and_drops_the_rest() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    defaults = {
        a.split("=", 1)[0]: a.split("=", 1)[1].strip('"')
        for name, a in instructions()
        if name == "ARG" and "=" in a
    }
    copied = [
        re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], src)
        for name, args in instructions()
        if name == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    ]
    for src in copied:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"
        assert not _ignored(src, patterns), f".dockerignore drops {src}, which the Dockerfile copies"
    for path in (".git", ".venv", ".env", "data/inbox", "inbox", "results", "tests", "x.egg-info"):
        assert _ignored(path, patterns), f"{path} would be sent to the Docker daemon"


def test_dockerfile_copies_every_package_pyproject_installs() -> None:
    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"][
        "include"
    ]
    packages = {
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").is_file() and any(fnmatch.fnmatch(p.name, pat) for pat in include)
    }
    copied = {src.rstrip("/") for name, args in instructions() if name == "COPY" for src in args.split()[:-1]}
    assert packages and packages <= copied, f"not copied into the image: {sorted(packages - copied)}"


def _entrypoint(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    """deploy/entrypoint.sh with a stand-in `mnistq` that prints its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "mnistq"
    fake.write_text('#!/bin/sh\necho "mnistq $*"\n')
    fake.chmod(0o755)
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "MNISTQ_BLOCKED_FILE": str(tmp_path / "blocked"),
        "MNISTQ_INBOX": str(tmp_path / "inbox"),
        "MNISTQ_CSV": str(tmp_path / "results" / "results.csv"),
    }
    return subprocess.Popen(
        ["sh", str(ENTRYPOINT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.system
def test_entrypoint_becomes_mnistq_when_the_folders_are_usable(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    proc = _entrypoint(tmp_path, "watch", "--polling")
    out, err = proc.communicate(timeout=30)
    assert (proc.returncode, out.strip(), err) == (0, "mnistq watch --polling", "")


@pytest.mark.system
def test_entrypoint_waits_unhealthy_with_one_line_when_it_cannot_write(tmp_path: Path) -> None:
    # Root may write anywhere, so the folder is made unusable by putting a file in its place.
    (tmp_path / "results").write_text("not a folder")
    (tmp_path / "inbox").mkdir()
    proc = _entrypoint(tmp_path, "watch")
    try:
        blocked = tmp_path / "blocked"
        deadline = time.monotonic() + 20
        while not blocked.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "it exited instead of waiting (a restart loop under Docker)"
        health = subprocess.run(
            ["sh", str(ENTRYPOINT), "--health"],
            env={"PATH": "/usr/bin:/bin", "MNISTQ_BLOCKED_FILE": str(blocked)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert health.returncode == 1
        line = health.stdout.strip()
        assert "\n" not in line and str(tmp_path / "results") in line and "chown" in line
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode != 0 and "mnistq" not in out, "mnistq started without a writable folder"
    assert err.strip().count("\n") == 0, f"more than one line: {err!r}"


@pytest.mark.system
def test_entrypoint_of_a_one_off_command_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "mnist").write_text("not a folder")
    proc = _entrypoint(tmp_path, "train", "--data-dir", str(tmp_path / "mnist"))
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 2 and out == ""
    assert err.count("\n") == 1 and str(tmp_path / "mnist") in err and "chown" in err


# --- deploy/constraints.txt ----------------------------------------------------------------


def _name(requirement: str) -> str:
    return re.sub(r"[-_.]+", "-", re.split(r"[^A-Za-z0-9_.-]", requirement.strip(), maxsplit=1)[0]).lower()


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"not an exact pin: {line!r}"
            assert _name(name) not in pins, f"pinned twice: {name}"
            pins[_name(name)] = version
    return pins


def _project_requirements() -> list[str]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"]
    return [spec for spec in wanted if _name(spec) not in ("torch", "torchvision")]


def test_constraints_pin_every_dependency_but_torch_within_pyproject() -> None:
    requirements = pytest.importorskip("packaging.requirements")
    pins = _pins()
    assert "torch" not in pins and "torchvision" not in pins, "torch comes from the build arguments"
    for spec in _project_requirements():
        req = requirements.Requirement(spec)
        name = _name(req.name)
        assert name in pins, f"{req.name} is not pinned in deploy/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{name}=={pins[name]} breaks {spec}"


def test_constraints_pin_the_packages_the_dependencies_bring() -> None:
    """Walks the installed dependency tree (this environment's metadata) from pyproject.toml:
    a package that a dependency brings and that is not pinned would float in the image."""
    requirements = pytest.importorskip("packaging.requirements")
    pins = _pins()
    todo = [requirements.Requirement(spec) for spec in _project_requirements()]
    seen: set[str] = set()
    unpinned = []
    while todo:
        req = todo.pop()
        name = _name(req.name)
        if name in seen or name in ("torch", "torchvision"):
            continue
        seen.add(name)
        if name not in pins:
            unpinned.append(req.name)
        try:
            dist = importlib.metadata.distribution(req.name)
        except importlib.metadata.PackageNotFoundError:
            continue
        for line in dist.requires or []:
            sub = requirements.Requirement(line)
            extras = req.extras or {""}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                todo.append(sub)
    assert not unpinned, f"brought by the project's dependencies, not pinned: {sorted(unpinned)}"
