#!/usr/bin/env bash
# A Docker engine for building and testing the image on a machine where none runs and no
# registry is reachable (see README "Deployment"):
#
#   eval "$(deploy/docker-engine.sh start)"   # sets DOCKER_HOST and ARCFACE_DOCKERD_STARTED
#   deploy/docker-engine.sh base              # makes debian:bookworm if the engine lacks it
#   deploy/docker-engine.sh stop              # stops the dockerd that `start` started, if any
#
# start: when $DOCKER_HOST (or this script's socket) answers, that engine is used and nothing
#   is started (ARCFACE_DOCKERD_STARTED=0; the caller leaves it running). Otherwise dockerd
#   runs on private paths: data under $ARCFACE_DOCKER_ROOT (default /var/lib/arcface-docker,
#   kept between runs so the base image and the build cache are reused), its runtime state and
#   socket under /run/arcface-docker. It must run as root. Fails (exit 1, with dockerd's log
#   tail) when the engine cannot start: callers fail too, they never skip.
# base: `debian:bookworm` cannot be pulled here, so it is made from the Debian archive this
#   machine uses: debootstrap --variant=minbase, this machine's apt sources copied in, apt's
#   cache and lists emptied, then `docker import`. About 30 s and 120 MB, once per data root.
# stop: only a dockerd this script started (its pid file), and only when the caller's `start`
#   started it (ARCFACE_DOCKERD_STARTED=1); then removes the docker0 bridge and the iptables
#   chains and rules dockerd made, when there were none before it, and restores the FORWARD
#   policy and net.ipv4.ip_forward it changed.
#   Containers, networks and images are the caller's to remove first.
set -euo pipefail

ROOT=${ARCFACE_DOCKER_ROOT:-/var/lib/arcface-docker}
RUN=/run/arcface-docker
SOCK=$RUN/docker.sock
DOCKER=${DOCKER:-/usr/bin/docker}   # Debian's client (20.10), matching Debian's engine
BASE_IMAGE=debian:bookworm

log() { echo "docker-engine: $*" >&2; }

reachable() { "$DOCKER" version --format '{{.Server.Version}}' >/dev/null 2>&1; }

start() {
  if [[ -n ${DOCKER_HOST:-} ]] && reachable; then
    echo "export DOCKER_HOST=$DOCKER_HOST ARCFACE_DOCKERD_STARTED=0"
    return
  fi
  export DOCKER_HOST=unix://$SOCK
  if reachable; then
    echo "export DOCKER_HOST=$DOCKER_HOST ARCFACE_DOCKERD_STARTED=0"
    return
  fi
  [[ $(id -u) -eq 0 ]] || { log "no engine answers and starting dockerd needs root"; exit 1; }
  command -v dockerd >/dev/null || { log "dockerd missing: run deploy/install-deps.sh"; exit 1; }
  mkdir -p "$ROOT/data" "$RUN"
  local had_bridge=0
  ip link show docker0 >/dev/null 2>&1 && had_bridge=1
  echo "$had_bridge" >"$RUN/had-docker0"
  # dockerd turns IP forwarding on and the FORWARD policy to DROP; stop puts them back.
  cat /proc/sys/net/ipv4/ip_forward >"$RUN/ip_forward" 2>/dev/null || true
  iptables -S FORWARD 2>/dev/null | awk '$1 == "-P" {print $3}' >"$RUN/forward-policy" || true
  # setsid: dockerd outlives this script and is not hit by the caller's terminal signals.
  setsid dockerd --data-root "$ROOT/data" --exec-root "$RUN/exec" --pidfile "$RUN/dockerd.pid" \
    -H "unix://$SOCK" >"$RUN/dockerd.log" 2>&1 </dev/null &
  local i
  for ((i = 0; i < 300; i++)); do
    reachable && break
    sleep 0.1
  done
  if ! reachable; then
    log "dockerd did not start; its log:"
    tail -n 30 "$RUN/dockerd.log" >&2 || true
    exit 1
  fi
  touch "$RUN/started-by-us"
  echo "export DOCKER_HOST=$DOCKER_HOST ARCFACE_DOCKERD_STARTED=1"
}

base() {
  if "$DOCKER" image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
    log "$BASE_IMAGE present"
    return
  fi
  command -v debootstrap >/dev/null || { log "debootstrap missing: run deploy/install-deps.sh"; exit 1; }
  local sources=/etc/apt/sources.list.d/debian.sources mirror
  mirror=$(awk '/^URIs:/ {print $2; exit}' "$sources" 2>/dev/null || true)
  mirror=${mirror:-http://deb.debian.org/debian}
  local rootfs
  rootfs=$(mktemp -d "$ROOT/rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' RETURN
  log "making $BASE_IMAGE from $mirror (debootstrap, about a minute)"
  if ! debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$ROOT/debootstrap.log" 2>&1; then
    log "debootstrap failed; its log:"
    tail -n 30 "$ROOT/debootstrap.log" >&2
    exit 1
  fi
  # The same archive (and security suite) as this machine; no stale package lists or .debs.
  if [[ -f $sources ]]; then
    rm -f "$rootfs/etc/apt/sources.list"
    cp "$sources" "$rootfs/etc/apt/sources.list.d/debian.sources"
  fi
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar --numeric-owner -C "$rootfs" -c . | "$DOCKER" import - "$BASE_IMAGE" >/dev/null
  log "$BASE_IMAGE imported"
}

stop() {
  [[ ${ARCFACE_DOCKERD_STARTED:-0} == 1 && -f $RUN/started-by-us ]] || return 0
  local pid
  pid=$(cat "$RUN/dockerd.pid" 2>/dev/null || true)
  if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    local i
    for ((i = 0; i < 200; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -0 "$pid" 2>/dev/null && { log "dockerd $pid did not stop; killing it"; kill -9 "$pid"; }
  fi
  # Only when no engine had set up Docker's networking before ours: its bridge, and the
  # iptables rules and chains dockerd adds (and never removes).
  if [[ $(cat "$RUN/had-docker0" 2>/dev/null || echo 1) == 0 ]]; then
    if ip link show docker0 >/dev/null 2>&1; then
      ip link delete docker0 || log "could not remove docker0"
    fi
    local table rule chain
    for table in nat filter; do
      command -v iptables >/dev/null || break
      iptables -t "$table" -S 2>/dev/null | grep -E '^-A .*(-j DOCKER|docker0)' | sed 's/^-A/-D/' |
        while read -r rule; do eval iptables -t "$table" "$rule" || true; done
      for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
        iptables -t "$table" -F "$chain" || true
      done
      for chain in $(iptables -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^DOCKER/ {print $2}'); do
        iptables -t "$table" -X "$chain" || true
      done
    done
    local policy
    policy=$(cat "$RUN/forward-policy" 2>/dev/null || true)
    [[ -n $policy ]] && { iptables -P FORWARD "$policy" || true; }
    [[ -s $RUN/ip_forward ]] && { cat "$RUN/ip_forward" >/proc/sys/net/ipv4/ip_forward || true; }
  fi
  rm -f "$RUN/started-by-us" "$RUN/had-docker0" "$RUN/forward-policy" "$RUN/ip_forward"
}

case ${1:-} in
  start) start ;;
  base) base ;;
  stop) stop ;;
  *) echo "usage: $0 start|base|stop" >&2; exit 2 ;;
esac
