"""The deployment files: docker-compose.yml read by the compose tool itself, and the Dockerfile.

The compose tests need `docker compose` (v2) or `docker-compose` (v1, Debian's package); no
Docker daemon is needed, `config` only parses, validates and interpolates. They skip where
neither is installed. The Dockerfile and .dockerignore tests are plain text checks.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
PASSWORD = "test-password-0123456789abcdef"
PROFILES = ["--profile", "trainer", "--profile", "flower"]
# Variables of ours that a developer's shell may hold; the tests must not see them.
OUR_VARIABLES = ("REDIS_PASSWORD", "TORCH_INDEX", "WORKER_CONCURRENCY")
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


# --- docker-compose.yml --------------------------------------------------------------------


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


def test_workers_read_the_paths_the_producer_sends(config: dict[str, Any]) -> None:
    worker_targets = {target for _, _, target in mounts(service(config, "worker"))}
    producer = service(config, "producer")
    cmd = command(producer)
    inbox = cmd[cmd.index("--inbox") + 1]
    assert inbox == "/data/inbox" and inbox in worker_targets
    producer_inbox = {source for _, source, target in mounts(producer) if target == inbox}
    worker_inbox = {source for _, source, target in mounts(service(config, "worker")) if target == inbox}
    assert producer_inbox and producer_inbox == worker_inbox


def test_producer_polls_and_writes_into_a_mount(config: dict[str, Any]) -> None:
    producer = service(config, "producer")
    cmd = command(producer)
    assert cmd[0] == "watch"
    assert "--polling" in cmd, "bind mounts deliver no inotify events for files written on the host"
    csv = cmd[cmd.index("--csv") + 1]
    assert any(csv.startswith(target + "/") for _, _, target in mounts(producer))
    assert depends_on_healthy_redis(producer)
    assert not producer.get("ports")


def test_redis_is_private_persistent_and_health_checked(config: dict[str, Any]) -> None:
    redis = service(config, "redis")
    cmd = command(redis)
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--requirepass") + 1] == PASSWORD
    assert ("volume", "redis-data", "/data") in mounts(redis)
    assert "redis-data" in config["volumes"]
    test = redis["healthcheck"]["test"]
    test = " ".join(test) if isinstance(test, list) else test
    assert "redis-cli" in test and "ping" in test
    assert not redis.get("ports"), "Redis must not be published on the host"


def test_profiles_trainer_and_flower(config: dict[str, Any]) -> None:
    trainer = service(config, "trainer")
    assert trainer["profiles"] == ["trainer"]
    cmd = command(trainer)
    assert cmd[0] == "train"
    out = cmd[cmd.index("--out") + 1]
    assert ("volume", "models", str(Path(out).parent)) in mounts(trainer)
    flower = service(config, "flower")
    assert flower["profiles"] == ["flower"]
    assert host_ips(flower) == ["127.0.0.1"], "Flower has no login: this host only"
    assert any(c.startswith(f"--broker=redis://:{PASSWORD}@redis:6379/") for c in command(flower))
    for name in ("redis", "worker", "producer", "trainer"):
        assert not service(config, name).get("ports"), f"{name} publishes a port"


def test_env_example_is_a_valid_env_file(tmp_path: Path) -> None:
    # An environment variable wins over the env file, in v1 and v2 alike.
    r = run_config(tmp_path, env_file=ROOT / ".env.example", REDIS_PASSWORD=PASSWORD)
    assert r.returncode == 0, f"compose config with .env.example failed:\n{r.stdout}\n{r.stderr}"
    worker = service(parse_config(r.stdout), "worker")
    assert environment(worker)["MNISTQ_THREADS"] == "1"
    assert environment(worker)["REDIS_URL"] == f"redis://:{PASSWORD}@redis:6379/0"


def test_env_example_ships_no_usable_password(tmp_path: Path) -> None:
    r = run_config(tmp_path, env_file=ROOT / ".env.example")
    assert r.returncode != 0, "a copied .env.example must not start Redis with a known password"
    assert "set REDIS_PASSWORD in .env" in r.stdout + r.stderr


def test_missing_password_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    r = run_config(tmp_path)
    assert r.returncode != 0
    assert "set REDIS_PASSWORD in .env" in r.stdout + r.stderr


# --- Dockerfile and .dockerignore ---------------------------------------------------------


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


def test_dockerfile_entrypoint_and_cmd_are_exec_form() -> None:
    ins = dict(instructions())  # the last of each wins, as in Docker
    for name in ("ENTRYPOINT", "CMD"):
        assert ins[name].startswith("["), f"{name} in shell form: signals would go to /bin/sh"
        assert isinstance(json.loads(ins[name]), list)
    assert json.loads(ins["ENTRYPOINT"]) == ["mnistq"]
    assert json.loads(ins["CMD"]) == ["worker"]


def test_dockerfile_runs_as_a_non_root_user() -> None:
    users = [args for name, args in instructions() if name == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user == "10001"


def test_dockerfile_installs_dependencies_before_the_code() -> None:
    ins = instructions()
    copies = [(i, args.split()) for i, (name, args) in enumerate(ins) if name in ("COPY", "ADD")]
    pyproject_at = next(i for i, srcs in copies if "pyproject.toml" in srcs[:-1])
    deps_at = next(i for i, (name, args) in enumerate(ins) if name == "RUN" and "pip install" in args)
    code = {"mnistq", "trainer", "worker", "producer", "."}
    code_at = min(i for i, srcs in copies if code & {s.rstrip("/") for s in srcs[:-1]})
    assert pyproject_at < deps_at < code_at, "the dependency layer must not depend on the code"
    assert any(name == "RUN" and "--no-deps" in args for name, args in ins[code_at:])


def test_dockerfile_ships_the_model_and_unbuffered_output() -> None:
    ins = instructions()
    assert any(name == "COPY" and "model_state.pt" in args.split()[:-1] for name, args in ins)
    env = " ".join(args for name, args in ins if name == "ENV")
    assert "PYTHONUNBUFFERED=1" in env
    assert "MNISTQ_MODEL=/app/model_state.pt" in env
    assert any(name == "ARG" and args.startswith("TORCH_INDEX=") for name, args in ins)


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
    copied = [
        src
        for name, args in instructions()
        if name == "COPY" and not args.startswith("--from")
        for src in args.split()[:-1]
    ]
    for src in copied:
        assert (ROOT / src).exists(), f"the Dockerfile copies {src}, which is not in the repository"
        assert not _ignored(src, patterns), f".dockerignore drops {src}, which the Dockerfile copies"
    for path in (".git", ".venv", "data/MNIST", "inbox", "results.csv", "mnistq/__pycache__", "x.egg-info"):
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
