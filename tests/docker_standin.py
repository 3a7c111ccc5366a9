"""``docker stop|start CONTAINER`` for the workflow's shadow service, where the tests cannot run Docker: a real
PostgreSQL cluster in the folder the service mounts, started the way the postgres image's entrypoint starts it
(its files given to the server's account, mode 0700, initdb only when the folder holds no cluster), listening on
localhost at the port the service maps. The test's ``docker`` sets DOCKER_STANDIN_CONFIG (a JSON file)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def _as_server(config: dict[str, Any], argv: list[str]) -> subprocess.CompletedProcess[str]:
    kwargs: dict[str, Any] = {}
    if config["uid"] is not None:
        kwargs.update(user=config["uid"], group=config["gid"], extra_groups=[], cwd="/")
    env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, check=False, timeout=120, **kwargs)


def _own(config: dict[str, Any], folder: Path) -> None:
    if config["uid"] is None:
        return
    for path in [folder, *folder.rglob("*")]:
        os.lchown(path, config["uid"], config["gid"])


def main(argv: list[str]) -> int:
    config = json.loads(Path(os.environ["DOCKER_STANDIN_CONFIG"]).read_text())
    if len(argv) != 2 or argv[0] not in {"stop", "start"}:
        print(f"docker stand-in: only `docker stop|start CONTAINER`, not {argv}", file=sys.stderr)
        return 2
    if argv[1] != config["id"]:
        print(f"Error response from daemon: No such container: {argv[1]}", file=sys.stderr)
        return 1
    bindir, data = Path(config["bindir"]), Path(config["data"])
    if argv[0] == "stop":
        result = _as_server(config, [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"])
        if result.returncode != 0 and "Is server running?" not in result.stderr:
            print(result.stderr, file=sys.stderr)
            return 1
        print(argv[1])
        return 0
    data.mkdir(parents=True, exist_ok=True)
    _own(config, data)
    data.chmod(0o700)
    if not (data / "PG_VERSION").exists():
        result = _as_server(config, [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                     "--no-sync", "--no-instructions"])
        if result.returncode != 0:
            print(result.stderr, file=sys.stderr)
            return 1
    options = f"-c listen_addresses=localhost -p {config['port']} -k {config['sockets']} -c fsync=off"
    result = _as_server(config, [str(bindir / "pg_ctl"), "-D", str(data), "-l", str(Path(config["sockets"]) / "server.log"),
                                 "-w", "-t", "60", "-o", options, "start"])
    if result.returncode != 0:
        print(result.stderr + result.stdout, file=sys.stderr)
        return 1
    print(argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
