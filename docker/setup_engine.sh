#!/usr/bin/env bash
# Install, start and stop a private Docker engine on a CI / build machine, and build the
# local base image. Used by tests/test_docker.py and .ci/run; handy by hand too.
#
#   docker/setup_engine.sh install                 apt-get docker.io docker-compose debootstrap
#   docker/setup_engine.sh start DIR               dockerd with data/exec root + socket under DIR
#   docker/setup_engine.sh base-image DIR [IMAGE]  debootstrap Debian bookworm + python3 and
#                                                  `docker import` it as IMAGE
#                                                  (default local/bookworm-python:latest)
#   docker/setup_engine.sh stop DIR                stop that dockerd (by its pidfile) and wait
#
# After `start`, talk to the engine with   export DOCKER_HOST=unix://DIR/docker.sock
# The debootstrap root file system is cached as a tarball in $CAREFL_DOCKER_CACHE
# (default /var/cache/carefl-docker) so later runs only `docker import` it (~10 s).
# Needs root and apt (Debian/Ubuntu). Only the package registry is contacted.
set -euo pipefail

CACHE_DIR="${CAREFL_DOCKER_CACHE:-/var/cache/carefl-docker}"
SUITE="${CAREFL_DEBIAN_SUITE:-bookworm}"

die() { echo "setup_engine: $*" >&2; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (installs packages and starts dockerd)"
}

cmd_install() {
    need_root
    local missing=()
    command -v dockerd >/dev/null || missing+=(docker.io)
    command -v docker-compose >/dev/null || missing+=(docker-compose)
    command -v debootstrap >/dev/null || missing+=(debootstrap)
    [ ${#missing[@]} -eq 0 ] && { echo "setup_engine: engine packages already installed"; return; }
    command -v apt-get >/dev/null || die "apt-get not found; install ${missing[*]} by hand"
    echo "setup_engine: apt-get install ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

cmd_start() {
    need_root
    local dir="${1:?usage: start DIR}"
    mkdir -p "$dir/data" "$dir/exec"
    dir="$(cd "$dir" && pwd)"
    local sock="$dir/docker.sock"
    if [ -f "$dir/dockerd.pid" ] && kill -0 "$(cat "$dir/dockerd.pid")" 2>/dev/null; then
        echo "setup_engine: dockerd already running (pid $(cat "$dir/dockerd.pid"))"
    elif pgrep -x dockerd >/dev/null; then
        die "another dockerd is running (pid $(pgrep -x dockerd | tr '\n' ' ')); two engines fight over docker0 and iptables: stop it first or use it via DOCKER_HOST"
    else
        # dockerd adds iptables rules and the docker0 bridge; remember the host's rules so
        # `stop` puts them back exactly.
        if command -v iptables-save >/dev/null && [ ! -e "$dir/iptables.before" ]; then
            iptables-save >"$dir/iptables.before" 2>/dev/null || rm -f "$dir/iptables.before"
        fi
        ip link show docker0 >/dev/null 2>&1 && touch "$dir/docker0.preexisting"
        # setsid: the engine must not receive the caller's terminal signals.
        setsid dockerd --data-root "$dir/data" --exec-root "$dir/exec" \
            --pidfile "$dir/dockerd.pid" --host "unix://$sock" \
            >"$dir/dockerd.log" 2>&1 < /dev/null &
    fi
    for _ in $(seq 1 120); do
        if DOCKER_HOST="unix://$sock" docker info >/dev/null 2>&1; then
            echo "setup_engine: engine ready: export DOCKER_HOST=unix://$sock"
            return
        fi
        sleep 0.5
    done
    tail -20 "$dir/dockerd.log" >&2 || true
    die "dockerd did not answer within 60 s (log: $dir/dockerd.log)"
}

cmd_base_image() {
    need_root
    local dir="${1:?usage: base-image DIR [IMAGE]}"
    local image="${2:-local/bookworm-python:latest}"
    export DOCKER_HOST="unix://$(cd "$dir" && pwd)/docker.sock"
    if docker image inspect "$image" >/dev/null 2>&1; then
        echo "setup_engine: $image already present"; return
    fi
    local tarball="$CACHE_DIR/$SUITE-python.tar"
    if [ ! -s "$tarball" ]; then
        command -v debootstrap >/dev/null || die "debootstrap missing (run: $0 install)"
        mkdir -p "$CACHE_DIR"
        local rootfs
        rootfs="$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")"
        echo "setup_engine: debootstrap $SUITE into $rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
            "$SUITE" "$rootfs" >"$CACHE_DIR/debootstrap.log" 2>&1 \
            || { tail -20 "$CACHE_DIR/debootstrap.log" >&2; rm -rf "$rootfs"; die "debootstrap failed"; }
        # Trim what an image never needs (apt lists, docs) before caching.
        rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
        tar -C "$rootfs" -cf "$tarball.tmp" . && mv "$tarball.tmp" "$tarball"
        rm -rf "$rootfs"
    fi
    echo "setup_engine: docker import $tarball -> $image"
    docker import "$tarball" "$image" >/dev/null
}

# Remove the rules and chains dockerd added (those mentioning DOCKER* or docker0) unless
# they were there before it started, and put back the FORWARD policy it changed.
undo_docker_iptables() {
    local before="$1" table rule chain policy
    grep -q DOCKER "$before" && return 0   # Docker's rules predate us: leave them
    for table in filter nat; do
        iptables -t "$table" -S 2>/dev/null | grep -E '^-A .*(-j DOCKER|docker0)' |
            while read -r rule; do
                # shellcheck disable=SC2086  # Docker's rules have no quoted words
                iptables -t "$table" -D ${rule#-A } || true
            done
        for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
            iptables -t "$table" -F "$chain" || true
        done
        for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
            iptables -t "$table" -X "$chain" || true
        done
    done
    policy="$(awk '$1 == ":FORWARD" {print $2; exit}' "$before")"
    iptables -P FORWARD "${policy:-ACCEPT}" || true
}

cmd_stop() {
    local dir="${1:?usage: stop DIR}"
    local pidfile="$dir/dockerd.pid"
    [ -f "$pidfile" ] || { echo "setup_engine: no dockerd pidfile in $dir"; return; }
    local pid
    pid="$(cat "$pidfile")"
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid"
        for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -0 "$pid" 2>/dev/null && { echo "setup_engine: dockerd $pid ignored SIGTERM, killing"; kill -9 "$pid"; }
    fi
    rm -f "$pidfile"
    # Undo dockerd's host networking changes (it leaves them behind on exit).
    [ -f "$dir/iptables.before" ] && undo_docker_iptables "$dir/iptables.before"
    rm -f "$dir/iptables.before"
    if [ ! -e "$dir/docker0.preexisting" ] && ip link show docker0 >/dev/null 2>&1; then
        ip link delete docker0 || true
    fi
    rm -f "$dir/docker0.preexisting"
    echo "setup_engine: dockerd stopped, host networking restored"
}

case "${1:-}" in
    install) shift; cmd_install "$@" ;;
    start) shift; cmd_start "$@" ;;
    base-image) shift; cmd_base_image "$@" ;;
    stop) shift; cmd_stop "$@" ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
esac
